"""The reward worker process: scores like inline, does not outlive a killed trainer, and is stopped when hung."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddpo.reward_pool import RewardPool, RewardTimeoutError

SCRIPT = """
import sys, time, torch
from ddpo.reward_pool import RewardPool
pool = RewardPool("jpeg_compressibility", {}, "process")
pool.submit(torch.rand(1, 3, 16, 16), ["a cat"], [{}]).result()
print(pool._pool._processes and list(pool._pool._processes)[0], flush=True)
time.sleep(60)
"""


def test_process_pool_scores_like_inline():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, metadata = ["a", "b", "c"], [{}, {}, {}]
    inline = RewardPool("jpeg_compressibility", {}, "inline").submit(images, prompts, metadata).result()
    pool = RewardPool("jpeg_compressibility", {}, "process")
    try:
        spawned = pool.submit(images, prompts, metadata).result()
    finally:
        pool.close()
    np.testing.assert_array_equal(inline.scores, spawned.scores)


def test_worker_exits_when_the_trainer_is_killed():
    trainer = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    worker_pid = int(trainer.stdout.readline())
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker_pid, signal.SIGKILL)
    raise AssertionError("the reward worker outlived its trainer")


def test_close_joins_an_idle_worker():
    """After the last batch, close() waits for the worker to exit (no half-shut pool left to the exit hooks)."""
    pool = RewardPool("jpeg_compressibility", {}, "process")
    pool.submit(torch.rand(1, 3, 16, 16), ["a cat"], [{}]).result()
    workers = list(pool._pool._processes.values())
    assert len(workers) == 1 and workers[0].is_alive()
    pool.close()
    assert not workers[0].is_alive(), "the idle reward worker was still running after close()"


def test_close_terminates_a_busy_process_worker(tmp_path):
    pool = RewardPool("hanging_rewards:hangs_after", {"marker": str(tmp_path / "hung")}, "process", timeout_s=1)
    future = pool.submit(torch.rand(2, 3, 8, 8), ["a cat", "a dog"], [{}, {}])
    with pytest.raises(RewardTimeoutError, match=r"on prompts: \['a cat', 'a dog'\]"):
        pool.result(future)
    workers = list(pool._pool._processes.values())
    pool.close()
    assert workers and not any(w.is_alive() for w in workers), "close() left the hung reward worker running"


def test_each_rank_puts_its_reward_model_on_its_own_gpu(monkeypatch):
    from ddpo.reward_pool import per_rank_device

    kwargs = {"device": "cuda", "captioner_kwargs": {"device": "cuda", "dtype": "float16"}, "metric": "recall"}
    assert per_rank_device(kwargs, 1) == {"device": "cuda:1", "captioner_kwargs": {"device": "cuda:1",
                                                                                   "dtype": "float16"},
                                          "metric": "recall"}
    assert per_rank_device({"device": "cuda:3"}, 1) == {"device": "cuda:3"}  # an explicit GPU is kept
    assert per_rank_device({"device": "cpu"}, 1) == {"device": "cpu"}
    monkeypatch.setenv("LOCAL_RANK", "1")  # as torchrun / accelerate launch set it
    assert per_rank_device({"device": "cuda"}) == {"device": "cuda:1"}
    pool = RewardPool("rewards_for_tests:brightness", {"device": "cuda"}, "inline")  # what the worker is given
    pool.close()
    assert pool.kwargs == {"device": "cuda:1"}
    monkeypatch.delenv("LOCAL_RANK")
    assert per_rank_device({"device": "cuda"}) == {"device": "cuda"}  # one process, no launcher: as given
