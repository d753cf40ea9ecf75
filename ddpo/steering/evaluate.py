"""Evaluation on fixed seeds, and rendered rollouts (base against steered) written as GIF."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .envs import check_finite, episode_success, make_env
from .policy import SteerablePolicy

EVAL_SEED = 100_000  # evaluation episodes use seeds EVAL_SEED, EVAL_SEED + 1, ... for every method

# act(obs (obs_dim,)) -> actions (k, act_dim) to run open-loop (k = 1 for a plain policy, H for a chunk).
ChunkActor = Callable[[np.ndarray], np.ndarray]


def base_actor(policy: SteerablePolicy, noise: str, seed: int = 0) -> ChunkActor:
    """The frozen policy alone: noise 'gaussian' (w ~ N(0, I), seeded) or 'zero' (w = 0)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (1, policy.horizon, policy.act_dim)

    def act(obs: np.ndarray) -> np.ndarray:
        w = torch.randn(shape, generator=generator) if noise == "gaussian" else torch.zeros(shape)
        return policy(torch.as_tensor(np.asarray(obs, np.float32))[None], w)[0].numpy()

    if noise not in ("gaussian", "zero"):
        raise ValueError(f"noise must be 'gaussian' or 'zero', got {noise!r}")
    return act


def steered_actor(policy: SteerablePolicy, noise_fn: Callable[[np.ndarray], np.ndarray]) -> ChunkActor:
    """The frozen policy driven by a noise actor noise_fn(obs) -> w (H*A,)."""

    def act(obs: np.ndarray) -> np.ndarray:
        w = torch.as_tensor(np.asarray(noise_fn(obs), np.float32)).reshape(1, policy.horizon, policy.act_dim)
        return policy(torch.as_tensor(np.asarray(obs, np.float32))[None], w)[0].numpy()

    return act


def run_episode(env, act: ChunkActor, seed: int, frames: list | None = None) -> tuple[float, bool | None]:
    """One episode: (return, success from the last step's info, None for tasks without success).
    Appends rendered frames (H, W, 3) to `frames` when given."""
    obs, _ = env.reset(seed=seed)
    total, done, info = 0.0, False, {}
    if frames is not None:
        frames.append(render_frame(env, obs))
    while not done:
        for action in act(obs):
            action = np.clip(action, env.action_space.low, env.action_space.high)
            obs, reward, terminated, truncated, info = env.step(action)
            check_finite("reward", reward)
            total += float(reward)
            done = terminated or truncated
            if frames is not None:
                frames.append(render_frame(env, obs))
            if done:
                break
    return total, episode_success(info)


def rollout(env, act: ChunkActor, seed: int, frames: list | None = None) -> float:
    """One episode; returns its return (see run_episode for the success as well)."""
    return run_episode(env, act, seed, frames)[0]


def evaluate_episodes(env_id: str, act: ChunkActor, episodes: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, float | None]:
    """Returns (episodes,) on seeds seed, seed + 1, ..., and the success rate (None for tasks without one)."""
    if episodes < 1:  # a mean over no episode is NaN
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = make_env(env_id)
    results = [run_episode(env, act, seed + i) for i in range(episodes)]
    successes = [success for _, success in results]
    rate = None if successes[0] is None else float(np.mean(successes))
    return np.asarray([total for total, _ in results]), rate


def evaluate(env_id: str, act: ChunkActor, episodes: int, seed: int = EVAL_SEED) -> np.ndarray:
    """Returns (episodes,) on seeds seed, seed + 1, ..."""
    return evaluate_episodes(env_id, act, episodes, seed)[0]


def render_frame(env, obs: np.ndarray) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8. Pendulum is drawn here from the observation, so pygame is not needed."""
    if env.spec is not None and env.spec.id == "Pendulum-v1":
        return _draw_pendulum(obs)
    frame = env.render()
    if frame is None:
        raise RuntimeError("the environment returned no frame: create it with render_mode='rgb_array'")
    if frame.shape[0] > 240:  # keep GIFs small
        step = int(np.ceil(frame.shape[0] / 240))
        frame = frame[::step, ::step]
    return np.ascontiguousarray(frame)


def _draw_pendulum(obs: np.ndarray, size: int = 160) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    center, length = size / 2, size * 0.38
    tip = (center + length * float(obs[1]), center - length * float(obs[0]))  # obs = [cos th, sin th, th_dot]
    draw.line([(center, center), tip], fill=(204, 77, 77), width=max(3, size // 16))
    draw.ellipse([center - 4, center - 4, center + 4, center + 4], fill=(0, 0, 0))
    return np.asarray(image)


def _label(frame: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    ImageDraw.Draw(image).text((4, 2), text, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(image)


def record_comparison(env_id: str, actors: dict[str, ChunkActor], path: str | Path, seed: int = EVAL_SEED) -> tuple[Path, dict[str, float]]:
    """Render one episode per actor (same seed) side by side into a GIF; returns the path and each return."""
    import imageio.v2 as imageio

    clips, returns = [], {}
    for name, act in actors.items():
        env = make_env(env_id, render_mode="rgb_array")
        frames: list[np.ndarray] = []
        returns[name], success = run_episode(env, act, seed, frames)
        if success is not None:
            returns[f"{name}_success"] = success
        env.close()
        clips.append(frames)
    clips = [[_label(frame, name) for frame in clip] for name, clip in zip(actors, clips)]
    length = max(len(clip) for clip in clips)
    clips = [clip + [clip[-1]] * (length - len(clip)) for clip in clips]  # hold the last frame of shorter episodes
    joined = [np.concatenate([clip[t] for clip in clips], axis=1) for t in range(length)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, joined, duration=50, loop=0)
    return path, returns
