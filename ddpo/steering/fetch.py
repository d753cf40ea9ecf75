"""Sparse-reward manipulation: gymnasium-robotics' FetchPush-v4 and FetchPickAndPlace-v4, their flattened
observations, scripted experts and decoy demonstrators.

The Fetch tasks are goal-conditioned: observations are dicts {observation (25,), achieved_goal (3,),
desired_goal (3,)}; the reward is the environment's own sparse one (-1 per step until the object is within
5 cm of the goal, then 0); success is `info["is_success"]` at the episode's last step (50 steps, never
terminated early). Diffusion policies, DSRL and RLPD see the flat observation [observation, achieved_goal,
desired_goal] (31,); SAC+HER works on the dict environment (HER relabels desired_goal).

Fetch observation layout: grip_pos 0:3, object_pos 3:6, object_rel_pos 6:9, finger widths 9:11, object
rotation 11:14, object velp 14:17, object velr 17:20, grip velp 20:23, finger velocities 23:25. Action:
(dx, dy, dz) in units of 5 cm per step, gripper (+1 opens, -1 closes).
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np

FETCH_ENVS = ("FetchPush-v4", "FetchPickAndPlace-v4")
OBS_DIM, GOAL_DIM = 25, 3
INSTALL_HINT = 'pip install -c constraints.txt -e ".[steering]"  (gymnasium-robotics with mujoco<3.3)'


def register_fetch() -> None:
    """Register gymnasium-robotics' environments (lazy: mujoco loads only when a Fetch task is asked for)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import gymnasium_robotics
    except ImportError as error:
        raise ValueError(f"the Fetch tasks need gymnasium-robotics ({error}); install it: {INSTALL_HINT}") from None
    gym.register_envs(gymnasium_robotics)


class FlattenGoal(gym.ObservationWrapper):
    """Dict goal observation -> flat [observation, achieved_goal, desired_goal] (31,) float32."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM + 2 * GOAL_DIM,), np.float32)

    def observation(self, observation: dict) -> np.ndarray:
        return flatten_goal_obs(observation)


def flatten_goal_obs(observation: dict) -> np.ndarray:
    parts = (observation["observation"], observation["achieved_goal"], observation["desired_goal"])
    return np.concatenate(parts).astype(np.float32)


def unflatten_goal_obs(flat: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of flatten_goal_obs for (31,) or (B, 31) arrays: what a policy trained on the dict env takes."""
    flat = np.asarray(flat, np.float32)
    return {
        "observation": flat[..., :OBS_DIM],
        "achieved_goal": flat[..., OBS_DIM : OBS_DIM + GOAL_DIM],
        "desired_goal": flat[..., OBS_DIM + GOAL_DIM :],
    }


def make_fetch(env_id: str, render_mode: str | None = None, flat: bool = True) -> gym.Env:
    register_fetch()
    env = gym.make(env_id, render_mode=render_mode)
    return FlattenGoal(env) if flat else env


def _split(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """grip (3,), object (3,), finger width (scalar, as a 0-d array), goal (3,) from a flat observation."""
    obs = np.asarray(obs, np.float64)
    return obs[0:3], obs[3:6], obs[9] + obs[10], obs[OBS_DIM + GOAL_DIM :]


def _move(target: np.ndarray, grip: np.ndarray, gain: float = 10.0) -> np.ndarray:
    """Proportional move: 1 action unit = 5 cm, so gain 10 closes half of the error per step."""
    return np.clip(gain * (target - grip), -1.0, 1.0)


def _push(obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
    grip, obj, _, _ = _split(obs)
    direction = goal[:2] - obj[:2]
    distance = np.linalg.norm(direction)
    direction = direction / max(distance, 1e-6)
    behind = obj.copy()
    behind[:2] = obj[:2] - 0.06 * direction
    rel = grip[:2] - obj[:2]
    along = rel @ direction
    off_line = rel - along * direction
    action = np.zeros(4)
    action[3] = -1.0  # closed fingers push better
    if along > -0.03 or np.linalg.norm(off_line) > 0.02:  # not behind the object: go there, above it
        target = behind.copy()
        if np.linalg.norm(grip[:2] - behind[:2]) > 0.02:
            target[2] = obj[2] + 0.08
        action[:3] = _move(target, grip)
    elif grip[2] > obj[2] + 0.02:  # behind it but high: come down
        action[:3] = _move(behind, grip)
    elif distance > 0.02:  # push toward the goal, slowing down near it, and steer back onto the line
        action[:2] = np.clip(8.0 * distance, 0.15, 0.6) * direction - 8.0 * off_line
        action[2] = 10.0 * (obj[2] - grip[2])
        action[:3] = np.clip(action[:3], -1.0, 1.0)
    return action.astype(np.float32)


def _pick(obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
    grip, obj, width, _ = _split(obs)
    rel = obj - grip
    horizontal = np.linalg.norm(rel[:2])
    action = np.zeros(4)
    holding = width < 0.06 and np.linalg.norm(rel) < 0.02
    if horizontal > 0.01 and not holding:  # above the object first, fingers open
        above = obj + np.array([0.0, 0.0, 0.06])
        action[:3] = _move(above if horizontal > 0.02 or grip[2] > obj[2] + 0.07 else obj, grip)
        action[3] = 1.0
    elif np.linalg.norm(rel) > 0.012 and not holding:  # descend onto it
        action[:3] = _move(obj, grip)
        action[3] = 1.0
    elif width > 0.055:  # close the fingers
        action[3] = -1.0
    else:  # carry it to the goal
        action[:3] = _move(goal, grip)
        action[3] = -1.0
    return action.astype(np.float32)


def _mirrored_goal(obs: np.ndarray) -> np.ndarray:
    """The goal reflected through the object (same height): a plausible but wrong place to bring it."""
    _, obj, _, goal = _split(obs)
    mirrored = goal.copy()
    mirrored[:2] = 2 * obj[:2] - goal[:2]
    return mirrored


def push_expert(obs: np.ndarray) -> np.ndarray:
    """Reach behind the object (seen from the goal), come down, push it to the goal. Flat obs (31,) -> (4,)."""
    return _push(obs, _split(obs)[3])


def push_decoy(obs: np.ndarray) -> np.ndarray:
    """Pushes as well as the expert, toward the goal mirrored through the object."""
    return _push(obs, _mirrored_goal(obs))


def pick_expert(obs: np.ndarray) -> np.ndarray:
    """Above the object with open fingers, down, grasp, carry to the (possibly airborne) goal."""
    return _pick(obs, _split(obs)[3])


# The object's height resting on the table (gymnasium-robotics' height_offset, the same for every episode).
TABLE_HEIGHT = 0.4247


def pick_decoy(obs: np.ndarray) -> np.ndarray:
    """Grasps as well as the expert, then slides the object to the goal's spot on the table: it never lifts,
    so it succeeds only where the goal lies on the table (half of FetchPickAndPlace's goals)."""
    goal = _split(obs)[3].copy()
    goal[2] = TABLE_HEIGHT
    return _pick(obs, goal)
