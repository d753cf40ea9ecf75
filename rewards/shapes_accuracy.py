"""`shapes_accuracy`: the Shapes world's independent evaluator as a reward (1 if an image shows its prompt, else 0).

Made for *evaluation* (`reward.eval_name: shapes_accuracy`), so that one training run logs the accuracy that
`ddpo shapes eval` would measure beside the training reward, and over-optimisation (reward up, accuracy down) shows
in its metrics. The evaluator is a rule-based pixel analyser (ddpo/shapes/evaluator.py) that shares nothing with
the captioner the Shapes presets train on. It reads 64x64 images; the prompt's colour, shape and background come
from the Shapes grammar's metadata (`color`, `shape`, `background`), or are parsed from the prompt text.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _target(prompt: str, metadata: dict) -> tuple[str, str, str] | None:
    from ddpo.shapes.world import parse_caption

    if all(key in metadata for key in ("color", "shape", "background")):
        return metadata["color"], metadata["shape"], metadata["background"]
    return parse_caption(prompt)


class ShapesAccuracyReward:
    """scores (B,): 1.0 where the evaluator reads the prompt's colour, shape and background, else 0.0; NaN (with
    a reason) for a prompt that does not describe a Shapes scene. info: what the evaluator saw, per image."""

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        from ddpo.shapes.evaluator import analyse
        from rewards.images import to_pil

        scores, seen, reasons = np.zeros(len(prompts), dtype=np.float32), [], []
        for i, (image, prompt, meta) in enumerate(zip(to_pil(images), prompts, metadata)):
            target = _target(prompt, meta or {})
            analysis = analyse(np.asarray(image.convert("RGB")))  # refuses any size but the world's 64x64
            seen.append(f"{analysis.color} {analysis.shape} on {analysis.background}")
            if target is None:
                scores[i] = np.nan
                reasons.append(f"prompt {prompt!r} is not 'a COLOR SHAPE on a COLOR background' (the Shapes world)")
                continue
            reasons.append(None)
            scores[i] = float(tuple(analysis[:3]) == tuple(target))
        info: dict[str, list] = {"evaluator_saw": seen}
        if any(reasons):
            info["unscorable"] = reasons
        return scores, info
