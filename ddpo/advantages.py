"""From rewards to advantages: per-prompt running statistics (as in the DDPO paper) or whole-batch normalisation."""

from __future__ import annotations

from collections import deque

import numpy as np

_EPS = 1e-6


class PerPromptStatTracker:
    """Normalise each reward by the mean and std of recent rewards for the same prompt.

    Until a prompt has `min_count` rewards in its buffer (the last `buffer_size`), it is normalised with
    the statistics of the whole batch instead. The state is saved in checkpoints, so resumed runs agree.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray, scale: float | None = None) -> np.ndarray:
        """Add a batch and return its advantages. prompts: B strings; rewards: (B,) -> (B,) float32.

        `scale`: divide by this (e.g. the epoch's reward std, `train.group_std=batch`) instead of each prompt's own
        std, so a prompt whose images all score alike gets small advantages instead of its noise blown up to 1."""
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            mask = np.array([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            stats = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - stats.mean()) / ((stats.std() if scale is None else scale) + _EPS)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}


def group_advantages(tracker: PerPromptStatTracker, prompts: list[str], rewards: np.ndarray,
                     groups: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Per-prompt tracking one group at a time (`sample.images_per_prompt` > 1), in the order of the groups.

    A prompt that fills two groups of one epoch would otherwise pool them: with a buffer of one group's size the
    first group was normalised by the second's mean and std (advantages of -36 were seen). Here each group enters
    the buffer before it is normalised, and a later group never reaches back into an earlier one.
    prompts: B strings; rewards: (B,); groups: (B,) int group ids; scale as in `update` -> (B,) float32.
    """
    rewards, groups = np.asarray(rewards), np.asarray(groups)
    advantages = np.empty(len(rewards), dtype=np.float32)
    for group in dict.fromkeys(groups.tolist()):  # unique, in first-seen order
        members = np.flatnonzero(groups == group)
        advantages[members] = tracker.update([prompts[i] for i in members], rewards[members], scale)
    return advantages


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """Whole-batch normalisation: (r - mean) / std. (B,) -> (B,) float32."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + _EPS)).astype(np.float32)


def group_relative_advantages(rewards: np.ndarray, groups: np.ndarray, std: str = "group") -> np.ndarray:
    """GRPO: each reward against its own group's mean, no running statistics (Flow-GRPO): (r - mean_g) / (s + eps)
    with s the group's std (`std="group"`) or the whole batch's (`"batch"`, Flow-GRPO's `global_std`, which keeps a
    group whose images all score alike from blowing up tiny differences). rewards: (B,); groups: (B,) int group
    ids -> (B,) float32."""
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    advantages = np.empty(len(rewards), dtype=np.float64)
    for group in np.unique(groups):
        members = groups == group
        scale = rewards[members].std() if std == "group" else rewards.std()
        advantages[members] = (rewards[members] - rewards[members].mean()) / (scale + _EPS)
    return advantages.astype(np.float32)
