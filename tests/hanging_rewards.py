"""Rewards that never return, for the trainer's timeout and signal tests (`reward.name: hanging_rewards:NAME`)."""

import os
import time
from pathlib import Path

import numpy as np


def hangs_after(calls: int = 0, marker: str = "", hang_s: float = 3600.0, **_):
    """Scores `calls` batches (zeros), then hangs in every later call; writes its pid to `marker` when it hangs.

    Each process that builds it counts its own calls (the trainer builds one, a process worker another)."""
    done = [0]

    def reward(images, prompts, metadata):
        if done[0] < calls:
            done[0] += 1
            return np.zeros(len(prompts), dtype=np.float32), {}
        if marker:
            Path(marker).write_text(str(os.getpid()))
        time.sleep(hang_s)  # a daemon thread left sleeping here (executor=thread) ends with the test process
        return np.zeros(len(prompts), dtype=np.float32), {}
    return reward
