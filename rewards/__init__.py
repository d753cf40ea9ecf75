"""Reward functions for DDPO. This package never imports the trainer.

Contract (used by the trainer, `ddpo score`, the reward server and the UI):

    from rewards import build_reward, list_rewards
    reward = build_reward("jpeg_compressibility")            # a registry name, or "package.module:function"
    reward = build_reward("aesthetic", device="cuda")        # keyword arguments configure it (plain data only)
    scores, info = reward(images, prompts, metadata)

- images: a list of PIL images, or a float tensor (B, 3, H, W) with values in [0, 1]
- prompts: list[str] of length B; metadata: list[dict] of length B (from the prompt grammar), or None
- scores: float32 numpy array of shape (B,); info: dict of per-sample lists (captions, sub-scores)
- a sample that cannot be scored has score NaN and a reason in info["unscorable"][i] (None for scored samples)

Building a reward is cheap: models load on the first call, once, on the `device` kwarg, and are reused.
Keyword arguments must be plain data (str/int/float/bool/None/list/dict) so that a spawned worker process
can rebuild the same reward from (name, kwargs) alone.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any, Callable

import numpy as np

RewardFn = Callable[[Any, list, list], "tuple[np.ndarray, dict[str, list]]"]

# name -> "module:factory"; imported only when that reward is built, so `import rewards` stays light.
REGISTRY: dict[str, str] = {
    "jpeg_compressibility": "rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "rewards.jpeg:jpeg_incompressibility",
    "aesthetic": "rewards.aesthetic:AestheticReward",
    "vlm_bertscore": "rewards.alignment:VLMBertScoreReward",
    "compose": "rewards.compose:ComposeReward",
    "remote": "rewards.remote:RemoteReward",
    "pickscore": "rewards.extra:PickScoreReward",
    "imagereward": "rewards.extra:ImageRewardReward",
    "hpsv2": "rewards.extra:HPSv2Reward",
    "shapes_accuracy": "rewards.shapes_accuracy:ShapesAccuracyReward",  # the Shapes evaluator, for evaluation
}

_PLAIN = (str, int, float, bool, type(None))


def list_rewards() -> list[str]:
    """The registry names that `build_reward` accepts (besides "package.module:function")."""
    return sorted(REGISTRY)


def import_object(path: str) -> Any:
    """Import "package.module:attribute", with an error that says what was wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import module {module_name!r} (from {path!r}): {err}") from err
    if not hasattr(module, attr):
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
    return getattr(module, attr)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"reward kwarg {where} has a non-string key {key!r}")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(f"reward kwarg {where} is a {type(value).__name__}; reward kwargs must be plain data "
                    "(str/int/float/bool/None/list/dict) so a worker process can rebuild the reward from config")


def build_reward(name: str, **kwargs: Any) -> "CheckedReward":
    """Build a reward by registry name or "package.module:function" (a factory returning a reward callable).

    The result checks inputs and outputs of every call (see `CheckedReward`).
    """
    for key, value in kwargs.items():
        _check_plain(value, key)
    if ":" in name:
        factory = import_object(name)
    elif name in REGISTRY:
        factory = import_object(REGISTRY[name])
    else:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(list_rewards())}, "
                         "or 'package.module:function' for your own")
    return CheckedReward(factory(**kwargs), name, kwargs)


class CheckedReward:
    """Wraps a reward callable: checks batch sizes, returns float32 scores of shape (B,) and per-sample info lists,
    and gives every NaN score a reason in info["unscorable"] naming its prompt."""

    def __init__(self, fn: RewardFn, name: str, kwargs: dict[str, Any]):
        self.fn, self.name, self.kwargs = fn, name, kwargs

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict] | None = None):
        batch = len(images)
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image, not a single string")
        metadata = [{} for _ in range(batch)] if metadata is None else list(metadata)
        if len(prompts) != batch or len(metadata) != batch:
            raise ValueError(f"reward {self.name!r} got {batch} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata dicts; give one prompt and one metadata dict per image")
        scores, info = self.fn(images, list(prompts), metadata)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.shape != (batch,):
            raise ValueError(f"reward {self.name!r} returned {scores.shape[0]} scores for {batch} images")
        info = {key: list(values) for key, values in dict(info).items()}
        for key, values in info.items():
            if len(values) != batch:
                raise ValueError(f"reward {self.name!r} returned info[{key!r}] with {len(values)} values "
                                 f"for {batch} images")
        return scores, _explain_nan(scores, info, prompts, self.name)

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r}, {self.kwargs!r})"


def _explain_nan(scores: np.ndarray, info: dict[str, list], prompts: list[str], name: str) -> dict[str, list]:
    """Every non-finite score gets a reason in info["unscorable"]; scored samples get None there."""
    reasons = list(info.get("unscorable", [None] * len(scores)))
    for i, score in enumerate(scores):
        if not math.isfinite(float(score)) and not reasons[i]:
            reasons[i] = f"reward {name!r} returned {score} for prompt {prompts[i]!r}"
            warnings.warn(reasons[i], stacklevel=3)
    if "unscorable" in info or any(reasons):
        info["unscorable"] = reasons
    return info
