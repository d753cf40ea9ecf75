"""Scripted experts for Pendulum-v1 and Reacher-v5, and the degraded demonstrator that turns them into
suboptimal, multi-modal demonstrations (the data a behaviour-cloned base policy is trained on).

The degradation is chosen so that the expert behaviour stays *inside* the base policy's support: each
action chunk of the demonstrations is, at random, the expert's chunk (with a little noise and lag) or a
"distracted" chunk (a constant random action). Behaviour cloning learns that mixture, so sampling the base
with w ~ N(0, I) scores well below the expert, while some noise w still decodes to expert-like chunks.
That is the situation DSRL is built for: steer the noise, never touch the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import fetch
from .envs import episode_success

Expert = Callable[[np.ndarray], np.ndarray]  # observation (obs_dim,) -> action (act_dim,)


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """Energy-pumping swing-up, then a PD balance near the top. obs = [cos th, sin th, th_dot]; th = 0 is upright."""
    cos_th, sin_th, th_dot = float(obs[0]), float(obs[1]), float(obs[2])
    th = np.arctan2(sin_th, cos_th)
    if cos_th > 0.85:
        torque = -(12.0 * th + 2.5 * th_dot)
    else:
        # Pendulum-v1: th_ddot = 15 sin th + 3 u, so E = th_dot^2 / 2 + 15 cos th and dE/dt = 3 u th_dot.
        energy = 0.5 * th_dot**2 + 15.0 * cos_th
        direction = np.sign(th_dot) if abs(th_dot) > 1e-3 else 1.0
        torque = 2.0 * direction * np.sign(15.0 - energy)
    return np.array([np.clip(torque, -2.0, 2.0)], dtype=np.float32)


# Reacher-v5 geometry (reacher.xml): upper arm 0.1 long, fingertip 0.11 along the forearm.
_L1, _L2 = 0.1, 0.11


def reacher_expert(obs: np.ndarray) -> np.ndarray:
    """Jacobian-transpose reaching with joint damping. obs = [cos q, sin q, target xy, q_dot, fingertip - target]."""
    q1, q2 = np.arctan2(obs[2], obs[0]), np.arctan2(obs[3], obs[1])
    q_dot, error = obs[6:8], obs[8:10]
    jacobian = np.array(
        [
            [-_L1 * np.sin(q1) - _L2 * np.sin(q1 + q2), -_L2 * np.sin(q1 + q2)],
            [_L1 * np.cos(q1) + _L2 * np.cos(q1 + q2), _L2 * np.cos(q1 + q2)],
        ]
    )
    torque = -jacobian.T @ (20.0 * error) - 0.05 * q_dot
    return np.clip(torque, -1.0, 1.0).astype(np.float32)


def pendulum_decoy(obs: np.ndarray) -> np.ndarray:
    """A timid demonstrator: the expert's torque at a quarter strength, too weak to swing the pendulum up."""
    return 0.25 * pendulum_expert(obs)


def reacher_decoy(obs: np.ndarray) -> np.ndarray:
    """A confused demonstrator: reaches, as well as the expert, for the target mirrored through the origin."""
    mirrored = np.array(obs, dtype=np.float64, copy=True)
    mirrored[8:10] = obs[8:10] + 2 * obs[4:6]  # fingertip - (-target)
    return reacher_expert(mirrored)


EXPERTS: dict[str, Expert] = {
    "Pendulum-v1": pendulum_expert, "Reacher-v5": reacher_expert,
    "FetchPush-v4": fetch.push_expert, "FetchPickAndPlace-v4": fetch.pick_expert,
}
DECOYS: dict[str, Expert] = {
    "Pendulum-v1": pendulum_decoy, "Reacher-v5": reacher_decoy,
    "FetchPush-v4": fetch.push_decoy, "FetchPickAndPlace-v4": fetch.pick_decoy,
}


@dataclass
class Degradation:
    """How the demonstrator spoils the expert, chunk by chunk (one chunk = `horizon` environment steps)."""

    p_expert: float = 0.4  # probability that a chunk follows the expert
    p_decoy: float = 0.3  # probability that a chunk follows the decoy demonstrator (a plausible wrong behaviour)
    noise_std: float = 0.1  # Gaussian noise on expert actions, as a fraction of the action range
    lag: int = 1  # expert chunks act on the observation `lag` steps old, within the chunk


@dataclass
class Demos:
    """Aligned demonstration chunks: one row per decision of the demonstrator.

    obs: (N, obs_dim) observation at the chunk's first step; actions: (N, H, act_dim);
    rewards: (N,) sum of the chunk's rewards; next_obs: (N, obs_dim); dones: (N,) 1.0 where the episode
    terminated (not truncated) inside the chunk; episode_returns: (E,) return of each demonstration episode.
    Optional: episode_successes (E,) for tasks with a success flag, and the same data step by step
    (step_obs (M, obs_dim), step_actions (M, act_dim), step_rewards, step_next_obs, step_dones (M,)) for
    baselines that act one step at a time (RLPD-style SAC).
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    dones: np.ndarray
    episode_returns: np.ndarray
    episode_successes: np.ndarray | None = None
    step_obs: np.ndarray | None = None
    step_actions: np.ndarray | None = None
    step_rewards: np.ndarray | None = None
    step_next_obs: np.ndarray | None = None
    step_dones: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, **{key: value for key, value in self.__dict__.items() if value is not None})

    @classmethod
    def load(cls, path: str | Path) -> "Demos":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def collect_demos(
    env,
    expert: Expert,
    decoy: Expert,
    n_episodes: int,
    horizon: int,
    degradation: Degradation,
    seed: int = 0,
) -> Demos:
    """Run the degraded demonstrator in `env` (a gymnasium env with a Box action space) and chunk the data."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    rows: dict[str, list] = {key: [] for key in ("obs", "actions", "rewards", "next_obs", "dones")}
    steps: dict[str, list] = {key: [] for key in ("step_obs", "step_actions", "step_rewards", "step_next_obs", "step_dones")}
    episode_returns, episode_successes = [], []
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed * 100_003 + episode)
        done, episode_return = False, 0.0
        while not done:
            mode = rng.random()
            follow_expert = mode < degradation.p_expert + degradation.p_decoy
            demonstrator = expert if mode < degradation.p_expert else decoy
            distracted = rng.uniform(low, high).astype(np.float32)
            chunk, chunk_reward, start_obs, stale_obs = [], 0.0, obs, obs
            for step in range(horizon):
                if follow_expert:
                    action = demonstrator(stale_obs) + rng.normal(0, degradation.noise_std, low.shape) * (high - low) / 2
                    action = np.clip(action, low, high).astype(np.float32)
                else:
                    action = distracted
                previous = obs
                obs, reward, terminated, truncated, info = env.step(action)
                for key, value in zip(steps, (previous, action, reward, obs, float(terminated))):
                    steps[key].append(value)
                chunk.append(action)
                chunk_reward += float(reward)
                if step + 1 >= degradation.lag:
                    stale_obs = obs
                done = terminated or truncated
                if done:
                    break
            while len(chunk) < horizon:  # the episode ended mid-chunk: pad with the last action
                chunk.append(chunk[-1])
            rows["obs"].append(start_obs)
            rows["actions"].append(np.stack(chunk))
            rows["rewards"].append(chunk_reward)
            rows["next_obs"].append(obs)
            rows["dones"].append(float(terminated))
            episode_return += chunk_reward
        episode_returns.append(episode_return)
        episode_successes.append(episode_success(info))
    arrays = {key: np.asarray(value, dtype=np.float32) for key, value in {**rows, **steps}.items()}
    successes = None if episode_successes[0] is None else np.asarray(episode_successes, dtype=np.float32)
    return Demos(**arrays, episode_returns=np.asarray(episode_returns, dtype=np.float32), episode_successes=successes)


def expert_returns(env, expert: Expert, n_episodes: int, seed: int = 0) -> np.ndarray:
    """Returns of the clean expert, (n_episodes,)."""
    returns = []
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(expert(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return np.asarray(returns)
