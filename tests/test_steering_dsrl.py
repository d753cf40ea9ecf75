"""DSRL on the two-goal toy, DSRL-NA and SB3 checkpoints, and training runs (metrics, resume, errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpo.steering.bc import train_bc
from ddpo.steering.dsrl_na import DSRLNA, Batch, DSRLNAConfig, ReplayBuffer
from ddpo.steering.envs import make_env, two_goal_expert
from ddpo.steering.evaluate import base_actor, rollout, steered_actor
from ddpo.steering.experts import Demos
from ddpo.steering.noise_env import NoiseActionEnv
from ddpo.steering.policy import DiffusionPolicyConfig

HORIZON = 4


def two_goal_demos(n_episodes: int, seed: int = 0) -> Demos:
    """Each demonstration heads for the left or the right goal with probability 1/2 (only the right one pays)."""
    rng = np.random.default_rng(seed)
    env = make_env("TwoGoal-v0")
    obs_rows, action_rows = [], []
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=episode)
        goal = 1.0 if rng.random() < 0.5 else -1.0
        done = False
        while not done:
            chunk = []
            obs_rows.append(obs)
            for _ in range(HORIZON):
                action = np.clip(two_goal_expert(obs, goal) + rng.normal(0, 0.05, 2), -1, 1).astype(np.float32)
                chunk.append(action)
                if not done:
                    obs, _, terminated, truncated, _ = env.step(action)
                    done = terminated or truncated
            action_rows.append(np.stack(chunk))
    n = len(obs_rows)
    zeros = np.zeros(n, np.float32)
    return Demos(np.asarray(obs_rows, np.float32), np.asarray(action_rows, np.float32), zeros, np.asarray(obs_rows, np.float32), zeros, zeros)


@pytest.fixture(scope="module")
def toy_policy():
    config = DiffusionPolicyConfig(obs_dim=2, act_dim=2, horizon=HORIZON, hidden=64, num_inference_steps=5, env_id="TwoGoal-v0")
    return train_bc(two_goal_demos(300), config, -np.ones(2), np.ones(2), steps=1500, batch_size=128, lr=2e-3)


def success_rate(act, episodes: int = 60) -> float:
    env = make_env("TwoGoal-v0")
    return float(np.mean([rollout(env, act, seed=10_000 + i) > 0.5 for i in range(episodes)]))


def test_dsrl_na_steers_the_two_goal_policy_to_the_rewarded_goal(toy_policy):
    torch.manual_seed(0)
    base = success_rate(base_actor(toy_policy, "gaussian", seed=1))
    assert 0.25 <= base <= 0.75, f"the base should pick either goal about half the time, got {base}"

    env = NoiseActionEnv(make_env("TwoGoal-v0"), toy_policy, noise_bound=1.5)
    config = DSRLNAConfig(hidden=64, batch_size=64, lr=1e-3)
    agent = DSRLNA(toy_policy, 2, config)
    buffer, rng = ReplayBuffer(5_000, 2, 2 * HORIZON), np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    decisions = 0
    for decisions in range(1, 5_001):
        warm = decisions <= 100
        noise = np.clip(rng.standard_normal(8), -1.5, 1.5) if warm else agent.act(obs, deterministic=False)
        next_obs, reward, terminated, truncated, info = env.step(noise)
        buffer.add(obs, info["action_chunk"], reward, next_obs, terminated, config.gamma ** info["env_steps"])
        obs = env.reset()[0] if terminated or truncated else next_obs
        if not warm:
            agent.update(buffer.sample(config.batch_size, rng))
        if decisions % 200 == 0 and success_rate(steered_actor(toy_policy, lambda o: agent.act(o, True)), 30) >= 0.95:
            break
    steered = success_rate(steered_actor(toy_policy, lambda o: agent.act(o, deterministic=True)))
    assert steered >= 0.9, f"DSRL-NA reached {steered:.2f} success after {decisions} decisions (base {base:.2f})"


def test_dsrl_sac_with_unchanged_sb3_sac_steers_the_two_goal_policy(toy_policy):
    from ddpo.steering.sb3 import make_sac, warm_start

    env = NoiseActionEnv(make_env("TwoGoal-v0"), toy_policy, noise_bound=1.5)
    model = make_sac(env, seed=0, hidden=64, buffer_size=5_000)
    decisions = warm_start(model, env, env_steps=300, seed=0)
    act = steered_actor(toy_policy, lambda obs: model.predict(obs, deterministic=True)[0])
    while decisions < 5_000:
        model.learn(total_timesteps=250, reset_num_timesteps=False)
        decisions += 250
        if success_rate(act, 30) >= 0.95:
            break
    steered = success_rate(act)
    assert steered >= 0.9, f"DSRL-SAC reached {steered:.2f} success after {decisions} decisions"


def test_dsrl_na_save_load_round_trip(tmp_path, toy_policy):
    agent = DSRLNA(toy_policy, 2, DSRLNAConfig(hidden=32, batch_size=8))
    buffer, rng = ReplayBuffer(100, 2, 8), np.random.default_rng(0)
    for i in range(20):
        buffer.add(rng.normal(size=2), rng.normal(size=8), float(i), rng.normal(size=2), i % 5 == 0, 0.9)
    agent.update(buffer.sample(8, rng))
    agent.save(tmp_path)
    buffer.save(tmp_path / "replay.npz")
    loaded, loaded_buffer = DSRLNA(toy_policy, 2, DSRLNAConfig(hidden=32, batch_size=8)), ReplayBuffer(100, 2, 8)
    loaded.load(tmp_path)
    loaded_buffer.load(tmp_path / "replay.npz")
    obs = np.array([0.1, -0.2], np.float32)
    np.testing.assert_array_equal(agent.act(obs, deterministic=True), loaded.act(obs, deterministic=True))
    assert loaded.qa_optimizer.state_dict()["state"].keys() == agent.qa_optimizer.state_dict()["state"].keys()
    assert (loaded_buffer.size, loaded_buffer.pos) == (20, 20)
    np.testing.assert_array_equal(loaded_buffer.rewards, buffer.rewards)
    assert not any(key.startswith("policy.") for key in agent.state_dict()), "the frozen policy must not be saved"


def test_sb3_checkpoint_round_trip(tmp_path, toy_policy):
    from ddpo.steering.sb3 import load_sac, make_sac, save_sac, warm_start

    env = NoiseActionEnv(make_env("TwoGoal-v0"), toy_policy)
    model = make_sac(env, seed=0, hidden=32, buffer_size=500)
    assert warm_start(model, env, env_steps=40, seed=0) > 0
    model.learn(total_timesteps=30, reset_num_timesteps=False)
    save_sac(model, tmp_path, {"env_steps": env.env_steps, "decisions": 7})
    loaded = make_sac(NoiseActionEnv(make_env("TwoGoal-v0"), toy_policy), seed=1, hidden=32, buffer_size=500)
    state = load_sac(loaded, tmp_path)
    obs = np.array([0.3, 0.0], np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    assert state["decisions"] == 7 and loaded.num_timesteps == model.num_timesteps
    assert loaded.replay_buffer.pos == model.replay_buffer.pos
    np.testing.assert_array_equal(loaded.replay_buffer.actions, model.replay_buffer.actions)


@pytest.mark.parametrize("method", ["dsrl_na", "dsrl_sac", "sac_scratch"])
def test_train_run_writes_metrics_and_resumes(tmp_path, toy_policy, method):
    from ddpo.steering.api import list_runs, run_episodes
    from ddpo.steering.train import TrainConfig, train

    toy_policy.save_pretrained(tmp_path / "policy")
    config = dict(env_id="TwoGoal-v0", method=method, policy=str(tmp_path / "policy"), warm_start_steps=40,
                  eval_every=60, eval_episodes=2, checkpoint_every=60, hidden=32)
    run = tmp_path / "runs" / "toy"
    train(TrainConfig(steps=120, **config), run)
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"env_steps", "episodic_return_mean", "episodic_return_std"} <= first[0].keys()
    assert first[-1]["env_steps"] >= 120 and (run / "rollout.gif").stat().st_size > 0
    train(TrainConfig(steps=240, **config), run)  # same run, bigger budget: resumes from the checkpoint
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["env_steps"] for line in lines]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert steps[-1] >= 240 and json.loads((run / "checkpoint" / "state.json").read_text())["env_steps"] >= 240

    # The UI API: the run is listed, and base against steered episodes come back with a video.
    assert [r["name"] for r in list_runs(tmp_path / "runs")] == ["toy"]
    base, steered, video = run_episodes("TwoGoal-v0", policy=str(tmp_path / "policy"), steering_checkpoint=str(run),
                                        n=2, seed=3, video_dir=str(tmp_path))
    assert len(base) == 2 and len(steered) == 2 and video.endswith(".gif")


def test_cli_reports_bad_input_clearly(capsys, tmp_path):
    from ddpo.steering.cli import main

    assert main(["train", "--env", "CartPole-v9", "--method", "dsrl_na", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown environment id 'CartPole-v9'" in capsys.readouterr().err
    assert main(["train", "--env", "Pendulum-v1", "--method", "dsrl_sac", "--noise-bound", "0", "--runs-dir", str(tmp_path)]) == 2
    assert "--noise-bound must be a finite number > 0" in capsys.readouterr().err
    assert main(["train", "--env", "Reacher-v5", "--method", "dsrl_sac", "--policy",
                 str(__import__("ddpo.steering.base", fromlist=["x"]).pretrained_path("Pendulum-v1")),
                 "--runs-dir", str(tmp_path)]) == 2
    assert "observations of size 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--env", "Pendulum-v1", "--method", "dsrl_na", "--eval-episodes", "0", "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--eval-episodes must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "a rejected run must not leave files behind"


def test_offline_demonstrations_go_into_the_replay_buffer_as_chunk_transitions():
    from ddpo.steering.train_na import add_offline_demos

    buffer = ReplayBuffer(20_000, 3, 4)
    added = add_offline_demos(buffer, "Pendulum-v1", seed=0, gamma=0.99)
    assert added == buffer.size == 5_000  # 100 episodes x 50 chunks of 4 steps
    np.testing.assert_allclose(buffer.discounts[:added], 0.99**4, rtol=1e-6)
    assert np.all(np.abs(buffer.actions[:added]) <= 2.0) and np.all(buffer.rewards[:added] <= 0)
    assert np.all(np.isfinite(buffer.next_obs[:added]))


def test_cli_list_shows_the_shipped_base_policies(capsys, tmp_path):
    from ddpo.cli import main

    assert main(["steer", "list", "--runs-dir", str(tmp_path)]) == 0
    listing = json.loads(capsys.readouterr().out)
    shipped = {p["env_id"] for p in listing["base_policies"]}
    assert shipped == {"Pendulum-v1", "Reacher-v5", "FetchPush-v4", "FetchPickAndPlace-v4"}
    assert listing["runs"] == []


def test_chunk_rewards_are_discounted_per_environment_step():
    from ddpo.steering.noise_env import discounted_chunk

    assert discounted_chunk([-1, -1, -1, -1], 0.5) == pytest.approx((-1.875, 0.0625))
    assert discounted_chunk([-1, 0], 0.5) == pytest.approx((-1.0, 0.25))  # a chunk the time limit cut short
    with pytest.raises(ValueError):
        discounted_chunk([], 0.5)


def test_truncated_episodes_bootstrap_and_a_cut_chunk_is_discounted_by_the_steps_it_ran():
    # Reacher-v5 never terminates; its 50-step limit truncates the 13th chunk after 2 of its 4 steps.
    from ddpo.steering.policy import CallablePolicy
    from ddpo.steering.train_na import step_and_store

    policy = CallablePolicy(lambda obs, noise: 0.1 * noise, obs_dim=10, act_dim=2, horizon=4)
    env, buffer, gamma = NoiseActionEnv(make_env("Reacher-v5"), policy), ReplayBuffer(20, 10, 8), 0.9
    obs, _ = env.reset(seed=0)
    done, rewards = False, []
    while not done:
        obs, terminated, truncated, info = step_and_store(env, buffer, obs, np.full(8, 0.5, np.float32), gamma)
        rewards.append(info["step_rewards"])
        done = terminated or truncated
    assert truncated and buffer.size == 13
    assert not buffer.dones[:13].any(), "a time limit is not a terminal state: the TD target must bootstrap"
    np.testing.assert_allclose(buffer.discounts[:13], [gamma**4] * 12 + [gamma**2], rtol=1e-6)
    last = rewards[-1]
    assert len(last) == 2 and buffer.rewards[12] == pytest.approx(last[0] + gamma * last[1], rel=1e-5)


def test_td_target_uses_each_transitions_discount_and_zeroes_only_terminal_ones(toy_policy):
    config = DSRLNAConfig(hidden=16, batch_size=4, backup_entropy=False, tau=0.0)  # tau 0: targets stay put
    agent = DSRLNA(toy_policy, 2, config)
    with torch.no_grad():  # target critics output the constant -10 whatever the input
        for target in (agent.qa1_target, agent.qa2_target):
            target[-1].weight.zero_()
            target[-1].bias.fill_(-10.0)
    for done, discount, expected in ((0.0, 0.5, -1.0 + 0.5 * -10.0), (1.0, 0.5, -1.0), (0.0, 0.9, -1.0 + 0.9 * -10.0)):
        batch = Batch(torch.zeros(4, 2), torch.zeros(4, 8), torch.full((4,), -1.0), torch.zeros(4, 2),
                      torch.full((4,), done), torch.full((4,), discount))
        assert agent.update(batch)["q_mean"] == pytest.approx(expected, rel=1e-5)


def test_actor_and_critics_see_observations_standardised_with_the_base_policys_statistics(toy_policy):
    agent = DSRLNA(toy_policy, 2, DSRLNAConfig(hidden=16))
    mean, std = toy_policy.obs_mean, toy_policy.obs_std
    np.testing.assert_allclose(agent.normalize(mean[None]).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(agent.normalize((mean + std)[None]).numpy(), 1.0, rtol=1e-5)
    assert agent.normalize((mean + 100 * std)[None]).max().item() == 5.0  # clipped: a rare outlier stays bounded
    raw = DSRLNA(toy_policy, 2, DSRLNAConfig(hidden=16, normalize_obs=False))
    np.testing.assert_allclose(raw.normalize(mean[None]).numpy(), mean[None].numpy(), rtol=1e-6)


def test_base_kl_regulariser_raises_the_temperature_only_when_the_actor_strays_from_the_base_noise(toy_policy):
    agent = DSRLNA(toy_policy, 2, DSRLNAConfig(hidden=16, regularizer="base_kl", target_kl=0.5))
    near = agent.penalty(torch.zeros(1000, 8), torch.distributions.Normal(0.0, 1.0).log_prob(torch.zeros(1000, 8)).sum(-1))
    assert near.abs().max().item() < 1e-5  # pi^W = N(0, I) at w = 0: no penalty
    for penalty, alpha_goes_up in ((torch.full((4,), 20.0), True), (torch.full((4,), 1.0), False)):
        agent.log_alpha.grad = None
        agent.alpha_loss(penalty).backward()
        assert (agent.log_alpha.grad.item() < 0) == alpha_goes_up  # gradient descent: negative grad raises alpha


def test_per_environment_dsrl_defaults_fill_only_what_the_user_left_unset():
    from ddpo.steering.train import TrainConfig

    fetch = TrainConfig(env_id="FetchPush-v4", method="dsrl_na").resolved()
    assert (fetch.gamma, fetch.init_alpha, fetch.reward_shift, fetch.regularizer) == (0.98, 0.1, 1.0, "base_kl")
    pendulum = TrainConfig(env_id="Pendulum-v1", method="dsrl_na").resolved()
    assert pendulum.gamma**4 == pytest.approx(0.99) and pendulum.regularizer == "entropy" and pendulum.reward_shift == 0.0
    assert TrainConfig(env_id="FetchPush-v4", method="dsrl_na", gamma=0.9).resolved().gamma == 0.9
    # Evaluation episodes: 20 on Fetch (the documented tables), 10 elsewhere, whatever the method; a given value stays.
    assert (fetch.eval_episodes, pendulum.eval_episodes) == (20, 10)
    assert TrainConfig(env_id="FetchPickAndPlace-v4", method="sac_her").resolved().eval_episodes == 20
    assert TrainConfig(env_id="FetchPush-v4", method="dsrl_na", eval_episodes=3).resolved().eval_episodes == 3
    with pytest.raises(ValueError, match="gamma"):
        TrainConfig(env_id="FetchPush-v4", method="dsrl_na", gamma=1.0).validate()


def test_dsrl_sac_sees_standardised_observations_and_per_step_discounted_shifted_rewards(toy_policy):
    from ddpo.steering.noise_env import AgentView
    from ddpo.steering.policy import policy_obs_stats

    stats = policy_obs_stats(toy_policy)
    noise_env = NoiseActionEnv(make_env("TwoGoal-v0"), toy_policy)
    env = AgentView(noise_env, stats, gamma=0.5, reward_shift=1.0)
    obs, _ = env.reset(seed=0)
    raw = noise_env._obs
    np.testing.assert_allclose(obs, np.clip((raw - stats[0]) / stats[1], -5, 5), rtol=1e-6)
    assert env.observation_space.shape == (2,) and not np.allclose(obs, raw)
    _, reward, _, _, info = env.step(np.zeros(8, np.float32))
    step_rewards = np.asarray(info["step_rewards"]) + 1.0
    assert reward == pytest.approx(sum(0.5**i * r for i, r in enumerate(step_rewards)))
    assert env.env_steps == noise_env.env_steps == len(step_rewards)


def test_dsrl_sac_run_acts_the_same_after_loading_through_the_api(tmp_path, toy_policy):
    """The loaded agent must standardise observations as in training: its evaluation on the fixed seeds equals
    the run's last metrics line. Old runs (no "normalize_obs" in config.json) saw raw observations."""
    from ddpo.steering.api import evaluate_run, load_run_actor
    from ddpo.steering.train import TrainConfig, train

    toy_policy.save_pretrained(tmp_path / "policy")
    config = TrainConfig(env_id="TwoGoal-v0", method="dsrl_sac", policy=str(tmp_path / "policy"), steps=200,
                         warm_start_steps=40, eval_every=200, eval_episodes=3, checkpoint_every=200, hidden=32, video=False)
    run = train(config, tmp_path / "run")
    saved = json.loads((run / "config.json").read_text())
    assert saved["normalize_obs"] is True
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["episodic_return_mean"]
    summary = evaluate_run(run, video=False)  # as many episodes as the run's evaluations: 3
    assert summary["episodes"] == 3 and summary["steered_return_mean"] == pytest.approx(logged, rel=1e-6)
    obs = np.array([0.4, -0.3], np.float32)
    standardised = load_run_actor(run)[1](obs)
    saved.pop("normalize_obs")
    (run / "config.json").write_text(json.dumps(saved))
    assert not np.allclose(load_run_actor(run)[1](obs), standardised, atol=1e-4)


@pytest.mark.parametrize("method", ["dsrl_na", "dsrl_sac"])
def test_evaluation_never_changes_what_a_run_trains(tmp_path, toy_policy, method):
    """Evaluations draw no random numbers: runs that evaluate on 1 or on 3 episodes end with identical weights
    (what lets --eval-episodes default per environment without changing documented training curves)."""
    from ddpo.steering.train import TrainConfig, train

    toy_policy.save_pretrained(tmp_path / "policy")
    weights = []
    for episodes in (1, 3):
        config = TrainConfig(env_id="TwoGoal-v0", method=method, policy=str(tmp_path / "policy"), steps=160,
                             warm_start_steps=40, eval_every=40, eval_episodes=episodes, hidden=32, video=False)
        run = train(config, tmp_path / f"run{episodes}")
        weights.append(next((run / "checkpoint").glob("*.safetensors")).read_bytes())
    assert weights[0] == weights[1]


def test_a_run_saved_before_standardisation_resumes_with_raw_observations(tmp_path, toy_policy):
    from ddpo.steering.train import TrainConfig, train

    toy_policy.save_pretrained(tmp_path / "policy")
    config = dict(env_id="TwoGoal-v0", method="dsrl_sac", policy=str(tmp_path / "policy"), warm_start_steps=40,
                  eval_every=60, eval_episodes=2, checkpoint_every=60, hidden=32, video=False)
    run = train(TrainConfig(steps=120, normalize_obs=False, **config), tmp_path / "run")
    saved = json.loads((run / "config.json").read_text())
    del saved["normalize_obs"]  # as config.json was written before 2026-12-01
    (run / "config.json").write_text(json.dumps(saved))
    config["eval_episodes"] = 3  # free on resume: evaluation does not change training
    train(TrainConfig(steps=180, **config), run)  # the default (standardise) must not apply to the old agent
    assert json.loads((run / "config.json").read_text())["normalize_obs"] is False
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["env_steps"] >= 180
