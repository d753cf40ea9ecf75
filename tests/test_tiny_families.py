"""Tiny SD3, FLUX and SDXL pipelines: saved, reloaded by the real `from_pretrained`, sampled by their own __call__."""

from __future__ import annotations

import os
import time

import pytest
import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import load_file
from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                          T5TokenizerFast)

from ddpo.tiny import (TINY_BUILDERS, build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sd3_pipeline,
                       build_tiny_sdxl_pipeline, save_tiny_pipeline)

S = 8  # latent size; the tiny VAEs are 2x, so images are 16x16

# name: (family, builder kwargs, the from_pretrained kwargs the folder needs, pipeline class, component classes)
CASES = {
    "sd3": ("sd3", {}, {"text_encoder_3": None, "tokenizer_3": None}, StableDiffusion3Pipeline, {
        "transformer": SD3Transformer2DModel, "scheduler": FlowMatchEulerDiscreteScheduler, "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "text_encoder_3": type(None),
        "tokenizer_3": type(None)}),
    "sd3_t5": ("sd3", {"with_t5": True}, {}, StableDiffusion3Pipeline, {
        "transformer": SD3Transformer2DModel, "scheduler": FlowMatchEulerDiscreteScheduler, "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "text_encoder_3": T5EncoderModel,
        "tokenizer_3": T5TokenizerFast}),
    "flux_dev": ("flux", {}, {}, FluxPipeline, {
        "transformer": FluxTransformer2DModel, "scheduler": FlowMatchEulerDiscreteScheduler, "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel,
        "tokenizer_2": T5TokenizerFast}),
    "flux_schnell": ("flux", {"guidance_embeds": False}, {}, FluxPipeline, {
        "transformer": FluxTransformer2DModel, "scheduler": FlowMatchEulerDiscreteScheduler, "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel,
        "tokenizer_2": T5TokenizerFast}),
    "sdxl": ("sdxl", {}, {}, StableDiffusionXLPipeline, {
        "unet": UNet2DConditionModel, "scheduler": EulerDiscreteScheduler, "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer}),
}


def _sample(pipe, seed: int) -> torch.Tensor:
    return pipe("a red cat", num_inference_steps=2, height=2 * S, width=2 * S, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("name", list(CASES))
def test_saved_folder_reloads_and_samples(tmp_path, name):
    family, build_kwargs, load_kwargs, pipeline_class, component_classes = CASES[name]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    folder = save_tiny_pipeline(tmp_path / name, seed=0, family=family, sample_size=S, **build_kwargs)
    built = time.perf_counter() - start

    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    models = {c for c, cls in component_classes.items() if hasattr(cls, "from_pretrained") and "oken" not in c
              and c != "scheduler"}
    assert {w.split("/")[0] for w in weights} == models

    pipe = DiffusionPipeline.from_pretrained(folder, **load_kwargs)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is pipeline_class
    for component, cls in component_classes.items():
        assert type(getattr(pipe, component)) is cls, (component, type(getattr(pipe, component)))
    for component, tokenizer in pipe.components.items():
        if component.startswith("tokenizer") and tokenizer is not None:
            assert len(tokenizer) > len(tokenizer.all_special_tokens), component
            assert tokenizer.model_max_length == (77 if isinstance(tokenizer, CLIPTokenizer) else 512), component
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert params < 1_000_000

    start = time.perf_counter()
    first, again, other = _sample(pipe, 1), _sample(pipe, 1), _sample(pipe, 2)
    sampled = (time.perf_counter() - start) / 3
    print(f"{name}: build+save {built * 1e3:.0f} ms, one 2-step sample {sampled * 1e3:.0f} ms, {params} params")
    assert first.shape == (1, 3, 2 * S, 2 * S)
    assert torch.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert built < 5 and sampled < 2


def test_sd3_without_t5_needs_the_none_kwargs(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "sd3", family="sd3")
    assert not (folder / "text_encoder_3").exists() and not (folder / "tokenizer_3").exists()
    with pytest.raises(ValueError, match="text_encoder_3"):
        DiffusionPipeline.from_pretrained(folder)


def test_flux_guidance_variants_are_dev_and_schnell():
    dev, schnell = build_tiny_flux_pipeline(), build_tiny_flux_pipeline(guidance_embeds=False)
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert hasattr(dev.transformer.time_text_embed, "guidance_embedder")
    assert not hasattr(schnell.transformer.time_text_embed, "guidance_embedder")
    config = dev.scheduler.config  # FLUX.1-dev's scheduler: resolution-dependent shift
    assert config.use_dynamic_shifting and (config.base_shift, config.max_shift) == (0.5, 1.15)
    assert (config.base_image_seq_len, config.max_image_seq_len) == (256, 4096)
    assert not schnell.scheduler.config.use_dynamic_shifting and schnell.scheduler.config.shift == 1.0


def test_dimensions_follow_the_real_models_rules():
    sd3 = build_tiny_sd3_pipeline(with_t5=True)
    t, te, te2 = sd3.transformer.config, sd3.text_encoder.config, sd3.text_encoder_2.config
    assert t.in_channels == t.out_channels == sd3.vae.config.latent_channels == 16
    assert t.joint_attention_dim == sd3.text_encoder_3.config.d_model >= te.hidden_size + te2.hidden_size
    assert t.pooled_projection_dim == te.projection_dim + te2.projection_dim
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert sd3.scheduler.config.shift == 3.0

    flux = build_tiny_flux_pipeline()
    t = flux.transformer.config
    assert t.in_channels == 4 * flux.vae.config.latent_channels == 64
    assert t.joint_attention_dim == flux.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == flux.text_encoder.config.hidden_size
    assert sum(t.axes_dims_rope) == t.attention_head_dim

    sdxl = build_tiny_sdxl_pipeline()
    u, te, te2 = sdxl.unet.config, sdxl.text_encoder.config, sdxl.text_encoder_2.config
    assert u.addition_embed_type == "text_time"
    assert u.cross_attention_dim == te.hidden_size + te2.hidden_size
    assert u.projection_class_embeddings_input_dim == te2.projection_dim + 6 * u.addition_time_embed_dim

    for pipe in (sd3, flux):  # decode computes latents / scaling_factor + shift_factor
        assert pipe.vae.config.shift_factor is not None and pipe.vae.config.scaling_factor != 0.18215
    assert sdxl.vae.config.scaling_factor == 0.13025


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl"])
def test_seed_makes_weights_deterministic(family):
    def weights(seed):
        pipe = TINY_BUILDERS[family](seed=seed)
        return {f"{c}.{k}": v for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
                for k, v in m.state_dict().items()}

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sd_default_save_still_writes_the_same_unet(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "sd")  # no family: Stable Diffusion, as before
    saved = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    expected = build_tiny_pipeline(seed=0).unet.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert type(DiffusionPipeline.from_pretrained(folder)) is StableDiffusionPipeline


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family 'sd4'"):
        save_tiny_pipeline(tmp_path / "x", family="sd4")
