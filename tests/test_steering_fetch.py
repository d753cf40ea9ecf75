"""Sparse-reward manipulation (gymnasium-robotics Fetch): flat goal observations, the sparse reward and
success flag, scripted experts, degraded demonstrations, and a smoke run of every new method on FetchPush.

The learning curves are benchmarks (benchmarks/steering.py), not tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")
pytest.importorskip("stable_baselines3")

from ddpo.steering import base  # noqa: E402
from ddpo.steering.envs import make_env  # noqa: E402
from ddpo.steering.evaluate import evaluate_episodes  # noqa: E402
from ddpo.steering.experts import DECOYS, EXPERTS, Degradation  # noqa: E402
from ddpo.steering.fetch import flatten_goal_obs, make_fetch, unflatten_goal_obs  # noqa: E402

FETCH = ("FetchPush-v4", "FetchPickAndPlace-v4")


def test_flat_observation_holds_the_goal_and_round_trips():
    raw = make_fetch("FetchPush-v4", flat=False)
    obs, _ = raw.reset(seed=3)
    flat = flatten_goal_obs(obs)
    assert flat.shape == (31,) and flat.dtype == np.float32
    np.testing.assert_allclose(flat[-3:], obs["desired_goal"], rtol=1e-6)
    back = unflatten_goal_obs(np.stack([flat, flat]))  # batched too
    for key in obs:
        np.testing.assert_allclose(back[key][1], obs[key], rtol=1e-6)
    env = make_env("FetchPush-v4")
    flat_obs, _ = env.reset(seed=3)
    np.testing.assert_allclose(flat_obs, flat, rtol=1e-6)
    assert env.observation_space.shape == (31,)


@pytest.mark.parametrize("env_id", FETCH)
def test_experts_succeed_and_decoys_fail_on_the_sparse_reward(env_id):
    expert, decoy = EXPERTS[env_id], DECOYS[env_id]
    returns, success = evaluate_episodes(env_id, lambda obs: expert(obs)[None], 8, seed=500)
    assert success >= 0.85, success  # measured: 0.99 (push) and 1.00 (pick and place) over 100 seeds
    assert np.all((returns <= 0) & (returns >= -50))  # -1 per step until the object is at the goal, 50 steps
    _, decoy_success = evaluate_episodes(env_id, lambda obs: decoy(obs)[None], 8, seed=500)
    # The push decoy pushes toward the mirrored goal; the pick decoy never lifts, so it fails every goal in the air
    # (half of them). Measured over 30 seeds: 0.03 (push), 0.50 (pick and place).
    assert decoy_success <= (0.25 if env_id == "FetchPush-v4" else 0.75), decoy_success


def test_degraded_demonstrations_have_chunks_steps_and_successes(monkeypatch):
    recipe = base.BaseRecipe(n_episodes=4, degradation=Degradation(p_expert=0.6, p_decoy=0.2))
    monkeypatch.setitem(base.RECIPES, "FetchPush-v4", recipe)
    demos = base.make_demos("FetchPush-v4", seed=0)
    assert demos.obs.shape == (4 * 13, 31) and demos.actions.shape == (4 * 13, 4, 4)  # 50 steps = 13 chunks of 4
    assert demos.step_obs.shape == (200, 31) and demos.step_actions.shape == (200, 4)
    assert set(np.unique(demos.step_rewards)) <= {-1.0, 0.0}
    np.testing.assert_allclose(demos.step_rewards.reshape(4, 50).sum(1), demos.episode_returns)
    assert demos.episode_successes.shape == (4,)
    np.testing.assert_allclose(demos.step_next_obs[:49], demos.step_obs[1:50])  # within the first episode


def test_new_methods_run_resume_and_report_success(tmp_path, monkeypatch):
    """A few hundred steps of sac_her, rlpd, dsrl_na (with demos in its replay) and dsrl_sac on FetchPush: metrics carry
    success_rate, checkpoints resume, and the run evaluates through the API."""
    from ddpo.steering import api
    from ddpo.steering.train import TrainConfig, train

    recipe = base.BaseRecipe(n_episodes=2, degradation=Degradation(p_expert=0.8, p_decoy=0.1))
    monkeypatch.setitem(base.RECIPES, "FetchPush-v4", recipe)  # rlpd / offline demos: 2 episodes are enough here
    for method, steps in (("sac_her", 150), ("rlpd", 150), ("dsrl_na", 200), ("dsrl_sac", 200)):
        config = TrainConfig(env_id="FetchPush-v4", method=method, steps=steps, warm_start_steps=100, eval_every=steps,
                             eval_episodes=1, checkpoint_every=steps, hidden=32, video=False,
                             offline_demos=method == "dsrl_na")
        run = train(config, tmp_path / method)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["env_steps"] >= steps and all(0 <= line["success_rate"] <= 1 for line in lines)
        config.steps = steps + 50
        train(config, run)  # resumes: replay buffer (HER's episode bookkeeping included) and counters reloaded
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["env_steps"] >= steps + 50
        summary = api.evaluate_run(run, episodes=1, video=False)
        assert 0 <= summary["steered_success_rate"] <= 1
        if method.startswith("dsrl"):
            assert 0 <= summary["base_success_rate"] <= 1


def test_sac_her_and_rlpd_refuse_tasks_they_cannot_run():
    from ddpo.steering.train import TrainConfig

    with pytest.raises(ValueError, match="goal-conditioned"):
        TrainConfig(env_id="Pendulum-v1", method="sac_her").validate()
    with pytest.raises(ValueError, match="no scripted demonstrator"):
        TrainConfig(env_id="TwoGoal-v0", method="rlpd").validate()
    with pytest.raises(ValueError, match="--offline-demos is for dsrl_na"):
        TrainConfig(env_id="FetchPush-v4", method="rlpd", offline_demos=True).validate()


@pytest.mark.parametrize("env_id", FETCH)
def test_shipped_fetch_bases_succeed_sometimes_not_always(env_id):
    """The cloned base is what DSRL steers: it must succeed sometimes (the expert is in its support) and fail
    often. Measured on 50 evaluation seeds, w ~ N(0, I) / w = 0: FetchPush 0.20 / 0.46,
    FetchPickAndPlace 0.42 / 0.50."""
    from ddpo.steering.base import pretrained_path
    from ddpo.steering.evaluate import base_actor
    from ddpo.steering.policy import DiffusionPolicy

    folder = pretrained_path(env_id)
    assert sum(path.stat().st_size for path in folder.iterdir()) < 400_000
    policy = DiffusionPolicy.from_pretrained(folder)
    _, success = evaluate_episodes(env_id, base_actor(policy, "gaussian", seed=0), 20)
    assert 0.05 <= success <= 0.7, success
    # An untrained DSRL actor outputs w ~ 0: that mode must leave a gap too, or the task tests nothing.
    _, zero_success = evaluate_episodes(env_id, base_actor(policy, "zero"), 20)
    assert zero_success <= 0.8, zero_success


def test_rlpd_batches_are_half_demonstrations_with_scaled_actions():
    from ddpo.steering.baselines import make_raw_model

    n = 40
    demos = {"obs": np.zeros((n, 31), np.float32), "actions": np.full((n, 4), 0.5, np.float32),
             "rewards": np.full(n, 7.0, np.float32), "next_obs": np.ones((n, 31), np.float32), "dones": np.zeros(n, np.float32)}
    env, model = make_raw_model("rlpd", "FetchPush-v4", seed=0, hidden=16, layers=1, learning_starts=0, buffer_size=500, demos=demos)
    obs, _ = env.reset(seed=0)
    for _ in range(60):  # online transitions: the env's rewards are -1 or 0, never 7
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        model.replay_buffer.add(obs[None], next_obs[None], action[None], np.array([reward]), np.array([terminated]), [{}])
        obs = next_obs
    batch = model.replay_buffer.sample(256)
    from_demos = (batch.rewards[:, 0] == 7.0).numpy()
    assert from_demos.sum() == 128 and batch.observations.shape == (256, 31)
    np.testing.assert_allclose(batch.actions[from_demos].numpy(), 0.5)  # Fetch's action box is [-1, 1]: unchanged
    np.testing.assert_allclose(batch.next_observations[from_demos].numpy(), 1.0)
