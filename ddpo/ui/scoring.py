"""Generation and scoring for the UI: cached pipelines and rewards, score tables, rank agreement, captions.

No algorithm lives here: images come from `ddpo.generate` and scores from `rewards.build_reward`, the same
functions `ddpo generate` and `ddpo score` call. This module does not import gradio.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import numpy as np

from ddpo.ui.settings import UIError

DISPLAY_SIDE = 256  # tiny models draw 16-64 px images; gallery copies are upscaled (nearest) to at least this


class Scored(NamedTuple):
    """Scores of one batch of B images under several rewards."""
    scores: dict[str, np.ndarray]  # reward column -> (B,) float32
    info: dict[str, dict[str, list]]  # reward column -> that reward's per-sample info lists
    errors: dict[str, str]  # reward column -> why it could not score (the other columns still did)


class LRUCache:
    """At most `size` objects built by `build(key)`, the least recently used dropped first. Thread-safe."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = build()
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value


PIPELINES = LRUCache(size=2)  # a base and a finetuned pipeline, for the side-by-side tab
REWARDS = LRUCache(size=8)  # reward models load on first call; keep them loaded between requests


def get_pipeline(model: str, lora: str | None):
    from ddpo.generate import load_for_inference

    from ddpo.checkpoint import CheckpointError

    try:
        return PIPELINES.get((model, lora), lambda: load_for_inference(model, lora))
    except CheckpointError as err:  # e.g. a LoRA trained on another base model
        raise UIError(f"this checkpoint does not fit the model {model!r}: {err}") from None


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, eta: float,
             progress: Callable[[int, int], None] | None = None):
    """Images (N, 3, H, W) in [0, 1] for N prompts, image i seeded by seed + i, exactly as `ddpo generate`."""
    import torch

    from ddpo.generate import generate_images

    images = []
    for i, prompt in enumerate(prompts):  # one at a time so the progress bar moves; seeds are per image anyway
        if progress:
            progress(i, len(prompts))
        images.append(generate_images(pipe, [prompt], seed=seed + i, num_steps=steps, guidance_scale=guidance, eta=eta))
    return torch.cat(images)


def to_display(images) -> list:
    """PIL copies for the gallery, upscaled with nearest-neighbour so 16 px images stay crisp."""
    from PIL import Image

    from rewards.images import to_pil

    shown = []
    for image in to_pil(images):
        factor = max(1, math.ceil(DISPLAY_SIDE / max(image.size)))
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
        shown.append(image)
    return shown


# ---------------------------------------------------------------------------------------------- rewards


def _cached_reward(name: str, kwargs: dict[str, Any]):
    from rewards import build_reward

    return REWARDS.get((name, json.dumps(kwargs, sort_keys=True)), lambda: build_reward(name, **kwargs))


def score_images(images, prompts: list[str], metadata: list[dict], jobs: dict[str, tuple[str, dict]]) -> Scored:
    """Score with every job, column -> (reward name, kwargs) from `reward_options.reward_jobs` (which checked them
    against what the browser may set), each on its own so one failing reward does not hide the others."""
    scores, info, errors = {}, {}, {}
    for column, (name, reward_kwargs) in jobs.items():
        try:
            scores[column], info[column] = _cached_reward(name, reward_kwargs)(images, prompts, metadata)
        except Exception as err:  # a missing model or package: report it in its column, keep the others
            from ddpo.ui.availability import one_line

            errors[column] = one_line(err)
    if not scores:
        raise UIError("no reward could score these images:\n" + "\n".join(f"- {k}: {v}" for k, v in errors.items()))
    return Scored(scores, info, errors)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over the samples where both are finite (NaN with < 3 or constant ranks)."""
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return math.nan
    ra, rb = _ranks(a[keep]), _ranks(b[keep])
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def agreement_rows(scores: dict[str, np.ndarray]) -> tuple[list[str], list[list]]:
    """(headers, rows) of the reward x reward Spearman matrix."""
    names = list(scores)
    rows = [[a] + [_round(spearman(scores[a], scores[b])) for b in names] for a in names]
    return ["reward", *names], rows


def score_rows(scored: Scored, prompts: list[str], seeds: list[int | str]) -> tuple[list[str], list[list]]:
    """(headers, rows): one row per image, one column per reward."""
    names = list(scored.scores)
    rows = [[i, seeds[i], prompts[i]] + [_round(scored.scores[n][i]) for n in names] for i in range(len(prompts))]
    return ["image", "seed", "prompt", *names], rows


def caption_rows(scored: Scored) -> list[list]:
    """[image, reward, caption, reference] for every reward that wrote captions (the VLM's answers)."""
    rows = []
    for column, info in scored.info.items():
        for key, captions in info.items():
            if key == "captions" or key.endswith("/captions"):
                label = column if key == "captions" else f"{column}/{key.rsplit('/', 1)[0]}"
                references = info.get(key.replace("captions", "references"), [""] * len(captions))
                rows += [[i, label, c, r] for i, (c, r) in enumerate(zip(captions, references))]
    return rows


def gallery_captions(scored: Scored, seeds: list[int | str]) -> list[str]:
    names = list(scored.scores)
    return [f"#{i} seed {seed} | " + " | ".join(f"{n} {_fmt(scored.scores[n][i])}" for n in names)
            for i, seed in enumerate(seeds)]


def notes(scored: Scored) -> str:
    """Markdown: rewards that failed and samples a reward could not score."""
    lines = [f"- **{name}** could not score: {why}" for name, why in scored.errors.items()]
    for name, info in scored.info.items():
        lines += [f"- **{name}**, image {i}: {reason}" for i, reason in enumerate(info.get("unscorable", [])) if reason]
    return "\n".join(lines)


def _round(value: float) -> float | None:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


def _fmt(value: float) -> str:
    return f"{float(value):.3f}" if math.isfinite(float(value)) else "n/a"
