"""Computing rewards beside sampling, and catching bad rewards before they reach the update.

Rewards run in a separate *process* by default. A torch op on a second Python thread of the training
process (as the reference DDPO's reward thread pool did) made every later 2-thread op ~2.5x slower;
a spawned worker with one thread overlaps the next sampling batch without that penalty.

Every reward call has a deadline (`reward.timeout_s`): past it the run stops with a `RewardTimeoutError` naming
the reward and the prompts, and `close()` terminates a worker that is still busy, so neither a hung reward nor
Ctrl-C leaves the trainer waiting on it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger("ddpo")


class RewardError(RuntimeError):
    """A reward function raised, or returned NaN/inf; the message names the prompts."""


class RewardTimeoutError(RewardError):
    """A reward call did not return within reward.timeout_s; the message names the reward and the prompts."""


class _Deadline(BaseException):
    """Raised into an inline reward call by SIGALRM. A BaseException, so a reward's `except Exception` cannot
    swallow it."""


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
    # Ctrl-C reaches the whole terminal process group: the trainer alone decides, and terminates this worker.
    # (Without this the worker printed its own KeyboardInterrupt traceback.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


class _DaemonThreadExecutor:
    """One daemon thread that runs submitted calls in turn. ThreadPoolExecutor joins its threads at interpreter
    exit, so a reward hung in its thread kept the process alive forever; a daemon thread is abandoned instead."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ddpo-reward")
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 -- delivered to whoever waits on the future
                future.set_exception(err)

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._queue.put(None)
        if wait:
            self._thread.join()


def _with_deadline(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in this thread, interrupted by SIGALRM after `timeout_s` (raising `_Deadline`).

    Only the main thread can take signals: elsewhere fn() runs without a deadline (RewardPool warns). A reward
    stuck inside native code that retries on EINTR cannot be interrupted either; the process executor can."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn()

    def ring(signum, frame):
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class RewardPool:
    """Submit batches of images; collect (scores, info) later with `result`. `executor`: process | thread | inline.

    `timeout_s` bounds each reward call. Waits happen in submission order and the worker scores one batch at a
    time, so the wait for one batch is about its own scoring time. The first one also covers the worker's start
    and a reward that loads its model on first use.
    """

    def __init__(self, name: str, kwargs: dict[str, Any], executor: str = "process", timeout_s: float = 600.0):
        from rewards import build_reward

        kwargs = per_rank_device(kwargs)
        self.name, self.kwargs, self.executor, self.timeout_s = name, kwargs, executor, timeout_s
        self._prompts: dict[cf.Future, list[str]] = {}  # submitted and not yet collected: close() must know
        # Built here too, so a bad name or bad kwargs fail before any model loads (rewards load weights lazily).
        try:
            self.reward = build_reward(name, **kwargs)
        except (ValueError, TypeError, ImportError, AttributeError, OSError) as err:
            raise RewardError(f"reward.name={name!r} could not be built: {type(err).__name__}: {err}") from err
        if executor == "process":
            self._pool: Any = cf.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(name, kwargs, os.getpid()))
        elif executor == "thread":
            self._pool = _DaemonThreadExecutor()
        else:
            self._pool = None
            if threading.current_thread() is not threading.main_thread():
                logger.warning("reward.executor=inline outside the main thread: reward.timeout_s cannot interrupt a "
                               "hung reward here; use reward.executor=process")

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> cf.Future:
        """images: (B, 3, H, W) in [0, 1]. Returns a future of a RewardBatch.

        Inline, the reward runs now: a RewardError is delivered through the future like the other executors', but a
        timeout raises `RewardTimeoutError` at once (the next batch would only hang again)."""
        array = images.detach().float().cpu().numpy()
        if self._pool is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(_with_deadline(lambda: _score(self.reward, self.name, array, prompts, metadata),
                                                 self.timeout_s))
            except RewardError as err:
                future.set_exception(err)
            except _Deadline:
                raise RewardTimeoutError(self._timeout_message(prompts)) from None
            return future
        if self.executor == "process":
            future = self._pool.submit(_score_in_worker, self.name, array, prompts, metadata)
        else:
            future = self._pool.submit(_score, self.reward, self.name, array, prompts, metadata)
        self._prompts[future] = list(prompts)
        return future

    def result(self, future: cf.Future) -> RewardBatch:
        """The RewardBatch of a submitted future, waiting at most `timeout_s`; raises RewardError naming the prompts."""
        try:
            batch = future.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            raise RewardTimeoutError(self._timeout_message(self._prompts.get(future, []))) from None
        except BrokenProcessPool:
            raise RewardError("the reward worker process died (out of memory, killed, or it could not start). A "
                              "script that calls ddpo.trainer.train must guard its code with `if __name__ == "
                              "'__main__':` because the worker is spawned; or set reward.executor=inline") from None
        self._prompts.pop(future, None)
        return batch

    def _timeout_message(self, prompts: list[str]) -> str:
        return (f"reward {self.name!r} did not return within reward.timeout_s={self.timeout_s:g} s "
                f"(reward.executor={self.executor}) and was stopped\n  on prompts: {prompts}\n"
                "If it is only slow (a large model's first call also loads its weights), raise reward.timeout_s; "
                "otherwise fix the reward.")

    def close(self) -> None:
        """Stop the worker. Joined when idle: `shutdown(wait=False)` on an idle process pool let CPython's exit hook
        write to the pool's closed wake-up pipe ("OSError: Bad file descriptor" after a finished run). A worker still
        busy (a timeout, Ctrl-C or an error mid-batch) is terminated first, then joined too: once its workers are
        dead the pool's manager thread ends at once, and joining it closes the wake-up pipe before the exit hook runs
        (Python 3.11's hook races a pipe closed under it)."""
        if self._pool is None:
            return
        busy = any(not f.done() for f in self._prompts)
        self._prompts.clear()
        if busy and self.executor == "process":
            _terminate_workers(self._pool)
        # The daemon thread executor is never joined while busy: its thread may be stuck in the reward for good.
        self._pool.shutdown(wait=not (busy and self.executor == "thread"), cancel_futures=True)


def _terminate_workers(pool: cf.ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """SIGTERM the pool's worker processes, SIGKILL any still alive after `grace_s`. (Python 3.14 has
    `ProcessPoolExecutor.terminate_workers`; this project supports 3.10+.)"""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(grace_s)
        if worker.is_alive():
            worker.kill()
            worker.join(grace_s)


def per_rank_device(kwargs: dict[str, Any], local_rank: int | None = None) -> dict[str, Any]:
    """`kwargs` with every `device: cuda` (also in nested kwargs, e.g. captioner_kwargs) made this process's GPU,
    `cuda:LOCAL_RANK`, so that 8 processes put their 8 reward models on 8 GPUs rather than all on GPU 0 (the worker
    process starts with no CUDA device set). An explicit index (`cuda:1`) and other devices are kept; so is `cuda`
    when the process was not started by a launcher (no LOCAL_RANK). `local_rank` defaults to $LOCAL_RANK."""
    if local_rank is None:
        rank = os.environ.get("LOCAL_RANK", "")
        if not rank.isdigit():
            return kwargs
        local_rank = int(rank)

    def mapped(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: mapped(v, k) for k, v in value.items()}
        return f"cuda:{local_rank}" if key == "device" and value == "cuda" else value

    return mapped(kwargs)


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
