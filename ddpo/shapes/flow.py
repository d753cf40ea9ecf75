"""The Shapes flow model (`shapes-flow`): a tiny SD3-style pipeline, pretrained with rectified flow matching.

    from ddpo.families import load_family
    family = load_family("shapes-flow")          # the `sd3` family: StableDiffusion3Pipeline, no T5

Parts (a standard `StableDiffusion3Pipeline` folder, model_index.json + safetensors):
- `vae`: the shipped Shapes VAE (the same weights as `shapes`), with `shift_factor` 0.0 added to its config;
- `text_encoder`, `text_encoder_2`: two `CLIPTextModelWithProjection` (hidden 32, projection 32) on the Shapes word
  tokenizer (`tokenizer`, `tokenizer_2`), trained with the transformer, as `shapes` trains its text encoder with the
  UNet. The pipeline concatenates their penultimate hidden states (16 tokens x 64 = joint_attention_dim, so no
  padding) and their pooled projections (64 = pooled_projection_dim); without T5 it appends 256 zero tokens;
- `transformer`: `SD3Transformer2DModel` on the 8x8x4 latents, patch 1 (64 image tokens), 4 joint blocks of 8 heads
  of 8 (width 64), qk RMS norm; 0.59M parameters;
- `scheduler`: `FlowMatchEulerDiscreteScheduler`, shift `FlowPretrainConfig.flow_shift`.

Pretraining (`train_flow`, `ddpo shapes pretrain --flow`): the UNet's dataset exactly (same seed stream, skew, rare
pairs, VAE latents), rectified flow x_t = (1 - t) x_0 + t eps with the velocity target eps - x_0, t logit-normal
(SD3's), 10% empty prompts for classifier-free guidance, EMA weights; AdamW 3e-3, batch 128, a cosine schedule set for
3000 steps and stopped at 2000 (FlowPretrainConfig). Reproducible bit for bit from a seed (at one torch thread, the
CLI's default).

The 256 zero tokens: the SD3 pipeline feeds them without T5 (`encode_prompt`'s max_sequence_length 256), so the model
must be trained with them. They are identical tokens (no positional embedding on text), so every layer treats them
alike: attention over n copies of a key is attention over one copy whose score is raised by log n. Training uses
that (`RepeatedTokenAttnProcessor`, ddpo/families/attention.py): 17 text tokens instead of 272, the same function
(checked to float rounding in tests/test_shapes_flow.py), about half the time per step. The `sd3` family does the
same when it samples and trains a pipeline without T5 (ddpo/families/flow.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ddpo.shapes.models import LATENT_SIZE, MAX_TOKENS

T5_ZERO_TOKENS = 256  # StableDiffusion3Pipeline.encode_prompt's default max_sequence_length, zeros without T5
CLIP_DIM = 32  # each of the two text encoders; concatenated: 64 = joint_attention_dim
JOINT_DIM = 2 * CLIP_DIM
FLOW_PIPELINE = "flow_pipeline"

# The sampler of configs/shapes_flow_alignment.yaml (`ddpo shapes eval --model shapes-flow` defaults to it, as
# `ddpo shapes eval` does to shapes_alignment's for the UNet; tests/test_shapes_flow.py keeps the two equal).
FLOW_EVAL_STEPS = 10
FLOW_EVAL_GUIDANCE = 2.0
FLOW_EVAL_ETA = 0.7


@dataclass
class FlowPretrainConfig:
    seed: int = 0
    # The UNet's dataset (PretrainConfig's defaults): same images, same skew, same rare pairs.
    rare_fraction: float = 0.001
    num_images: int = 40_000
    common_square_weight: int = 3
    p_uncond: float = 0.1
    # Training stops at flow_steps of a cosine schedule set for flow_schedule_steps: the whole 3000-step schedule
    # learns the rare pairs too (75% right), leaving RL nothing to fix; 1500 steps leave common pairs below 85%.
    flow_steps: int = 2000
    flow_schedule_steps: int = 3000
    flow_batch: int = 128
    flow_lr: float = 3e-3
    flow_shift: float = 1.0
    flow_layers: int = 4
    flow_heads: int = 8
    flow_head_dim: int = 8
    log_every: int = 50
    save_every: int = 500  # intermediate EMA pipelines work_dir/flow_pipeline_stepN (0: none)


def build_flow_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=CLIP_DIM, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    ))


def build_flow_transformer(num_layers: int = 4, heads: int = 8, head_dim: int = 8):
    """SD3Transformer2DModel on 8x8x4 latents: patch 1, 4 joint blocks, inner width 64; ~0.6M parameters.

    Initialised as DiT (Peebles & Xie 2023), which diffusers leaves to checkpoints: xavier-uniform linear layers,
    N(0, 0.02) timestep and text embedders, and adaLN-Zero: every block's modulation and the output layer start at
    zero, so each block starts as the identity."""
    import torch
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=JOINT_DIM,
        caption_projection_dim=head_dim * heads,
        pooled_projection_dim=JOINT_DIM, pos_embed_max_size=LATENT_SIZE, qk_norm="rms_norm",
    )
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if name.startswith("time_text_embed."):
                torch.nn.init.normal_(module.weight, std=0.02)
            elif ".norm1" in name or name in ("norm_out.linear", "proj_out"):
                torch.nn.init.zeros_(module.weight)
            else:
                torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return transformer


def build_flow_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_flow_vae(folder: str | Path):
    """The Shapes VAE with SD3's `shift_factor` (0.0: its latents are centred by the KL term, measured below 0.1)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    vae.register_to_config(shift_factor=0.0)
    return vae


def encode_text(text_encoder, text_encoder_2, ids, zero_tokens: int = T5_ZERO_TOKENS):
    """(embeds (B, 16 + zero_tokens, 64), pooled (B, 64)) exactly as StableDiffusion3Pipeline.encode_prompt makes
    them without T5: both CLIPs' penultimate hidden states side by side, then zero tokens; pooled projections side
    by side."""
    import torch

    out_1 = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids, output_hidden_states=True)
    clip = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    zeros = clip.new_zeros(clip.shape[0], zero_tokens, JOINT_DIM)
    return torch.cat([clip, zeros], dim=1), torch.cat([out_1[0], out_2[0]], dim=-1)


def train_flow(cfg: FlowPretrainConfig, work_dir: Path, vae_folder: Path | None = None) -> Path:
    """Train the two text encoders + transformer with rectified flow matching on the UNet's cached dataset.

    `vae_folder`: the Shapes VAE to encode with and ship (default: the shipped `shapes` pipeline's). Its encoder is
    the one the UNet's dataset was encoded with (the decoder stage freezes it), so the latents are the UNet's.
    Writes work_dir/flow_pipeline (EMA weights) and returns it.
    """
    import torch

    from ddpo.families.attention import RepeatedTokenAttnProcessor
    from ddpo.shapes import pipeline_path
    from ddpo.shapes.models import build_tokenizer
    from ddpo.shapes.pretrain import _cosine_lr, _log, encode_dataset, optimizer_step_with_ema
    from ddpo.shapes.world import RARE_PAIRS

    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / "flow_log.jsonl"
    torch.manual_seed(cfg.seed)
    vae = load_flow_vae(vae_folder or pipeline_path() / "vae")
    latents, prompts, scenes = encode_dataset(cfg, vae)
    _log(log, {"stage": "flow", "dataset": {"rare": sum((s.color, s.shape) in RARE_PAIRS for s in scenes),
                                            "total": len(scenes)}})
    tokenizer = build_tokenizer(work_dir / "flow_tokenizer")
    ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    prompt_ids, empty_ids = ids[:-1], ids[-1]
    text_encoder, text_encoder_2 = build_flow_text_encoder(len(tokenizer)), build_flow_text_encoder(len(tokenizer))
    transformer = build_flow_transformer(cfg.flow_layers, cfg.flow_heads, cfg.flow_head_dim)
    models = torch.nn.ModuleList([text_encoder, text_encoder_2, transformer])
    ema = copy.deepcopy(models).requires_grad_(False)
    ema_params = list(ema.parameters())
    transformer.set_attn_processor(RepeatedTokenAttnProcessor(T5_ZERO_TOKENS))
    params = list(models.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.flow_lr, weight_decay=0.01)
    schedule_steps = max(cfg.flow_schedule_steps, cfg.flow_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, schedule_steps, warmup=200))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    for step in range(cfg.flow_steps):
        idx = torch.randint(0, len(latents), (cfg.flow_batch,), generator=gen)
        x0, tokens = latents[idx], prompt_ids[idx].clone()
        tokens[torch.rand(cfg.flow_batch, generator=gen) < cfg.p_uncond] = empty_ids
        t = torch.sigmoid(torch.randn(cfg.flow_batch, generator=gen))  # logit-normal(0, 1), as SD3
        noise = torch.randn(x0.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1)
        noisy = (1 - tt) * x0 + tt * noise
        embeds, pooled = encode_text(text_encoder, text_encoder_2, tokens, zero_tokens=1)
        pred = transformer(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        loss = (pred - (noise - x0)).pow(2).mean()
        optimizer_step_with_ema(loss, opt, sched, params, ema_params, step)
        if step % cfg.log_every == 0 or step == cfg.flow_steps - 1:
            _log(log, {"stage": "flow", "step": step, "loss": loss.item(), "elapsed_s": round(time.time() - start, 1)})
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step != cfg.flow_steps - 1:
            save_flow_pipeline(work_dir / f"flow_pipeline_step{step + 1}", vae, ema, tokenizer, cfg.flow_shift)
    return save_flow_pipeline(work_dir / FLOW_PIPELINE, vae, ema, tokenizer, cfg.flow_shift)


def save_flow_pipeline(folder: Path, vae, models, tokenizer, shift: float) -> Path:
    """Save (text_encoder, text_encoder_2, transformer) = `models` as a StableDiffusion3Pipeline folder without T5."""
    from diffusers import StableDiffusion3Pipeline

    text_encoder, text_encoder_2, transformer = models
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_flow_scheduler(shift), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def assemble_flow(work_dir: Path, out_dir: Path, cfg: FlowPretrainConfig) -> Path:
    """Copy work_dir/flow_pipeline to out_dir/flow_pipeline and rewrite MANIFEST.json: the files already there keep
    their entries (their sha256 is recomputed from the unchanged files), the manifest's other keys are kept, and
    `flow_pretrain_config` is added."""
    from ddpo.shapes import MANIFEST, write_manifest
    from ddpo.shapes.pretrain import _drop_local_path

    src = work_dir / FLOW_PIPELINE
    if not src.exists():
        raise FileNotFoundError(f"{src} is missing: run the flow pretraining first")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / FLOW_PIPELINE, ignore_errors=True)
    shutil.copytree(src, out_dir / FLOW_PIPELINE)
    for config_file in (out_dir / FLOW_PIPELINE).rglob("config.json"):
        _drop_local_path(config_file)
    extra = {}
    if (out_dir / MANIFEST).is_file():
        extra = {k: v for k, v in json.loads((out_dir / MANIFEST).read_text()).items() if k != "files"}
    extra["flow_pretrain_config"] = asdict(cfg)
    write_manifest(out_dir, **extra)
    return out_dir / FLOW_PIPELINE
