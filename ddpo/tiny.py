"""Tiny random Stable Diffusion components built in code, for tests and benchmarks.

The pipeline has the exact structure of Stable Diffusion (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDIMScheduler) at a few thousand parameters, so every code path
that runs on SD 1.5 runs here on a CPU in milliseconds. `save_tiny_pipeline` writes a standard
diffusers folder, so tests also exercise the real `from_pretrained` loading code.

The other families (SD3, FLUX, SDXL) are built in `ddpo/tiny_families.py` and re-exported here;
`save_tiny_pipeline(folder, family=...)` saves any of them.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from ddpo.tiny_families import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline


_CHARS = list(string.ascii_lowercase + string.digits + ".,'-!?")
TINY_VOCAB_SIZE = 2 + 2 * len(_CHARS)


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write a character-level CLIP BPE vocabulary (vocab.json + merges.txt) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + _CHARS + [c + "</w>" for c in _CHARS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def build_tiny_pipeline(seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon",
                        channels: tuple[int, int] = (8, 16), cross_attention_dim: int = 16):
    """A random StableDiffusionPipeline: latents (4, sample_size, sample_size), images 2x larger.

    `channels` (the UNet's two block widths) and `cross_attention_dim` scale it up for benchmarks.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp), model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0, family: str = "sd", **kwargs) -> Path:
    """Build a tiny pipeline of `family` and save it as a standard diffusers folder (model_index.json + safetensors).

    family -> builder (kwargs go to it) -> what `DiffusionPipeline.from_pretrained(folder, ...)` then needs:

    - "sd":   `build_tiny_pipeline` (sample_size, prediction_type, channels, cross_attention_dim) -> nothing.
              Without `family` this writes exactly the weights it always wrote for the same arguments.
    - "sd3":  `build_tiny_sd3_pipeline` (sample_size, with_t5=False) -> with_t5=False (the default):
              `text_encoder_3=None, tokenizer_3=None` (else ValueError); with_t5=True: nothing.
    - "flux": `build_tiny_flux_pipeline` (sample_size, guidance_embeds=True) -> nothing. FluxPipeline's default
              image size is 256 whatever the model: pass height/width (2 x sample_size) when sampling.
    - "sdxl": `build_tiny_sdxl_pipeline` (sample_size) -> nothing.
    """
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; one of {sorted(TINY_BUILDERS)}")
    folder = Path(folder)
    TINY_BUILDERS[family](seed=seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder


TINY_BUILDERS = {"sd": build_tiny_pipeline, "sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline,
                 "sdxl": build_tiny_sdxl_pipeline}
