"""Host -> device copies that do not stall the host on CUDA.

A plain `tensor.to("cuda")` from ordinary (pageable) CPU memory ends with a stream synchronisation: the Python
thread waits until the GPU has finished every kernel queued before the copy, so it cannot queue the next ones
meanwhile. From pinned (page-locked) memory with `non_blocking=True` the copy is queued like a kernel and the
host goes on. The sampling loop and the update make such copies every step (initial noise, step indices,
scheduler tables, token ids), hence this helper.

Host -> device only: a non-blocking device -> host copy would need a synchronisation before the host (numpy, a
reward) reads it, and the pipeline's device -> host copies (decoded images, statistics) are read at once.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor.to(device)`; a CPU tensor bound for a CUDA device is copied from pinned memory, non-blocking.

    Anywhere else (a CPU-only run, a tensor already on the device) this is exactly `tensor.to(device)`. An
    unpinned `tensor` is copied into pinned memory first (a host copy that torch's pinned-memory cache makes
    cheap) and the caller's tensor is never read by the asynchronous copy; a tensor that is already pinned is
    read asynchronously, so the caller must not write to it afterwards."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    # The pinned block is kept from reuse until the copy has run (torch's caching host allocator records the
    # copy's stream), so returning before it completes is safe.
    return tensor.pin_memory().to(device, non_blocking=True)
