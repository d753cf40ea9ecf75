"""Preparing a family's denoiser for training (LoRA or full finetuning, attention backend) and saving its weights.

Loading a model is `ddpo.families.load_family`; this module adds what training needs on top of it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ddpo.families import ModelLoadError, load_family  # noqa: F401  (re-exported: the loading errors live there)

logger = logging.getLogger(__name__)


def prepare_denoiser(model: Any, *, use_lora: bool, rank: int, alpha: int, target_modules: list[str],
                     gradient_checkpointing: bool, attention: str) -> list:
    """Freeze the denoiser (UNet or transformer), add LoRA adapters (or unfreeze all for full finetuning);
    return the trainable parameters."""
    model.requires_grad_(False)
    if attention == "xformers":
        _enable_xformers(model)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if not use_lora:
        model.requires_grad_(True)
        return list(model.parameters())
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=target_modules))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        from ddpo.config import ConfigError

        raise ConfigError(f"model.lora_target_modules={target_modules} matched no module of the "
                          f"{type(model).__name__}; its attention projections are to_q, to_k, to_v, to_out.0 "
                          "(and add_q_proj, add_k_proj, add_v_proj, to_add_out in SD3 and FLUX transformers)")
    return trainable


def _enable_xformers(model: Any) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        logger.warning("model.attention=xformers but xformers is not installed or there is no CUDA: "
                       "using PyTorch scaled-dot-product attention instead")
        return
    model.enable_xformers_memory_efficient_attention()


def save_trained_weights(family, model: Any, folder: Path, use_lora: bool, gathered: dict | None = None) -> None:
    """LoRA -> `pytorch_lora_weights.safetensors` (diffusers format, `pipe.load_lora_weights(folder)` loads it);
    full finetuning -> a `unet/` or `transformer/` folder (the family's denoiser).

    A denoiser sharded with FSDP (ddpo/sharding.py) writes `gathered`, its full state from
    `sharding.gather_state_dict`: the same files as an unsharded one."""
    from ddpo import sharding

    with sharding.full_state_dict_io(model, gathered):
        if not use_lora:
            model.save_pretrained(folder / family.denoiser_attr, safe_serialization=True)
            sharding.fix_saved_class_name(model, folder / family.denoiser_attr)
            return
        family.save_lora(model, folder)


def load_trained_weights(family, model: Any, folder: Path, use_lora: bool) -> None:
    """Load weights written by `save_trained_weights` into a denoiser prepared with the same LoRA settings (sharded
    or not: a sharded one keeps its rows of the full tensors)."""
    from safetensors.torch import load_file

    from ddpo import sharding

    with sharding.full_state_dict_io(model, None):
        if not use_lora:
            state: dict = {}
            for file in sorted((folder / family.denoiser_attr).glob("*.safetensors")):  # one file, or shards
                state.update(load_file(file))
            model.load_state_dict(state, strict=True)
            return
        family.load_lora(model, folder)
