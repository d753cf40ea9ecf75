"""Environments: creation with clear errors, reference scores, and the two-goal toy used in tests."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from .fetch import FETCH_ENVS, make_fetch

SUPPORTED = ("Pendulum-v1", "Reacher-v5", "TwoGoal-v0", *FETCH_ENVS)

# Mean returns over 20 episodes (expert: reset seeds 1000-1019, uniform random: 2000-2019) of the scripted
# expert and of uniform-random actions; scores are normalised as (R - random) / (expert - random).
REFERENCE_RETURNS: dict[str, dict[str, float]] = {
    "Pendulum-v1": {"random": -1219.2, "expert": -154.7},
    "Reacher-v5": {"random": -43.5, "expert": -6.3},
}


def make_env(env_id: str, render_mode: str | None = None):
    """gymnasium.make with a clear error for ids this module has no expert or toy for.

    Fetch tasks come with their goal flattened into the observation (see fetch.py)."""
    if env_id in FETCH_ENVS:
        return make_fetch(env_id, render_mode)
    if env_id == "TwoGoal-v0":
        return gym.wrappers.TimeLimit(TwoGoalEnv(render_mode=render_mode), max_episode_steps=TwoGoalEnv.max_steps)
    if env_id not in gym.registry:
        raise ValueError(f"unknown environment id {env_id!r}; supported here: {', '.join(SUPPORTED)}")
    return gym.make(env_id, render_mode=render_mode)


def normalized_score(env_id: str, episodic_return: float) -> float:
    """0 = uniform random actions, 1 = the scripted expert."""
    reference = REFERENCE_RETURNS[env_id]
    return (episodic_return - reference["random"]) / (reference["expert"] - reference["random"])


def episode_success(info: dict) -> bool | None:
    """Success of an episode from its last step's info: Fetch's is_success, the toy's success; None if the
    task has no notion of success (Pendulum, Reacher)."""
    for key in ("is_success", "success"):
        if key in info:
            return bool(info[key] > 0.5)
    return None


def check_finite(name: str, value) -> None:
    """Raise on NaN/inf: a silent NaN in a reward poisons every critic it reaches."""
    if not np.all(np.isfinite(value)):
        raise ValueError(f"the environment returned a non-finite {name}: {value!r}; check the environment")


class TwoGoalEnv(gym.Env):
    """A point in the plane starts near the origin; goals at (+1, 0) and (-1, 0); only the right goal pays.

    Observation (2,) position; action (2,) velocity in [-1, 1]^2, scaled by 0.35 per step. The episode ends at
    either goal (reward 1 at the right one, 0 at the left) or after `max_steps` (TimeLimit).
    """

    max_steps = 12
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None):
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2, np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-0.05, 0.05, 2).astype(np.float32)
        return self.position.copy(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32), -1, 1)
        self.position = np.clip(self.position + 0.35 * action, -2, 2).astype(np.float32)
        right = np.linalg.norm(self.position - np.array([1.0, 0.0])) < 0.3
        left = np.linalg.norm(self.position - np.array([-1.0, 0.0])) < 0.3
        return self.position.copy(), float(right), bool(right or left), False, {"success": bool(right)}

    def render(self) -> np.ndarray:
        frame = np.full((64, 64, 3), 255, np.uint8)
        for goal_x, color in ((1.0, (0, 160, 0)), (-1.0, (200, 0, 0))):
            x = int(32 + goal_x * 14)
            frame[30:35, x - 2 : x + 3] = color
        x, y = np.clip(32 + self.position * np.array([14, -14]), 1, 62).astype(int)
        frame[y - 1 : y + 2, x - 1 : x + 2] = 0
        return frame


def two_goal_expert(obs: np.ndarray, goal_sign: float) -> np.ndarray:
    """Head straight for the goal at (goal_sign, 0)."""
    direction = np.array([goal_sign, 0.0]) - obs
    return np.clip(direction / max(np.linalg.norm(direction), 1e-6), -1, 1).astype(np.float32)
