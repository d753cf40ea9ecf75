"""Baselines on raw actions, built on stable-baselines3's SAC: SAC from scratch, SAC + hindsight relabelling
(HER, on the goal-dict Fetch environments) and RLPD-style SAC (half of every batch from the demonstrations).

RLPD here is "symmetric sampling" only (Ball et al., 2023): SAC with 50 % of each batch drawn from the
degraded demonstrations' step transitions. It does not use RLPD's critic ensemble, LayerNorm or high update
ratio; one gradient update per environment step, as SAC from scratch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

RAW_METHODS = ("sac_scratch", "sac_her", "rlpd")
DEMO_FRACTION = 0.5


def demo_transitions(env_id: str, seed: int) -> dict[str, np.ndarray]:
    """The degraded demonstrations as step transitions: obs (M, obs_dim), actions (M, act_dim), rewards,
    next_obs (M, obs_dim), dones (M,). Collected with a seed the shipped base was not cloned from."""
    from .base import make_demos

    demos = make_demos(env_id, seed=1_000 + seed)
    return {"obs": demos.step_obs, "actions": demos.step_actions, "rewards": demos.step_rewards,
            "next_obs": demos.step_next_obs, "dones": demos.step_dones}


def demo_mix_buffer_class():
    """An SB3 ReplayBuffer whose sample() draws DEMO_FRACTION of the batch from fixed demonstration arrays
    (a class factory so stable-baselines3 is imported only when the method runs)."""
    import torch
    from stable_baselines3.common.buffers import ReplayBuffer
    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    class DemoMixReplayBuffer(ReplayBuffer):
        def __init__(self, *args, demos: dict[str, np.ndarray] | None = None, seed: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            if demos is None or len(demos["obs"]) == 0:
                raise ValueError("rlpd needs demonstrations; the task has no scripted demonstrator")
            low, high = self.action_space.low, self.action_space.high
            scaled = 2.0 * (demos["actions"] - low) / (high - low) - 1.0  # SB3 stores actions scaled to [-1, 1]
            self.demo = {key: torch.as_tensor(np.asarray(value, np.float32)) for key, value in dict(demos, actions=scaled).items()}
            self.demo_rng = np.random.default_rng(seed)

        def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
            n_demo = int(round(batch_size * DEMO_FRACTION))
            online = super().sample(batch_size - n_demo, env)
            index = torch.as_tensor(self.demo_rng.integers(0, len(self.demo["obs"]), n_demo))
            demo = self.demo
            parts = (demo["obs"][index], demo["actions"][index], demo["next_obs"][index],
                     demo["dones"][index, None], demo["rewards"][index, None])
            return ReplayBufferSamples(*(torch.cat([a, b.to(a.device)]) for a, b in zip(online, parts)))

    return DemoMixReplayBuffer


def make_raw_model(method: str, env_id: str, seed: int, hidden: int, layers: int, learning_starts: int,
                   buffer_size: int = 100_000, demos: dict[str, np.ndarray] | None = None):
    """(env, SAC model) for a raw-action method. sac_her uses the goal-dict env; the others the flat one."""
    from .envs import make_env
    from .fetch import FETCH_ENVS, make_fetch
    from .sb3 import make_sac

    if method == "sac_her":
        if env_id not in FETCH_ENVS:
            raise ValueError(f"sac_her needs a goal-conditioned task ({', '.join(FETCH_ENVS)}), not {env_id}")
        from stable_baselines3 import HerReplayBuffer

        env = make_fetch(env_id, flat=False)
        kwargs = {"replay_buffer_class": HerReplayBuffer,
                  "replay_buffer_kwargs": {"n_sampled_goal": 4, "goal_selection_strategy": "future"}}
        # HER samples whole episodes: learning must not start before one has ended.
        learning_starts = max(learning_starts, env.spec.max_episode_steps)
        return env, make_sac(env, seed, hidden, layers, learning_starts, buffer_size, policy="MultiInputPolicy", **kwargs)
    env = make_env(env_id)
    kwargs = {}
    if method == "rlpd":
        kwargs = {"replay_buffer_class": demo_mix_buffer_class(),
                  "replay_buffer_kwargs": {"demos": demos if demos is not None else demo_transitions(env_id, seed), "seed": seed}}
    return env, make_sac(env, seed, hidden, layers, learning_starts, buffer_size, **kwargs)


def raw_actor(method: str, model) -> Callable[[np.ndarray], np.ndarray]:
    """A ChunkActor (flat obs -> (1, act_dim)) for a trained raw-action model."""
    if method == "sac_her":
        from .fetch import unflatten_goal_obs

        return lambda obs: model.predict(unflatten_goal_obs(obs), deterministic=True)[0][None]
    return lambda obs: model.predict(obs, deterministic=True)[0][None]
