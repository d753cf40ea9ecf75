"""NoiseActionEnv: environment checkers, chunk execution and step counting, and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from ddpo.steering.base import pretrained_path
from ddpo.steering.envs import make_env
from ddpo.steering.noise_env import NoiseActionEnv
from ddpo.steering.policy import CallablePolicy, DiffusionPolicy


@pytest.fixture(scope="module")
def pendulum_policy():
    return DiffusionPolicy.from_pretrained(pretrained_path("Pendulum-v1"))


def test_noise_env_passes_gymnasium_and_sb3_checkers(pendulum_policy):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = NoiseActionEnv(make_env("Pendulum-v1"), pendulum_policy, noise_bound=1.5)
    assert env.action_space == gym.spaces.Box(-1.5, 1.5, (4,), np.float32)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(NoiseActionEnv(make_env("Pendulum-v1"), pendulum_policy), warn=True)


def test_one_step_runs_the_decoded_chunk_and_sums_its_rewards(pendulum_policy):
    env = NoiseActionEnv(make_env("Pendulum-v1"), pendulum_policy)
    twin = make_env("Pendulum-v1")
    obs, _ = env.reset(seed=7)
    twin_obs, _ = twin.reset(seed=7)
    noise = np.array([0.5, -1.0, 1.2, 0.0], np.float32)
    chunk = pendulum_policy(torch.as_tensor(obs)[None], torch.as_tensor(noise).view(1, 4, 1))[0].numpy()
    next_obs, reward, _, _, info = env.step(noise)
    expected = 0.0
    for action in chunk:
        twin_obs, step_reward, *_ = twin.step(action)
        expected += step_reward
    assert info["env_steps"] == 4 and env.env_steps == 4
    assert reward == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(next_obs, twin_obs, rtol=1e-5)


def test_episode_end_inside_a_chunk_counts_only_executed_steps():
    # Reacher-v5 episodes last 50 steps: with chunks of 4 the last decision runs 2 steps.
    policy = CallablePolicy(lambda obs, noise: torch.zeros(obs.shape[0], 4, 2), obs_dim=10, act_dim=2, horizon=4)
    env = NoiseActionEnv(make_env("Reacher-v5"), policy)
    env.reset(seed=0)
    decisions, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(8, np.float32))
        decisions, done = decisions + 1, terminated or truncated
    assert (decisions, env.env_steps, len(env.episode_returns)) == (13, 50, 1)


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), float("nan")])
def test_non_positive_or_infinite_noise_bound_is_rejected(pendulum_policy, bound):
    with pytest.raises(ValueError, match="noise_bound must be a finite number > 0"):
        NoiseActionEnv(make_env("Pendulum-v1"), pendulum_policy, noise_bound=bound)


def test_policy_that_does_not_fit_the_environment_is_rejected(pendulum_policy):
    with pytest.raises(ValueError, match="observations of size 3"):
        NoiseActionEnv(make_env("Reacher-v5"), pendulum_policy)
    wrong_actions = CallablePolicy(lambda o, w: w, obs_dim=3, act_dim=2, horizon=4)
    with pytest.raises(ValueError, match="actions of size 2"):
        NoiseActionEnv(make_env("Pendulum-v1"), wrong_actions)


def test_unknown_environment_id_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown environment id 'Pendulum-v9'"):
        make_env("Pendulum-v9")


class _NaNRewardEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Box(-2, 2, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros(3, np.float32), {}

    def step(self, action):
        return np.zeros(3, np.float32), float("nan"), False, False, {}


def test_nan_reward_is_a_clear_error(pendulum_policy):
    env = NoiseActionEnv(_NaNRewardEnv(), pendulum_policy)
    env.reset()
    with pytest.raises(ValueError, match="non-finite reward"):
        env.step(np.zeros(4, np.float32))
