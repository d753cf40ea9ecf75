"""The DSRL environment: act in the frozen policy's latent-noise space instead of the action space.

An action of this wrapper is a flattened noise w in Box(-b, b)^(H*A). It is decoded with the current
observation through the frozen steerable policy into an action chunk (H, A), which runs open-loop in the
wrapped environment; the chunk's rewards are summed. Any off-the-shelf SAC trained on this environment
is DSRL-SAC.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from .envs import check_finite
from .policy import OBS_CLIP, SteerablePolicy


def check_policy_matches(env: gym.Env, policy: SteerablePolicy) -> None:
    """Raise before training if the policy's observation or action size does not fit the environment."""
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    if obs_shape != (policy.obs_dim,):
        raise ValueError(f"the policy expects observations of size {policy.obs_dim}, the environment gives {obs_shape}")
    if act_shape != (policy.act_dim,):
        raise ValueError(f"the policy outputs actions of size {policy.act_dim}, the environment takes {act_shape}")


class NoiseActionEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Wrap `env` so that actions are noise for `policy`; step() runs a whole action chunk.

    Counters: `env_steps` counts every step of the wrapped environment (what budgets are measured in);
    `episode_returns` collects the return of every finished episode, in environment reward units.
    """

    def __init__(self, env: gym.Env, policy: SteerablePolicy, noise_bound: float = 1.5):
        if not (np.isfinite(noise_bound) and noise_bound > 0):
            raise ValueError(f"noise_bound must be a finite number > 0 (the latent action space is Box(-b, b)); "
                             f"got {noise_bound}")
        # Recorded so gymnasium can recreate the wrapped env from its spec (its env checker does).
        gym.utils.RecordConstructorArgs.__init__(self, policy=policy, noise_bound=noise_bound)
        gym.Wrapper.__init__(self, env)
        check_policy_matches(env, policy)
        self.policy, self.noise_bound = policy, float(noise_bound)
        self.noise_shape = (policy.horizon, policy.act_dim)
        self.action_space = gym.spaces.Box(-self.noise_bound, self.noise_bound, (policy.horizon * policy.act_dim,), np.float32)
        self.env_steps, self.episode_returns = 0, []
        self._obs: np.ndarray | None = None
        self._episode_return = 0.0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        check_finite("observation", obs)
        self._obs, self._episode_return = obs, 0.0
        return obs, info

    def decode(self, obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """obs (obs_dim,), noise (H*A,) -> action chunk (H, A), clipped to the wrapped action space."""
        obs_tensor = torch.as_tensor(np.asarray(obs, np.float32))[None]
        noise_tensor = torch.as_tensor(np.asarray(noise, np.float32)).reshape(1, *self.noise_shape)
        with torch.no_grad():
            chunk = self.policy(obs_tensor, noise_tensor)[0].cpu().numpy()
        return np.clip(chunk, self.env.action_space.low, self.env.action_space.high)

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        noise = np.clip(np.asarray(action, np.float32).reshape(-1), -self.noise_bound, self.noise_bound)
        chunk = self.decode(self._obs, noise)
        terminated, truncated, info, step_rewards = False, False, {}, []
        for env_action in chunk:
            obs, reward, terminated, truncated, info = self.env.step(env_action)
            check_finite("observation", obs)
            check_finite("reward", reward)
            step_rewards.append(float(reward))
            if terminated or truncated:
                break
        executed, total_reward = len(step_rewards), float(sum(step_rewards))
        self.env_steps += executed
        self._episode_return += total_reward
        self._obs = obs
        if terminated or truncated:
            self.episode_returns.append(self._episode_return)
        # The whole decoded chunk (H, A), also where the episode ended before its last steps ran; the rewards
        # of the steps that ran, for learners that discount per environment step inside the chunk.
        info = dict(info, env_steps=executed, action_chunk=chunk, step_rewards=step_rewards)
        return obs, total_reward, terminated, truncated, info


def discounted_chunk(step_rewards, gamma: float) -> tuple[float, float]:
    """(sum_i gamma^i r_i, gamma^k) for the k rewards a chunk collected: the reward and bootstrap discount of
    one chunk transition, so the chunk-level TD target equals the step-level return whatever k is."""
    rewards = np.asarray(step_rewards, np.float64).reshape(-1)
    if rewards.size == 0:
        raise ValueError("a chunk transition needs at least one environment step")
    return float(np.sum(gamma ** np.arange(rewards.size) * rewards)), float(gamma**rewards.size)


class AgentView(gym.Wrapper):
    """A NoiseActionEnv as an off-the-shelf SAC sees it (DSRL-SAC), treated as DSRL-NA treats it:

    - observations standardised with the base policy's statistics and clipped to +-5 (`stats`; None keeps them
      raw). Raw Fetch observations sit near 1.3 m with a spread of a few cm, which starves a critic of signal;
      the frozen policy still decodes from raw observations;
    - each chunk's reward as sum_i gamma^i (r_i + reward_shift) over the environment steps that ran, so that
      SAC's discount gamma^H per decision continues a per-step discount (rewards were summed undiscounted).

    `env_steps` and `episode_returns` are the wrapped NoiseActionEnv's, in the environment's own units.
    """

    def __init__(self, env: NoiseActionEnv, stats: tuple[np.ndarray, np.ndarray] | None, gamma: float,
                 reward_shift: float = 0.0):
        super().__init__(env)
        self.noise_env, self.stats, self.gamma, self.reward_shift = env, stats, float(gamma), float(reward_shift)
        if stats is not None:
            shape = env.observation_space.shape
            self.observation_space = gym.spaces.Box(-5.0, 5.0, shape, np.float32)

    @property
    def env_steps(self) -> int:
        return self.noise_env.env_steps

    @env_steps.setter
    def env_steps(self, value: int) -> None:
        self.noise_env.env_steps = value

    @property
    def episode_returns(self) -> list[float]:
        return self.noise_env.episode_returns

    def observation(self, obs: np.ndarray) -> np.ndarray:
        """obs (obs_dim,) raw -> what the agent sees (obs_dim,) float32."""
        if self.stats is None:
            return np.asarray(obs, np.float32)
        mean, std = self.stats
        return np.clip((np.asarray(obs, np.float32) - mean) / std, -OBS_CLIP, OBS_CLIP).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self.observation(obs), info

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        reward, _ = discounted_chunk(np.asarray(info["step_rewards"]) + self.reward_shift, self.gamma)
        return self.observation(obs), reward, terminated, truncated, info
