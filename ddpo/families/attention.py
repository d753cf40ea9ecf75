"""Exact attention over repeated text tokens, for SD3-style joint attention (SD3, SD3.5, `shapes-flow`).

Without T5, `StableDiffusion3Pipeline.encode_prompt` appends `max_sequence_length` (256) zero tokens to the CLIP
tokens. SD3 adds no positional embedding to text tokens, so those tokens stay identical through every layer (every
text-side operation is per token), and softmax attention over n identical keys and values equals attention over one
copy whose score is raised by log n:

    sum_j e^{s_j} v_j over n equal (s, v)  =  e^{s + log n} v.

`RepeatedTokenAttnProcessor` is diffusers' `JointAttnProcessor2_0` with that bias on the last text token, so a
sequence of CLIP tokens + ONE zero token computes what CLIP tokens + 256 zero tokens compute (the image tokens' and
the CLIP tokens' outputs; the one kept zero token's output is each copy's). With `copies` 1, or on a self-attention
without text (SD3.5's `attn2` in dual-attention blocks), it is `JointAttnProcessor2_0` itself, so a pipeline that
carries it and is called without `text_copies` runs exactly as diffusers' standard processor does.

Processors are not saved: `save_pretrained` writes config and weights only and LoRA files hold peft's weights, so
no folder or checkpoint ever records this one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

TEXT_COPIES_KWARG = "text_copies"  # the key in the transformer's `joint_attention_kwargs`


class RepeatedTokenAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (0.42) for a sequence whose last text token stands for `copies` identical
    tokens: its attention score is raised by log(copies), which is exactly attention over the copies (the same
    outputs in exact arithmetic; float rounding differs).

    `copies` is the default; a call's `text_copies` (from the transformer's `joint_attention_kwargs`) overrides it.
    The bias log(copies) is rounded to the compute dtype, as the scores are: log 256 = 5.5452 becomes 5.5312 in
    bfloat16 (the copies weigh 1.4% less), 5.5469 in float16 (0.17% more); float32 is exact to 1e-7."""

    def __init__(self, copies: int = 1):
        if copies < 1:
            raise ValueError(f"copies={copies}: a token stands for at least one copy")
        self.copies = copies
        self._standard = None  # diffusers' JointAttnProcessor2_0, for calls without repeated tokens

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, text_copies: int | None = None, *args, **kwargs):
        """hidden_states (B, N_img, C), encoder_hidden_states (B, N_txt, C_ctx) or None -> (image (B, N_img, C),
        text (B, N_txt, C_ctx)), or the image part alone without text, as JointAttnProcessor2_0 returns."""
        copies = self.copies if text_copies is None else text_copies
        if encoder_hidden_states is None or copies == 1:
            return self._standard_processor()(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is not None:  # a mask over the full sequence has no meaning for the shortened one
            raise ValueError("RepeatedTokenAttnProcessor: an attention mask cannot be combined with repeated text "
                             f"tokens ({copies} copies); call the transformer without text_copies")
        return _repeated_token_attention(attn, hidden_states, encoder_hidden_states, math.log(copies))

    def _standard_processor(self):
        if self._standard is None:  # built on first use: its constructor checks for SDPA, as diffusers' does
            from diffusers.models.attention_processor import JointAttnProcessor2_0

            self._standard = JointAttnProcessor2_0()
        return self._standard


def _repeated_token_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                              log_copies: float) -> tuple[torch.Tensor, torch.Tensor]:
    """JointAttnProcessor2_0's joint attention with log_copies added to the last key's score. The operations and
    their order are the pretraining's (tests/test_shapes_flow.py pins its losses bit for bit): do not reorder."""
    import torch.nn.functional as F

    batch, n_image = hidden_states.shape[0], hidden_states.shape[1]

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, H * D) -> (B, H, N, D)
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
    value = heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text_q = heads(attn.add_q_proj(encoder_hidden_states))
    text_k = heads(attn.add_k_proj(encoder_hidden_states))
    text_v = heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        text_q = attn.norm_added_q(text_q)
    if attn.norm_added_k is not None:
        text_k = attn.norm_added_k(text_k)
    query, key, value = torch.cat([query, text_q], 2), torch.cat([key, text_k], 2), torch.cat([value, text_v], 2)
    bias = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)  # (1, N_img + N_txt), broadcast
    bias[:, -1] = log_copies
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1])
    hidden_states, encoder_hidden_states = out[:, :n_image], out[:, n_image:]
    if not attn.context_pre_only:  # the last SD3 block keeps no text output (diffusers: to_add_out is None there)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    return hidden_states, encoder_hidden_states


def use_repeated_tokens(model: torch.nn.Module) -> bool:
    """Give `model`'s attention modules (a transformer, or DDP/compiled wrappers of one) RepeatedTokenAttnProcessor
    where they have diffusers' standard JointAttnProcessor2_0; idempotent, cheap enough per call (one pass over the
    modules: a model whose denoiser was swapped, or whose processors were reset, is caught on its next call).

    Returns True when every attention module then takes `text_copies`; False when some carry another processor
    (xformers, fused projections, a user's own): the caller must then feed the full sequence, which they compute
    as they always did. Nothing is changed on a False model beyond the standard processors replaced (harmless:
    without `text_copies` they compute the same)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    every, shared = True, None
    for module in model.modules():
        processor: Any = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if type(processor) is JointAttnProcessor2_0:
            shared = shared or RepeatedTokenAttnProcessor()  # stateless per call: one instance serves all modules
            module.set_processor(shared)
        elif not isinstance(processor, RepeatedTokenAttnProcessor):
            every = False
    return every
