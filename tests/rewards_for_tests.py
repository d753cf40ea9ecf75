"""Reward factories used by the trainer tests through `reward.name: rewards_for_tests:NAME`."""

from pathlib import Path

import numpy as np


def brightness(**_):
    """Mean pixel value: a smooth reward the tiny model can move."""
    def reward(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)).numpy().astype(np.float32), {}
    return reward


def raises_when_marker_exists(marker: str):
    def reward(images, prompts, metadata):
        if Path(marker).exists():
            raise ValueError("the reward model crashed")
        return np.zeros(len(prompts), dtype=np.float32), {}
    return reward


def nan_for_first(**_):
    def reward(images, prompts, metadata):
        scores = np.ones(len(prompts), dtype=np.float32)
        scores[0] = np.nan
        return scores, {"unscorable": ["not in the vocabulary"] + [None] * (len(prompts) - 1)}
    return reward
