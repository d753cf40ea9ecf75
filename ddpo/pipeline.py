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


# torch.compile's backend for model.compile. The tests swap in "aot_eager" (the same graph capture and autograd,
# no code generation) to check checkpoints, resume and the KL reference of a compiled denoiser on a CPU.
COMPILE_BACKEND = "inductor"


def speed_options(model: Any, device: Any, *, compile: bool, channels_last: bool) -> None:
    """`model.compile` and `model.channels_last`, applied in place to a denoiser whose LoRA adapters are attached
    (so that their weights are converted and compiled too) and whose trainable weights are already float32.

    channels_last: the 4-D (convolution) weights in NHWC memory format; cuDNN and oneDNN then compute each
    convolution in NHWC, so the activations take it on from the first one without converting the inputs.
    compile: `Module.compile()` compiles the module's call in place, unlike `torch.compile(module)`, whose
    wrapper would prefix every state_dict key with `_orig_mod.` (breaking checkpoints and LoRA files) and hide
    `disable_adapters` (the KL reference) behind another object. DDP (several GPUs; not yet tried with compile)
    calls the module it wraps as usual, so it runs the compiled call."""
    import torch

    if compile and COMPILE_BACKEND == "inductor" and torch.device(device).type != "cuda":
        from ddpo.config import ConfigError

        # Found on torch 2.13.0+cpu (AMD EPYC): the compiled tiny UNet's forward matched eager, but the gradients of
        # every weight before the first up block's upsampler were wrong (the mid block's all zero), with or without
        # LoRA; backend aot_eager_decomp_partition was right, so inductor's CPU code is at fault. Refused rather
        # than trained on silently (tests/test_speed_options.py checks that the bug is still there).
        raise ConfigError(f"model.compile=true is for CUDA runs (this run trains on {device}): on a CPU, torch's "
                          "inductor computed wrong gradients for the diffusers UNet (forward right, backward wrong), "
                          "and no other device was checked. Set model.compile=false")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(backend=COMPILE_BACKEND)


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
