"""Tiny random SD3, FLUX and SDXL pipelines built in code, for tests: the real component classes, tiny widths.

Each builder returns the real diffusers pipeline class with the real component classes, wired with the same
dimension rules as the released models, at a few hundred thousand parameters at most, so that every code path
that runs on SD3.5, FLUX.1 or SDXL runs here on a CPU in milliseconds. `sample_size` is the latent size; the
tiny VAEs have two blocks, so images are 2x the latents (the real VAEs: 8x).

- sd3:  StableDiffusion3Pipeline, SD3Transformer2DModel (2 layers, SD3.5-Medium-like), latents (16, s, s),
        CLIP-L-like 8 + CLIP-G-like 16 hidden (+ T5 d_model 32 with `with_t5=True`).
- flux: FluxPipeline, FluxTransformer2DModel (1 double + 1 single block), latents (16, s, s) packed into
        (s/2 * s/2, 64) tokens, CLIP 16 (pooled) + T5 d_model 32.
- sdxl: StableDiffusionXLPipeline, UNet2DConditionModel with text_time embeddings, latents (4, s, s),
        CLIP-L-like 8 + CLIP-G-like 16 hidden.

Loading a saved folder (`ddpo.tiny.save_tiny_pipeline(folder, family=...)`) with
`DiffusionPipeline.from_pretrained(folder, **kwargs)`:

- sd3 saved with `with_t5=False` (the default): `text_encoder_3=None, tokenizer_3=None` are REQUIRED (the folder's
  model_index.json lists them as null, and diffusers 0.42 raises ValueError without them). The pipeline then
  feeds zeros of (B, max_sequence_length, joint_attention_dim) in place of T5, as SD3 does without T5.
- sd3 saved with `with_t5=True`: no kwargs.
- flux (either `guidance_embeds`): no kwargs. When sampling, pass `height=width=2 * sample_size`: FluxPipeline's
  default size is 256 whatever the transformer (it has no sample_size), which works but is 256x slower.
- sdxl: no kwargs. (`add_watermarker=False` only matters where the invisible-watermark package is installed: the
  pipeline would then watermark its outputs.)

Gotchas these builders handle (diffusers 0.42.1, transformers 5): every tokenizer gets `model_max_length` (77 for
CLIP, 512 for T5; else OverflowError in truncation); the SD3 and FLUX VAEs carry `shift_factor` and
`scaling_factor` (else TypeError at decode: None - float); T5 tokenizers are `T5TokenizerFast` (an alias of
`T5Tokenizer` in transformers 5) built from an in-memory Unigram vocabulary, with no sentencepiece file.
"""

from __future__ import annotations

import string

# Unigram pieces of the tiny T5 tokenizer: pad, eos, unk (T5's ids 0, 1, 2), the word-start marker, characters.
_T5_CHARS = list(string.ascii_lowercase + string.digits + ".,'-!?")
T5_TINY_VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in _T5_CHARS]


def _clip_tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from ddpo.tiny import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp), model_max_length=77)


def _clip_config(hidden: int, hidden_act: str = "quick_gelu"):
    """CLIP-L uses quick_gelu, OpenCLIP bigG gelu; the projection is as wide as the hidden states (768, 1280)."""
    from transformers import CLIPTextConfig

    from ddpo.tiny import TINY_VOCAB_SIZE

    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=hidden, hidden_act=hidden_act,
    )


def _t5(d_model: int = 32):
    """A tiny T5 v1.1 encoder (gated-gelu, untied, as in SD3/FLUX's T5-XXL) and its T5TokenizerFast."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=list(T5_TINY_VOCAB), extra_ids=0, model_max_length=512)
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(T5_TINY_VOCAB), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    return encoder, tokenizer


def _flow_vae(sample_size: int, scaling_factor: float, shift_factor: float):
    """SD3/FLUX's VAE structure: 16 latent channels, no quant convs, a shift and a scale (2 blocks: 2x, not 8x)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=4,
        sample_size=sample_size * 2, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8, with_t5: bool = False):
    """A random StableDiffusion3Pipeline (SD3.5-Medium structure): latents (16, s, s), images (3, 2s, 2s).

    Transformer: 2 layers, 2 heads of 8 (inner 16), patch 2, qk_norm="rms_norm", dual attention in layer 0;
    joint_attention_dim 32 (T5's d_model; the CLIP hidden states 8 + 16 = 24 are zero-padded to it, as 768 + 1280
    to 4096), pooled_projection_dim 24 (CLIP projections 8 + 16, as 768 + 1280 = 2048). Scheduler: flow matching,
    shift 3.0. VAE: SD3's scaling_factor 1.5305 and shift_factor 0.0609. `sample_size` must be even (patch 2).
    Without T5 (the default) the folder it saves loads with `text_encoder_3=None, tokenizer_3=None`.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=24, pos_embed_max_size=sample_size, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = _flow_vae(sample_size, scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder = CLIPTextModelWithProjection(_clip_config(8))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, "gelu"))
    text_encoder_3, tokenizer_3 = _t5(32) if with_t5 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 8, guidance_embeds: bool = True):
    """A random FluxPipeline: latents (16, s, s) packed into (s/2 * s/2, 64) tokens, images (3, 2s, 2s).

    Transformer: 1 double-stream + 1 single-stream block, 2 heads of 16 (inner 32), axes_dims_rope (4, 6, 6) (sum
    = head dim, as 16 + 56 + 56 = 128), in_channels 64 = 4 x 16 latent channels, joint_attention_dim 32 (T5's
    d_model), pooled_projection_dim 16 (the CLIPTextModel's hidden size: FLUX pools CLIP-L's pooler_output, 768).
    `guidance_embeds=True` is FLUX.1-dev (guidance-distilled; scheduler with dynamic shifting, base_shift 0.5,
    max_shift 1.15, image_seq_len 256..4096); False is FLUX.1-schnell (its scheduler: shift 1.0, no dynamic
    shifting). VAE: FLUX's scaling_factor 0.3611 and shift_factor 0.1159. `sample_size` must be even.
    """
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _flow_vae(sample_size, scaling_factor=0.3611, shift_factor=0.1159)
    text_encoder = CLIPTextModel(_clip_config(16))
    text_encoder_2, tokenizer_2 = _t5(32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8):
    """A random StableDiffusionXLPipeline: latents (4, s, s), images (3, 2s, 2s).

    UNet: SDXL's block order (DownBlock2D then CrossAttnDownBlock2D), linear projections, cross_attention_dim 24 =
    CLIPTextModel 8 + CLIPTextModelWithProjection 16 (as 768 + 1280 = 2048); addition_embed_type "text_time" with
    addition_time_embed_dim 4 and projection_class_embeddings_input_dim 16 + 6 x 4 = 40 (as 1280 + 6 x 256 =
    2816). Scheduler: SDXL's EulerDiscreteScheduler config. VAE: 4 latent channels, scaling_factor 0.13025.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=4,
        sample_size=sample_size * 2, scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_clip_config(8))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, "gelu"))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False,
    )
