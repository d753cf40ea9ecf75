"""The denoiser sharded across processes with FSDP2 (torch's `fully_shard`), for models that do not fit on one card.

Switch: the environment that `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets
(`ACCELERATE_USE_FSDP=true`, `FSDP_VERSION=2`, and optionally `FSDP_TRANSFORMER_CLS_TO_WRAP`,
`FSDP_RESHARD_AFTER_FORWARD`, `FSDP_OFFLOAD_PARAMS`); under torchrun, set those variables yourself. See
docs/multi_gpu.md.

ddpo applies `fully_shard` itself rather than letting accelerate's FSDP plugin do it: accelerate turns its FSDP
mode on only for GPU-class devices (on CPU processes it stays plain multi-CPU and ignores the plugin), so its path
could not be run by the CPU tests. Here the same code runs on gloo CPU processes and on NCCL GPUs: accelerate is
kept in its plain multi-process mode (`plain_accelerate_env`) and is never handed the denoiser (it would wrap it in
DDP); it still prepares the optimizer, autocast, gathers and reductions.

What sharding changes, and where:
- each block named by `FSDP_TRANSFORMER_CLS_TO_WRAP` (default: the model's `_no_split_modules`, e.g.
  JointTransformerBlock for SD3, FluxTransformerBlock and FluxSingleTransformerBlock for FLUX) and then the whole
  denoiser become FSDP units; every parameter becomes a DTensor holding 1/N of its rows (`shard_denoiser`);
- checkpoints are the same files as without sharding: the trained weights and the optimizer moments are gathered
  into full tensors on the main process (`gather_state_dict`, `gather_optimizer_state`) and, on resume, every
  process loads the full files and keeps its own rows (`full_state_dict_io`, `shard_optimizer_state`). So a
  checkpoint resumes with or without sharding and on any number of processes;
- the finiteness check before saving looks at each process's shard and agrees across processes (`all_sum`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("ddpo")

_TRUE = ("1", "true", "yes")


def requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate's FSDP config, or the same variables set by hand)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in _TRUE:
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        from ddpo.config import ConfigError

        raise ConfigError(f"FSDP_VERSION={version}: ddpo shards with FSDP2 only; set fsdp_version: 2 in the accelerate "
                          "config (see configs/accelerate/fsdp.yaml) or FSDP_VERSION=2")
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def plain_accelerate_env():
    """accelerate's own FSDP mode off while the Accelerator is built: ddpo shards the denoiser itself."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def check_config(grammar, config, num_processes: int) -> None:
    """Refuse what sharding cannot run (ConfigError), before the denoiser is sharded."""
    from ddpo.config import ConfigError
    from ddpo.rollout import evaluation_images

    # Every process must run the denoiser as often as the others (each forward gathers the shards from all).
    if config.prompts.eval_every and len(evaluation_images(grammar, config)) < num_processes:
        raise ConfigError(f"prompts.eval_num_prompts={config.prompts.eval_num_prompts} x "
                          f"prompts.eval_images_per_prompt={config.prompts.eval_images_per_prompt} gives fewer "
                          f"evaluation images than the {num_processes} processes sharing the sharded denoiser (FSDP): "
                          "each needs one; raise either or set prompts.eval_every=0")
    if config.model.mixed_precision == "fp16":  # the GradScaler would decide to skip a step on each shard alone
        raise ConfigError("model.mixed_precision=fp16 is not supported with FSDP; use bf16")
    # fully_shard refuses non-contiguous (channels_last) parameters; after Module.compile() FSDP's hooks would run
    # inside the compiled call, which was never tried: both are refused here, before any weight loads.
    for key in ("compile", "channels_last"):
        if getattr(config.model, key):
            raise ConfigError(f"model.{key}=true is not supported with FSDP sharding; set model.{key}=false")


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _wrap_classes(model: torch.nn.Module) -> set[str]:
    names = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    present = {type(m).__name__ for m in model.modules()}
    if not names:
        return set(getattr(model, "_no_split_modules", None) or []) & present
    missing = [n for n in names if n not in present]
    if missing:
        from ddpo.config import ConfigError

        raise ConfigError(f"FSDP_TRANSFORMER_CLS_TO_WRAP (fsdp_transformer_layer_cls_to_wrap) names {missing}, which "
                          f"the {type(model).__name__} does not contain; leave it unset to shard the model's "
                          f"{getattr(model, '_no_split_modules', None)}")
    return set(names)


def shard_denoiser(model: torch.nn.Module, device: torch.device, mixed_precision: str, use_lora: bool) -> list:
    """fully_shard the wrap classes' blocks (innermost first), then the whole model, over all processes; moves the
    shards to `device`. Returns the trainable parameters (now DTensors) in `model.parameters()` order, the order the
    unsharded trainer gives its optimizer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in _TRUE:
        logger.warning("fsdp_activation_checkpointing is ignored: set model.gradient_checkpointing=true (the "
                       "denoiser's own checkpointing, which works under sharding)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    # LoRA: the frozen weights are already in the autocast dtype and the fp32 LoRA weights are gathered as they are
    # (autocast computes as without sharding). Full finetuning: the fp32 weights are gathered in the autocast dtype
    # (half the traffic and memory). Gradients are reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=None if use_lora else low, reduce_dtype=torch.float32 if low else None)
    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE
    kwargs = {"mesh": mesh, "mp_policy": policy, "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
              "reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in _TRUE}
    classes = _wrap_classes(model)
    blocks = [m for m in reversed(list(model.modules())) if type(m).__name__ in classes and m is not model]
    for block in blocks:  # innermost first: an outer unit then manages only what its inner units do not
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if dist.get_rank() == 0:
        print(f"FSDP: {unsharded_class_name(model)} sharded over {dist.get_world_size()} processes ({len(blocks)} "
              f"{'/'.join(sorted(classes))} blocks and the rest)", flush=True)
    return [p for p in model.parameters() if p.requires_grad]


def is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _full_cpu(value: Any, keep: bool) -> Any:
    """A DTensor gathered (every process must call this, in the same order); on CPU where `keep`, else None."""
    if is_dtensor(value):
        value = value.full_tensor()
    if not torch.is_tensor(value):
        return value
    return value.detach().cpu() if keep else None


def gather_state_dict(model: torch.nn.Module, trainable_only: bool, keep: bool) -> dict | None:
    """The sharded model's full state dict (every process calls this; the one with `keep` gets it, on CPU): only
    the trainable parameters (LoRA) or every entry (full finetuning). Gathered one tensor at a time."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    out = {}
    for name, value in model.state_dict().items():
        if names is None or name in names:
            out[name] = _full_cpu(value, keep)
    return out if keep else None


def gather_optimizer_state(optimizer, keep: bool) -> dict | None:
    """The optimizer's `state_dict()` with every DTensor moment gathered: the same format (integer parameter ids,
    full tensors) as an unsharded run writes. Every process calls this; the one with `keep` gets it."""
    state = optimizer.state_dict()
    gathered = {i: {k: _full_cpu(v, keep) for k, v in sorted(entry.items())}
                for i, entry in sorted(state["state"].items())}
    return {"state": gathered, "param_groups": state["param_groups"]} if keep else None


def gather_checkpoint(model: Any, optimizer, use_lora: bool, keep: bool) -> tuple[dict | None, dict | None]:
    """(full weights, full optimizer state) of a sharded model, kept by the process with `keep` (every process
    calls this); (None, None) for an unsharded one, whose state dicts are already full."""
    if not is_sharded(model):
        return None, None
    return gather_state_dict(model, trainable_only=use_lora, keep=keep), gather_optimizer_state(optimizer, keep=keep)


def _params_by_id(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A full optimizer state (any run's `optimizer.pt`) cut to this process's rows of each DTensor parameter."""
    params = _params_by_id(optimizer)
    out = {}
    for i, entry in state["state"].items():
        p = params[int(i)]
        out[i] = {k: _shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.dim() else v
                  for k, v in entry.items()}
    return {"state": out, "param_groups": state["param_groups"]}


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every process) as a DTensor laid out like `param`: no communication."""
    from torch.distributed.tensor import distribute_tensor

    if not is_dtensor(param):
        return full
    return distribute_tensor(full.to(device=param.device), param.device_mesh, param.placements, src_data_rank=None)


def nonfinite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor: does it hold NaN/inf? For DTensors each process checks its rows and all processes agree."""
    flags = [int(not bool(torch.isfinite(local(t.detach())).all())) for t in tensors]
    if any(is_dtensor(t) for t in tensors):
        flags = all_sum(flags)
    return [f > 0 for f in flags]


def all_sum(values: list[int]) -> list[int]:
    """Sums over processes (gloo or NCCL); `values` unchanged without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = "cuda" if "nccl" in str(dist.get_backend()) and torch.cuda.is_available() else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@contextlib.contextmanager
def full_state_dict_io(model: torch.nn.Module, gathered: dict | None):
    """Within the block a sharded `model` reads and writes full tensors, so that code written for an unsharded model
    (peft's LoRA state dict, diffusers' `save_pretrained`, `load_state_dict`) works unchanged: `state_dict()`
    returns `gathered` (from `gather_state_dict`; None: the sharded state dict) and `load_state_dict(full)` keeps
    this process's rows of each tensor. An unsharded model is left alone."""
    if not is_sharded(model):
        yield
        return
    load, sharded_state_dict = model.load_state_dict, model.state_dict
    layouts = dict(sharded_state_dict())  # DTensors: no communication

    def state_dict(*args, **kwargs):  # without `gathered` (loading): the DTensors, for key and shape checks
        return dict(gathered) if gathered is not None else sharded_state_dict(*args, **kwargs)

    def load_state_dict(state, strict: bool = True, assign: bool = False):
        state = {k: _shard_like(v, layouts[k]) if k in layouts else v for k, v in state.items()}
        return load(state, strict=strict)  # in place (never `assign`): FSDP keeps its views of the shards

    model.state_dict, model.load_state_dict = state_dict, load_state_dict
    try:
        yield
    finally:
        del model.state_dict, model.load_state_dict


def unsharded_class_name(model: torch.nn.Module) -> str:
    """The model's own class name (fully_shard makes the instance an `FSDP<Name>` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def fix_saved_class_name(model: torch.nn.Module, folder: Path) -> None:
    """diffusers' `save_pretrained` writes `type(model).__name__` into config.json: the unsharded name instead."""
    path = folder / "config.json"
    if is_sharded(model) and path.is_file():
        config = json.loads(path.read_text())
        config["_class_name"] = unsharded_class_name(model)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
