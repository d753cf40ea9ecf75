"""The DSRL-NA training loop (the update itself is in dsrl_na.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .dsrl_na import DSRLNA, DSRLNAConfig, ReplayBuffer
from .envs import episode_success, make_env
from .evaluate import ChunkActor, steered_actor
from .noise_env import NoiseActionEnv, discounted_chunk


def add_offline_demos(buffer: ReplayBuffer, env_id: str, seed: int, gamma: float, reward_shift: float = 0.0) -> int:
    """Degraded demonstrations as chunk transitions (s, a, r, s', done); returns how many went in.

    Demonstration chunks store only their summed reward: it is spread evenly over the chunk's H steps,
    shifted and discounted like online chunks (discounted_chunk), and an episode's last, shorter chunk is
    treated as a full one (small approximations)."""
    from .base import make_demos

    demos = make_demos(env_id, seed=1_000 + seed)  # not the seed the shipped base was cloned from
    horizon = demos.actions.shape[1]
    for row in range(len(demos.obs)):
        reward, discount = discounted_chunk(np.full(horizon, demos.rewards[row] / horizon) + reward_shift, gamma)
        buffer.add(demos.obs[row], demos.actions[row], reward, demos.next_obs[row], demos.dones[row], discount)
    return len(demos.obs)


def step_and_store(env: NoiseActionEnv, buffer: ReplayBuffer, obs: np.ndarray, noise: np.ndarray, gamma: float,
                   reward_shift: float = 0.0):
    """Run one decision and store it: the executed chunk, its rewards (+ reward_shift per step) discounted
    per environment step, and done = terminated only. A time limit (Fetch's 50 steps, Reacher's) truncates
    without terminating, so the target still bootstraps from the last observation.
    Returns (next_obs, terminated, truncated, info); info["step_rewards"] are the environment's own."""
    next_obs, _, terminated, truncated, info = env.step(noise)
    chunk_reward, discount = discounted_chunk(np.asarray(info["step_rewards"]) + reward_shift, gamma)
    buffer.add(obs, info["action_chunk"], chunk_reward, next_obs, terminated, discount)
    return next_obs, terminated, truncated, info


class TrainingStats:
    """Means of the update statistics (critic scale, temperature, saturation) and the training episodes'
    success rate since the last metrics line: what shows a critic or an actor going wrong before the
    evaluation does."""

    def __init__(self) -> None:
        self.updates: list[dict[str, float]] = []
        self.successes: list[bool] = []

    def add_update(self, stats: dict[str, float]) -> None:
        self.updates.append(stats)

    def add_episode_end(self, info: dict) -> None:
        success = episode_success(info)
        if success is not None:
            self.successes.append(success)

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {key: float(np.mean([u[key] for u in self.updates])) for key in
                                       (self.updates[0] if self.updates else {})}
        if self.successes:
            out["success_rate"], out["episodes"] = float(np.mean(self.successes)), len(self.successes)
        self.updates, self.successes = [], []
        return out


def train_dsrl_na(config, run_dir: Path, checkpoint: Path) -> ChunkActor:
    from .train import Progress, _trim_metrics, load_base_policy

    policy = load_base_policy(config.env_id, config.policy)
    env = NoiseActionEnv(make_env(config.env_id), policy, config.noise_bound)
    na_config = DSRLNAConfig(
        noise_bound=config.noise_bound, hidden=config.hidden, layers=config.layers,
        updates_per_decision=config.updates_per_decision, gamma=config.gamma, init_alpha=config.init_alpha,
        backup_entropy=config.backup_entropy, regularizer=config.regularizer, normalize_obs=config.normalize_obs,
    )
    agent = DSRLNA(policy, env.observation_space.shape[0], na_config)
    buffer = ReplayBuffer(na_config.buffer_size, env.observation_space.shape[0], env.action_space.shape[0])
    rng = np.random.default_rng(config.seed)
    actor = lambda: steered_actor(policy, lambda obs: agent.act(obs, deterministic=True))  # noqa: E731

    def save(state: dict) -> None:
        agent.save(checkpoint)
        buffer.save(checkpoint / "replay.npz")
        (checkpoint / "state.json").write_text(json.dumps(state))

    decisions, last_logged = 0, -1
    if (checkpoint / "state.json").is_file():
        state = json.loads((checkpoint / "state.json").read_text())
        agent.load(checkpoint)
        buffer.load(checkpoint / "replay.npz")
        env.env_steps, decisions = state["env_steps"], state["decisions"]
        last_logged = _trim_metrics(run_dir, env.env_steps)
        print(f"resumed {run_dir} at {env.env_steps} environment steps", flush=True)
    elif config.offline_demos:
        print(f"added {add_offline_demos(buffer, config.env_id, config.seed, na_config.gamma, config.reward_shift)} offline demonstration chunks", flush=True)
    stats = TrainingStats()
    progress = Progress(config, run_dir, actor, save, env.env_steps, diagnostics=stats.summary)
    progress.last_logged = last_logged

    obs, _ = env.reset(seed=config.seed + decisions)
    while env.env_steps < config.steps:
        if env.env_steps < config.warm_start_steps:
            noise = np.clip(rng.standard_normal(env.action_space.shape), -config.noise_bound, config.noise_bound)
        else:
            noise = agent.act(obs, deterministic=False)
        next_obs, terminated, truncated, info = step_and_store(env, buffer, obs, noise, na_config.gamma, config.reward_shift)
        decisions += 1
        if terminated or truncated:
            stats.add_episode_end(info)
            obs = env.reset()[0]
        else:
            obs = next_obs
        if env.env_steps >= config.warm_start_steps and buffer.size >= na_config.batch_size:
            for _ in range(na_config.updates_per_decision):
                stats.add_update(agent.update(buffer.sample(na_config.batch_size, rng)))
        progress(env.env_steps, decisions, env.episode_returns)
    progress(env.env_steps, decisions, env.episode_returns, final=True)
    return actor()
