"""The Shapes text-to-image model's parts: a word-level CLIP tokenizer and tiny SD-shaped components.

Sizes are design constraints: the whole pipeline must train in well under an hour on two CPU cores,
ship in a few MB, and sample fast enough that DDPO runs hundreds of trajectories a minute.
Images are 64x64x3 and latents 8x8x4 (VAE downsampling factor 8, as in Stable Diffusion).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from ddpo.shapes.world import IMAGE_SIZE, VOCABULARY

LATENT_SIZE = 8
MAX_TOKENS = 16  # "a red circle on a blue background" is 9 tokens with <|startoftext|> and <|endoftext|>
TEXT_DIM = 64

_CHARS = list(string.ascii_lowercase + string.digits + ".,'-!?")


def write_word_tokenizer(folder: str | Path) -> Path:
    """Write a CLIP BPE vocabulary (vocab.json + merges.txt) in which each world word is one token.

    Characters (with and without the end-of-word mark) are in the vocabulary too, so an out-of-vocabulary
    prompt ("a pink dolphin") still tokenizes, into characters, rather than into unknown tokens.
    Merges build each word left to right; longer words' merges rank first so that a shorter word's
    merge (e.g. "g r" of "green") cannot fire inside a longer word ("background") and break its chain.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + _CHARS + [c + "</w>" for c in _CHARS]
    merges: list[str] = []
    for word in sorted(VOCABULARY, key=lambda w: (-len(w), w)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = f"{merged} {piece}"
            merged = merged + piece
            if pair not in merges:
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def load_tokenizer(folder: str | Path):
    """CLIPTokenizer from `folder`, checked: offline, a missing folder silently yields an empty tokenizer."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer in {folder} splits the world word {word!r} into {ids}; rebuild it")
    return tokenizer


def build_tokenizer(tmp_folder: str | Path):
    return load_tokenizer(write_word_tokenizer(tmp_folder))


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def build_vae():
    """AutoencoderKL 64x64x3 -> 8x8x4; narrow at full resolution because flat colours need little capacity."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )


def build_unet():
    """UNet2DConditionModel on 8x8x4 latents, ~1M parameters; cross-attention only at 4x4, where it is cheap."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=16, norm_num_groups=16,
    )


def build_scheduler():
    """Stable Diffusion's DDIM configuration: the trainer's log-probabilities assume exactly this family."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
