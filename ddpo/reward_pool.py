"""Computing rewards beside sampling, and catching bad rewards before they reach the update.

Rewards run in a separate *process* by default. A torch op on a second Python thread of the training
process (as the reference DDPO's reward thread pool did) made every later 2-thread op ~2.5x slower;
a spawned worker with one thread overlaps the next sampling batch without that penalty.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from typing import Any, NamedTuple

import numpy as np
import torch


class RewardError(RuntimeError):
    """A reward function raised, or returned NaN/inf; the message names the prompts."""


class RewardBatch(NamedTuple):
    scores: np.ndarray  # (B,) float32
    info: dict[str, list]  # per-sample values, for logging


_WORKER_REWARD = None  # the reward callable inside a worker process


def _exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Stop this worker when the trainer is gone (killed with SIGKILL or SIGTERM, it never shuts the pool down)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()  # no torch op: no thread penalty


def _init_worker(name: str, kwargs: dict[str, Any], parent_pid: int) -> None:
    global _WORKER_REWARD
    _exit_with_parent(parent_pid)
    torch.set_num_threads(1)
    from rewards import build_reward

    _WORKER_REWARD = build_reward(name, **kwargs)


def _score(reward, name: str, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> RewardBatch:
    try:
        scores, info = reward(torch.from_numpy(images), prompts, metadata)
    except Exception as err:  # noqa: BLE001 -- any user reward error surfaces in the trainer with its prompts
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}\n  on prompts: {prompts}") from None
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape != (len(prompts),):
        raise RewardError(f"reward {name!r} returned {scores.shape[0]} scores for {len(prompts)} images; "
                          "a reward must return one score per image")
    return RewardBatch(scores, {k: list(v) for k, v in (info or {}).items()})


def _score_in_worker(name: str, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> RewardBatch:
    return _score(_WORKER_REWARD, name, images, prompts, metadata)


class RewardPool:
    """Submit batches of images; collect (scores, info) later. `executor`: process | thread | inline."""

    def __init__(self, name: str, kwargs: dict[str, Any], executor: str = "process"):
        from rewards import build_reward

        self.name, self.executor = name, executor
        self._futures: list[cf.Future] = []  # submitted to the pool and maybe not done: close() must know
        # Built here too, so a bad name or bad kwargs fail before any model loads (rewards load weights lazily).
        self.reward = build_reward(name, **kwargs)
        if executor == "process":
            self._pool: cf.Executor | None = cf.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(name, kwargs, os.getpid()))
        elif executor == "thread":
            self._pool = cf.ThreadPoolExecutor(1)
        else:
            self._pool = None

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> cf.Future:
        """images: (B, 3, H, W) in [0, 1]. Returns a future of a RewardBatch."""
        array = images.detach().float().cpu().numpy()
        if self._pool is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(_score(self.reward, self.name, array, prompts, metadata))
            except RewardError as err:
                future.set_exception(err)
            return future
        if self.executor == "process":
            future = self._pool.submit(_score_in_worker, self.name, array, prompts, metadata)
        else:
            future = self._pool.submit(_score, self.reward, self.name, array, prompts, metadata)
        self._futures = [f for f in self._futures if not f.done()] + [future]
        return future

    def close(self) -> None:
        """Stop the worker. Joined when idle: `shutdown(wait=False)` on an idle process pool let CPython's exit hook
        write to the pool's closed wake-up pipe ("OSError: Bad file descriptor" after a finished run). A worker still
        busy (an error path mid-batch) is not waited for, so a hung reward cannot hold the exit."""
        if self._pool is not None:
            busy = any(not f.done() for f in self._futures)
            self._pool.shutdown(wait=not busy, cancel_futures=True)


def check_finite(scores: np.ndarray, prompts: list[str], info: dict[str, list], policy: str) -> np.ndarray:
    """Return a (B,) bool mask of usable samples; with policy "error", raise on NaN/inf naming the prompts."""
    finite = np.isfinite(scores)
    if finite.all() or policy == "skip":
        return finite
    bad = [f"{prompts[i]!r} -> {scores[i]}" + _reason(info, i) for i in np.flatnonzero(~finite)]
    raise RewardError(f"{len(bad)} reward(s) are NaN or infinite:\n  " + "\n  ".join(bad)
                      + "\nFix the reward, or set reward.on_nonfinite=skip to train on the other samples.")


def _reason(info: dict[str, list], i: int) -> str:
    reason = info.get("unscorable", [None] * (i + 1))[i] if isinstance(info.get("unscorable"), list) else None
    return f" ({reason})" if reason else ""
