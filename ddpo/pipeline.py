"""Loading a Stable Diffusion pipeline for DDPO: resolve the model name, DDIM scheduler, LoRA, attention backend."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to pass a local folder."""


def load_pipeline(name: str, revision: str | None = None):
    """Load `name` as a `StableDiffusionPipeline` with a `DDIMScheduler` (the policy DDPO trains).

    `name` is a local diffusers folder, a hub id, "shapes" (the model shipped in this package) or
    "tiny-random" (a random few-thousand-parameter pipeline built in code, for smoke tests).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if not sys.stderr.isatty():  # see ddpo/__init__.py: no loading bars in a redirected log
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    if name == "tiny-random":
        from ddpo.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0)
    else:
        path = _resolve(name)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, revision=revision, safety_checker=None,
                                                           requires_safety_checker=False)
        except (OSError, ValueError, EnvironmentError) as err:
            raise ModelLoadError(_load_hint(name, err)) from err
    if len(pipe.tokenizer) <= len(set(pipe.tokenizer.all_special_tokens)):
        raise ModelLoadError(f"the tokenizer of {name!r} is empty: its tokenizer/ folder is missing or unreadable "
                             "(with HF_HUB_OFFLINE=1, transformers returns an empty tokenizer instead of failing)")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _resolve(name: str) -> str:
    if name == "shapes":
        from ddpo.shapes import pipeline_path

        try:
            return str(pipeline_path())
        except FileNotFoundError as err:  # missing or corrupt shipped weights: the message says how to rebuild
            raise ModelLoadError(str(err)) from None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder: it has no model_index.json "
                                 "(save one with `pipe.save_pretrained(folder)`)")
        return str(path)
    return name


def _load_hint(name: str, err: Exception) -> str:
    return (f"could not load the model {name!r}: {type(err).__name__}: {err}\n"
            f"If this is a hub id and this machine is offline (HF_HUB_OFFLINE=1) or the model is not cached, "
            f"download it where there is internet, e.g. `huggingface-cli download {name} --local-dir ./models/sd`, "
            f"copy the folder here and pass model.pretrained=./models/sd (any local diffusers folder with a "
            f"model_index.json works). For an offline model that ships with ddpo, use model.pretrained=shapes.")


def prepare_unet(unet: Any, *, use_lora: bool, rank: int, alpha: int, target_modules: list[str],
                 gradient_checkpointing: bool, attention: str) -> list:
    """Freeze the UNet, add LoRA adapters (or unfreeze all for full finetuning); return the trainable parameters."""
    unet.requires_grad_(False)
    if attention == "xformers":
        _enable_xformers(unet)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if not use_lora:
        unet.requires_grad_(True)
        return list(unet.parameters())
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        from ddpo.config import ConfigError

        raise ConfigError(f"model.lora_target_modules={target_modules} matched no module of the UNet; "
                         "Stable Diffusion's attention projections are to_q, to_k, to_v, to_out.0")
    return trainable


def _enable_xformers(unet: Any) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        logger.warning("model.attention=xformers but xformers is not installed or there is no CUDA: "
                       "using PyTorch scaled-dot-product attention instead")
        return
    unet.enable_xformers_memory_efficient_attention()


def save_trained_weights(unet: Any, folder: Path, use_lora: bool) -> None:
    """LoRA -> `pytorch_lora_weights.safetensors` (diffusers format); full finetuning -> a `unet/` folder."""
    if not use_lora:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        return
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


def load_trained_weights(unet: Any, folder: Path, use_lora: bool) -> None:
    """Load weights written by `save_trained_weights` into a UNet prepared with the same LoRA settings."""
    from safetensors.torch import load_file

    if not use_lora:
        state = load_file(next((folder / "unet").glob("*.safetensors")))
        unet.load_state_dict(state, strict=True)
        return
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = load_file(folder / "pytorch_lora_weights.safetensors")
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        from ddpo.checkpoint import CheckpointError

        raise CheckpointError(f"{folder}: LoRA weights have keys this UNet does not: {result.unexpected_keys[:3]}...")
