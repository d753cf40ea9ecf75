"""DiffusionPolicy: determinism, steerability, save/load, shipped base policies, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpo.steering.policy import CallablePolicy, DiffusionPolicy, DiffusionPolicyConfig, SteerablePolicy


def tiny_policy(seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    policy = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=3, act_dim=2, horizon=4, hidden=32, num_inference_steps=5))
    policy.set_normalization(np.zeros(3), np.ones(3) * 2, np.array([-2.0, -1.0]), np.array([2.0, 1.0]))
    return policy.eval()


def test_same_observation_and_noise_give_the_same_actions():
    policy = tiny_policy()
    obs, noise = torch.randn(5, 3), torch.randn(5, 4, 2)
    first, second = policy(obs, noise), policy(obs, noise)
    assert torch.equal(first, second)
    # Batch position does not matter: row 2 alone decodes to row 2 of the batch.
    assert torch.allclose(policy(obs[2:3], noise[2:3])[0], first[2], atol=1e-6)
    assert first.shape == (5, 4, 2)
    # Actions stay inside the bounds given by set_normalization.
    assert (first[..., 0].abs() <= 2.0 + 1e-6).all() and (first[..., 1].abs() <= 1.0 + 1e-6).all()


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    policy = tiny_policy(seed=3)
    policy.save_pretrained(tmp_path / "policy")
    loaded = DiffusionPolicy.from_pretrained(tmp_path / "policy")
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["hidden"] == 32
    obs, noise = torch.randn(7, 3), torch.randn(7, 4, 2)
    assert torch.equal(policy(obs, noise), loaded(obs, noise))
    assert torch.equal(loaded.obs_std, policy.obs_std)


def test_from_pretrained_on_a_wrong_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusionPolicy.from_pretrained(tmp_path)


def test_wrong_noise_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"noise \(B, 4, 2\)"):
        tiny_policy()(torch.randn(1, 3), torch.randn(1, 8))


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "Reacher-v5"])
def test_shipped_base_policy_is_steerable_across_the_noise_range(env_id):
    """Different noise must give clearly different actions for one observation, or there is nothing to steer."""
    from ddpo.steering.base import pretrained_path
    from ddpo.steering.envs import make_env

    policy = DiffusionPolicy.from_pretrained(pretrained_path(env_id))
    env = make_env(env_id)
    obs, _ = env.reset(seed=0)
    obs = torch.as_tensor(obs, dtype=torch.float32)[None].repeat(64, 1)
    noise = torch.linspace(-1.5, 1.5, 64)[:, None, None].expand(64, policy.horizon, policy.act_dim)
    actions = policy(obs, noise.contiguous())
    action_range = torch.as_tensor(env.action_space.high - env.action_space.low)
    spread = (actions.amax(0) - actions.amin(0)) / action_range  # (H, A)
    assert spread.max() > 0.3, f"actions barely move with the noise: spread {spread}"
    assert policy.config.env_id == env_id


def test_callable_policy_satisfies_the_protocol():
    policy = CallablePolicy(lambda obs, noise: noise.tanh(), obs_dim=2, act_dim=2, horizon=3)
    assert isinstance(policy, SteerablePolicy)
    assert isinstance(tiny_policy(), SteerablePolicy)
    assert policy(torch.zeros(1, 2), torch.ones(1, 3, 2)).shape == (1, 3, 2)
