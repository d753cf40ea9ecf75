"""`train.timesteps_per_call=auto`: the most timesteps per denoiser call whose activations fit a memory budget.

A K-step call keeps K steps' activations alive until its backward, so the choice is
`clamp(floor(budget / per_step_bytes), 1, steps_per_sample)`. `per_step_bytes` is measured, not estimated, on any
device: the bytes of the tensors autograd saves for backward during the DDPO chunk loss of one micro-batch, at
one and at two timesteps per call (the difference is one step's share; what does not grow with K, such as
autocast's copies of the weights, cancels out). The probe builds no graph that outlives it and takes no backward:
its saved tensors are dropped as they are packed, so it costs two forward passes (one and two steps) of one
micro-batch and about one step's transient memory, leaves no gradient, and runs with the random number generators
forked so training draws exactly what it would have drawn without it.

The budget, `train.activation_memory_gib`: a number of GiB, or "auto": on CUDA `CUDA_SHARE` of the memory this
process could still allocate (free device memory plus the allocator's cached, unused blocks) less the gradients and
AdamW moments the first optimizer step will allocate; on a CPU `CPU_SHARE` of the available RAM, at most
`CPU_CAP_GIB` (RAM is shared with the reward worker and other processes, and on a CPU calls of a few GiB of
activations already amortise the per-call overhead). What the share leaves free covers the backward's own
transient tensors (activation gradients, workspaces). On a CPU the measure matched the resident memory that a
`shapes_alignment` micro-batch's graph holds (1, 2 and 10 steps per call) to about 1%.

The choice is made once per model and settings (the first update) and cached; every process takes the smallest
of all processes' choices, so DDP and FSDP ranks make the same calls. A checkpoint records the choice
(`timesteps_per_call` in trainer_state.json) and a resumed run takes it without measuring, so the resume is exact. A gradient-checkpointed
denoiser saves only its segments' inputs, so the measure leaves out the one segment that backward recomputes at
a time.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch

logger = logging.getLogger("ddpo")

GIB = 2**30
CUDA_SHARE = 0.5  # of the memory still free on the GPU
CPU_SHARE = 0.25  # of the available RAM
CPU_CAP_GIB = 4.0

# model -> {settings key: chosen timesteps per call}; weak, so a model's choices go with it.
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> the value a resumed run's checkpoint recorded: used instead of measuring, so the resume is exact.
_PINNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chosen_timesteps(model) -> int | None:
    """The timesteps per call auto last chose (or was pinned to) for `model`; None before its first update."""
    if model is None:
        return None
    if model in _PINNED:
        return _PINNED[model]
    choices = list(_CHOSEN.get(model, {}).values())
    return choices[-1] if choices else None


def pin_timesteps(model, value: int | None) -> None:
    """Make auto use `value` for `model` without measuring: a resumed run takes the choice its checkpoint
    recorded, because another free-memory figure could choose another value and change the float rounding."""
    if value is not None:
        _PINNED[model] = int(value)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs (each storage counted once,
    whole: a saved view keeps all of it alive). The saved tensors are released as they are packed (the graph
    keeps a placeholder), so the result of `fn` must not be backpropagated; it is discarded here.

    A released storage's address is soon reused by another, so a storage is "seen" only while it is alive: a
    weak reference to it (PyTorch keeps one Python object per live storage) tells the two apart."""
    seen: dict[tuple, weakref.ref] = {}
    total = 0

    def pack(tensor: torch.Tensor) -> None:
        nonlocal total
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without a plain storage: its own size
            total += tensor.numel() * tensor.element_size()
            return None
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen or seen[key]() is not storage:
            total += storage.nbytes()
            seen[key] = weakref.ref(storage)
        return None

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("ddpo.memory.saved_bytes: the probe's graph cannot be backpropagated")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = fn()
    del result
    return total


def choose_timesteps(budget_bytes: float, per_step_bytes: int, steps_per_sample: int) -> int:
    """clamp(floor(budget / per_step), 1, steps_per_sample): at least one step per call, at most all of them."""
    if per_step_bytes <= 0:  # nothing saved for backward (nothing trainable reached): memory does not limit K
        return steps_per_sample
    return max(1, min(steps_per_sample, int(budget_bytes // per_step_bytes)))


def budget_bytes(setting: float | str, device: torch.device, params: list[torch.Tensor],
                 optimizer_has_state: bool) -> tuple[float, str]:
    """(bytes timesteps_per_call=auto may fill, how they were chosen) for `train.activation_memory_gib`."""
    if setting != "auto":
        return float(setting) * GIB, f"train.activation_memory_gib={setting:g}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        # Before the first optimizer step the gradients and AdamW's two fp32 moments do not exist yet.
        pending = 0 if optimizer_has_state else sum(p.numel() * (p.element_size() + 8) for p in params)
        usable = max(0, free + cached - pending)
        return CUDA_SHARE * usable, (f"{CUDA_SHARE:g} of {usable / GIB:.2f} GiB free on {device} after the "
                                     "optimizer's gradients and moments")
    available = _available_ram()
    share = min(CPU_SHARE * available, CPU_CAP_GIB * GIB)
    return share, f"{CPU_SHARE:g} of {available / GIB:.2f} GiB available RAM, at most {CPU_CAP_GIB:g} GiB"


def _available_ram() -> int:
    """Bytes of RAM available to new allocations (psutil, else /proc/meminfo's MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def per_step_bytes(chunk_loss: Callable[[int], object]) -> int:
    """Bytes one more timestep per call saves for backward.

    `chunk_loss(k)` runs the loss of one micro-batch at k timesteps per sample. Measured at k = 1 and 2: the
    difference is one step's share; should it not be positive (nothing grows with k), one step's whole."""
    one, two = saved_bytes(lambda: chunk_loss(1)), saved_bytes(lambda: chunk_loss(2))
    return two - one if two > one else one


def resolve_timesteps_per_call(model, key: tuple, steps_per_sample: int, chunk_loss: Callable[[int], object],
                               accelerator, params: list[torch.Tensor], optimizer_has_state: bool,
                               setting: float | str) -> int:
    """Timesteps per call for `train.timesteps_per_call=auto`, measured on the first call for this `model` and
    `key` (the settings the measure depends on) and cached; the same on every process (their minimum).

    `chunk_loss(k)`: the DDPO loss of one micro-batch at k timesteps per sample, run as training runs it (under
    autocast). Every process must call this together (it gathers)."""
    if model in _PINNED:
        return _PINNED[model]
    cached = _CHOSEN.get(model, {})
    if key in cached:
        return cached[key]
    if steps_per_sample == 1:
        chosen, per_step, budget, how = 1, 0, 0.0, "one trained step per sample"
    else:
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # dropout and the like draw here, not from training's stream
            per_step = per_step_bytes(chunk_loss)
        budget, how = budget_bytes(setting, accelerator.device, params, optimizer_has_state)
        local = choose_timesteps(budget, per_step, steps_per_sample)
        everyone = accelerator.gather(torch.tensor([local], device=accelerator.device))
        chosen = int(everyone.min())
    logger.info("train.timesteps_per_call=auto: %d of %d trained steps per call (one step of a micro-batch saves "
                "%.1f MiB for backward; budget %.2f GiB: %s)", chosen, steps_per_sample, per_step / 2**20,
                budget / GIB, how)
    _CHOSEN.setdefault(model, {})[key] = chosen
    return chosen
