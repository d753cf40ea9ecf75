"""The sd3 family without T5 attends to the 256 zero tokens as to one token counted 256 times
(ddpo/families/attention.py): the same velocities, log-probabilities, losses and gradients as the full sequence,
with LoRA, the KL reference, CFG, SD3.5's dual attention (the tiny SD3) and the shipped `shapes-flow` model."""

from __future__ import annotations

import json

import pytest
import torch

from ddpo.config import load_config
from ddpo.families.attention import RepeatedTokenAttnProcessor, use_repeated_tokens
from ddpo.families.flow import T5_TOKENS, SD3Family

MODELS = ["tiny-random-sd3", "shapes-flow"]
PROMPTS = ["a red square on a blue background", "a green circle on a white background"]


def load(name: str) -> SD3Family:
    from ddpo.families import load_family

    family = load_family(name)
    family.set_resolution(0)
    return family


def encodings(family: SD3Family, prompts: list[str]):
    """(short cond, short negative, full cond, full negative)."""
    short = family.encode(prompts, "cpu"), family.encode([""] * len(prompts), "cpu")
    family.repeated_tokens = False
    try:
        full = family.encode(prompts, "cpu"), family.encode([""] * len(prompts), "cpu")
    finally:
        family.repeated_tokens = True
    return (*short, *full)


def with_lora(family: SD3Family) -> list[torch.nn.Parameter]:
    """LoRA on the family's default targets, B drawn at random (peft starts it at zero: no effect to compare)."""
    from ddpo.pipeline import prepare_denoiser

    params = prepare_denoiser(family.denoiser, use_lora=True, rank=4, alpha=4,
                              target_modules=list(family.default_lora_targets), gradient_checkpointing=False,
                              attention="sdpa")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return params


@pytest.mark.parametrize("name", MODELS)
def test_encoding_keeps_the_clip_tokens_and_one_zero_token(name):
    family = load(name)
    cond, negative, full, full_negative = encodings(family, PROMPTS)
    clip = family.pipe.tokenizer_max_length
    assert full["embeds"].shape[1] == clip + T5_TOKENS and cond["embeds"].shape[1] == clip + 1
    assert torch.equal(cond["embeds"], full["embeds"][:, :clip + 1]) and torch.equal(cond["pooled"], full["pooled"])
    assert not full["embeds"][:, clip:].any()
    assert torch.equal(negative["embeds"], full_negative["embeds"][:, :clip + 1])


@pytest.mark.parametrize("name", MODELS)
def test_velocity_with_cfg_is_the_full_sequences(name):
    """Against a float64 run of the full sequence the short one is closer than the float32 full one: the
    difference between the two float32 paths is the full path's own rounding."""
    family = load(name)
    cond, negative, full, full_negative = encodings(family, PROMPTS * 2)
    x = torch.randn(family.latent_shape(4), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50.0, 300.0, 700.0, 1000.0])
    with torch.no_grad():
        short_v = family.predict(family.denoiser, x, t, cond, negative, 2.0)
        full_v = family.predict(family.denoiser, x, t, full, full_negative, 2.0)
        family.denoiser.double()
        exact = family.predict(family.denoiser, x.double(), t.double(), full.map(torch.Tensor.double),
                               full_negative.map(torch.Tensor.double), 2.0)
        family.denoiser.float()
    scale = exact.abs().mean().item()
    assert (short_v - full_v).abs().max() < 1e-4 * scale
    assert (short_v - exact).abs().max() <= (full_v - exact).abs().max() + 1e-6 * scale
    assert all(isinstance(p, RepeatedTokenAttnProcessor) for p in family.denoiser.attn_processors.values())


def test_dual_attention_and_the_last_block_run_diffusers_own_paths():
    """The tiny SD3 has SD3.5's dual attention in block 0 (attn2: self-attention, no text) and a context_pre_only
    last block; attention masks are refused rather than ignored."""
    family = load("tiny-random-sd3")
    blocks = family.denoiser.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[-1].attn.context_pre_only
    assert use_repeated_tokens(family.denoiser)
    attn, h = blocks[0].attn, torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match="attention mask"):
        attn.processor(attn, h, torch.randn(2, 5, 16), attention_mask=torch.zeros(2, 21), text_copies=3)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    torch.testing.assert_close(blocks[0].attn2.processor(blocks[0].attn2, h, text_copies=256),
                               JointAttnProcessor2_0()(blocks[0].attn2, h), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_with_lora_and_the_kl_reference_matches(name):
    """Log-probabilities of sampled SDE steps, a ratio loss, its LoRA gradients, and the KL reference (adapters
    off), by the short and the full sequence on the same trajectories, against a float64 run of the full one."""
    from ddpo.sampler import sample_trajectories

    family = load(name)
    params = with_lora(family)
    cond, negative, full, full_negative = encodings(family, PROMPTS * 2)
    traj = sample_trajectories(family, family.denoiser, full, full_negative, num_steps=4, guidance_scale=2.0,
                               eta=0.7, generator=torch.Generator().manual_seed(0))
    short = training_step(family, params, traj, cond, negative)
    whole = training_step(family, params, traj, full, full_negative)
    family.denoiser.double()
    exact = training_step(family, params, traj, full.map(torch.Tensor.double), full_negative.map(torch.Tensor.double))
    family.denoiser.float()
    sampled = traj.log_probs[torch.arange(4), torch.arange(4)].double()  # the full sequence's, when sampling
    torch.testing.assert_close(short["log_prob"], sampled, rtol=0, atol=1e-4)
    for key, value in exact.items():
        error, full_error = (short[key] - value).norm(), (whole[key] - value).norm()
        assert error < 1e-3 * value.norm() and error <= 2 * full_error + 1e-6 * value.norm(), (key, error, full_error)


def training_step(family: SD3Family, params: list, traj, cond, negative) -> dict[str, torch.Tensor]:
    """Steps 0..3 of samples 0..3: {"log_prob": (4,), "loss": (), "grad": (P,) the LoRA gradient, "reference":
    the KL reference's velocity (4, C, h, w)}, in float64."""
    from ddpo.logprob import step_log_prob
    from ddpo.objectives import adapters_off

    model, rows, steps = family.denoiser, torch.arange(4), torch.arange(4)
    dtype = next(model.parameters()).dtype
    latents, after = traj.latents[rows, steps].to(dtype), traj.latents[rows, steps + 1].to(dtype)
    times, advantages = traj.timesteps[rows, steps].to(dtype), torch.tensor([1.0, -0.5, 0.25, 0.75])
    model.zero_grad()
    mean, std = family.step_mean_std(family.predict(model, latents, times, cond, negative, 2.0), steps, latents, 0.7)
    log_prob = step_log_prob(after, mean, std)
    loss = -(advantages * torch.exp(log_prob - traj.log_probs[rows, steps])).mean()
    loss.backward()
    with torch.no_grad(), adapters_off(model) as reference:
        ref = family.predict(reference, latents, times, cond, negative, 2.0)
    grad = torch.cat([p.grad.flatten() for p in params])
    return {k: v.detach().double() for k, v in
            {"log_prob": log_prob, "loss": loss, "grad": grad, "reference": ref}.items()}


def test_a_grpo_epoch_with_a_kl_penalty_trains_as_with_the_full_sequence(tmp_path, monkeypatch):
    """The trainer end to end (tiny SD3: sampling, rewards, grpo update, KL to the pretrained model)."""
    from safetensors.torch import load_file

    from ddpo.checkpoint import list_checkpoints
    from ddpo.metrics import read_metrics
    from ddpo.trainer import train

    runs = {}
    for repeated in (True, False):
        monkeypatch.setattr(SD3Family, "repeated_tokens", repeated)
        config = load_config("tiny_sd3", [f"logging.output_dir={tmp_path}", f"logging.run_name=repeated_{repeated}",
                                          "train.num_epochs=1", "train.kl_coef=0.01",
                                          "reward.name=rewards_for_tests:brightness"])
        run_dir = train(config)
        runs[repeated] = (read_metrics(run_dir / "metrics.jsonl")[0],
                          load_file(list_checkpoints(run_dir)[-1] / "pytorch_lora_weights.safetensors"))
    (short, short_lora), (full, full_lora) = runs[True], runs[False]
    for key in ("reward_mean", "grad_norm", "kl_ref"):
        assert short[key] == pytest.approx(full[key], rel=1e-4), key
    assert short_lora.keys() == full_lora.keys()  # the LoRA file's format is unchanged
    for key in short_lora:  # lr 1e-3, 2 Adam steps (which move each weight by up to 2e-3, however small its
        torch.testing.assert_close(short_lora[key], full_lora[key], rtol=0, atol=1e-5)  # gradient): 0.5% of that


def test_a_shapes_flow_lora_samples_as_the_diffusers_pipeline_and_nothing_is_saved(tmp_path):
    """`ddpo generate`'s sampler (the family, shortened) and the pipeline's __call__ (the full sequence, through the
    processor the family left on its transformer, without text_copies) draw the same images; saved folders hold
    diffusers' standard processor and the same config as before the family ran."""
    from diffusers import SD3Transformer2DModel

    from ddpo.sampler import sample_trajectories

    family = load("shapes-flow")
    family.denoiser.save_pretrained(tmp_path / "before")
    with_lora(family)
    noise = torch.randn(family.latent_shape(2), generator=torch.Generator().manual_seed(0))
    cond, negative = family.encode(PROMPTS, "cpu"), family.encode(["", ""], "cpu")
    ours = sample_trajectories(family, family.denoiser, cond, negative, num_steps=6, guidance_scale=2.0, eta=0.0,
                               generator=torch.Generator(), initial_noise=noise).images
    assert isinstance(family.denoiser.transformer_blocks[0].attn.processor, RepeatedTokenAttnProcessor)
    theirs = family.pipe(PROMPTS, num_inference_steps=6, guidance_scale=2.0, latents=noise.clone(), height=64,
                         width=64, output_type="pt").images
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-4)
    family.denoiser.disable_adapters()
    family.denoiser.save_pretrained(tmp_path / "after")
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("before", "after")]
    assert config[0] == config[1]
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "after")
    assert {type(p).__name__ for p in reloaded.attn_processors.values()} == {"JointAttnProcessor2_0"}


def test_other_processors_and_t5_get_the_full_sequence():
    """A transformer whose processors are not diffusers' standard ones (here: a wrapper, as xformers' or fused
    projections' would be) is fed the restored 256 zero tokens; a pipeline with T5 is never shortened."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Counting(JointAttnProcessor2_0):
        lengths: list[int] = []

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if encoder_hidden_states is not None:
                self.lengths.append(encoder_hidden_states.shape[1])
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    family = load("tiny-random-sd3")
    cond, negative, full, full_negative = encodings(family, PROMPTS)
    x = torch.randn(family.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        expected = family.predict(family.denoiser, x, t, full, full_negative, 3.0)
        family.denoiser.set_attn_processor(Counting())
        assert not use_repeated_tokens(family.denoiser)
        restored = family.predict(family.denoiser, x, t, cond, negative, 3.0)
    assert set(Counting.lengths) == {family.pipe.tokenizer_max_length + T5_TOKENS}
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)

    from ddpo.tiny import build_tiny_sd3_pipeline

    with_t5 = SD3Family(build_tiny_sd3_pipeline(seed=0, with_t5=True))
    assert with_t5.encode(PROMPTS, "cpu")["embeds"].shape[1] == with_t5.pipe.tokenizer_max_length + T5_TOKENS
