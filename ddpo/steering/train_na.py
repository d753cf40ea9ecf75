"""The DSRL-NA training loop (the update itself is in dsrl_na.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .dsrl_na import DSRLNA, DSRLNAConfig, ReplayBuffer
from .envs import make_env
from .evaluate import ChunkActor, steered_actor
from .noise_env import NoiseActionEnv


def add_offline_demos(buffer: ReplayBuffer, env_id: str, seed: int) -> int:
    """Degraded demonstrations as chunk transitions (s, a, r, s', done); returns how many went in."""
    from .base import make_demos

    demos = make_demos(env_id, seed=1_000 + seed)  # not the seed the shipped base was cloned from
    for row in range(len(demos.obs)):
        buffer.add(demos.obs[row], demos.actions[row], demos.rewards[row], demos.next_obs[row], demos.dones[row])
    return len(demos.obs)


def train_dsrl_na(config, run_dir: Path, checkpoint: Path) -> ChunkActor:
    from .train import Progress, _trim_metrics, load_base_policy

    policy = load_base_policy(config.env_id, config.policy)
    env = NoiseActionEnv(make_env(config.env_id), policy, config.noise_bound)
    na_config = DSRLNAConfig(
        noise_bound=config.noise_bound, hidden=config.hidden, layers=config.layers,
        updates_per_decision=config.updates_per_decision,
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
        print(f"added {add_offline_demos(buffer, config.env_id, config.seed)} offline demonstration chunks", flush=True)
    progress = Progress(config, run_dir, actor, save, env.env_steps)
    progress.last_logged = last_logged

    obs, _ = env.reset(seed=config.seed + decisions)
    while env.env_steps < config.steps:
        if env.env_steps < config.warm_start_steps:
            noise = np.clip(rng.standard_normal(env.action_space.shape), -config.noise_bound, config.noise_bound)
        else:
            noise = agent.act(obs, deterministic=False)
        next_obs, reward, terminated, truncated, info = env.step(noise)
        buffer.add(obs, info["action_chunk"], reward, next_obs, terminated)
        decisions += 1
        obs = env.reset()[0] if terminated or truncated else next_obs
        if env.env_steps >= config.warm_start_steps and buffer.size >= na_config.batch_size:
            for _ in range(na_config.updates_per_decision):
                agent.update(buffer.sample(na_config.batch_size, rng))
        progress(env.env_steps, decisions, env.episode_returns)
    progress(env.env_steps, decisions, env.episode_returns, final=True)
    return actor()
