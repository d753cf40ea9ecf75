"""Reward functions for DDPO. This package never imports the trainer.

Contract (used by the trainer, `ddpo score`, the reward server and the UI):

    reward = build_reward("jpeg_compressibility")            # a registry name, or "package.module:function"
    reward = build_reward("aesthetic", device="cuda")        # keyword arguments configure it
    scores, info = reward(images, prompts, metadata)

- images: a list of PIL images, or a float tensor (B, 3, H, W) with values in [0, 1]
- prompts: list[str] of length B; metadata: list[dict] of length B (from the prompt grammar)
- scores: float32 numpy array of shape (B,); info: dict of per-sample lists (captions, sub-scores)

NOTE: minimal placeholder until the reward package lands (issue 3).
"""

from __future__ import annotations

import importlib
import io
from typing import Any, Callable

import numpy as np

RewardFn = Callable[[Any, list, list], "tuple[np.ndarray, dict[str, list]]"]


def _to_pil(images: Any) -> list:
    from PIL import Image

    if isinstance(images, list):
        return [im.convert("RGB") for im in images]
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _jpeg_kb(images: Any) -> np.ndarray:
    sizes = []
    for im in _to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return np.asarray(sizes, dtype=np.float32)


def _jpeg_compressibility(**_: Any) -> RewardFn:
    def reward(images, prompts, metadata):
        kb = _jpeg_kb(images)
        return -kb, {"jpeg_kb": kb.tolist()}
    return reward


def _jpeg_incompressibility(**_: Any) -> RewardFn:
    def reward(images, prompts, metadata):
        kb = _jpeg_kb(images)
        return kb, {"jpeg_kb": kb.tolist()}
    return reward


REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": _jpeg_compressibility,
    "jpeg_incompressibility": _jpeg_incompressibility,
}


def list_rewards() -> list[str]:
    return sorted(REGISTRY)


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    if ":" in name:
        module, func = name.split(":", 1)
        return getattr(importlib.import_module(module), func)(**kwargs)
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(list_rewards())}, or 'package.module:function'")
    return REGISTRY[name](**kwargs)
