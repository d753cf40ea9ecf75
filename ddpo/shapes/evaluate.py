"""Accuracy of a text-to-image pipeline in the Shapes world, judged by the rule-based evaluator.

Fixed prompts and seeds: for colour-shape pair k, image j has background number j (cycling over the seven
other colours) and all images of a pair share one batch seeded by `seed * 1000 + k`, so a base model and a
finetuned one are compared on exactly the same prompts and initial noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ddpo.shapes.evaluator import analyse
from ddpo.shapes.world import COLORS, COMMON_PAIRS, RARE_PAIRS, SHAPES, caption

# The sampler of configs/shapes_alignment.yaml (the default `ddpo train`), so that accuracy is measured on the
# policy DDPO trains; tests/test_shapes_pretrained.py checks that the two agree. Guidance 2 because stronger
# guidance distorts this model's shapes (common-pair accuracy 94% at 2, 79% at 3, 19% at 5; docs/shapes.md).
EVAL_STEPS = 10
EVAL_GUIDANCE = 2.0
EVAL_ETA = 1.0


def eval_prompts(color: str, shape: str, n: int) -> list[tuple[str, str, str]]:
    """n (color, shape, background) triples with the backgrounds cycling over the other colours."""
    backgrounds = [c for c in COLORS if c != color]
    return [(color, shape, backgrounds[j % len(backgrounds)]) for j in range(n)]


def all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def load_pipeline(model: str = "shapes", lora: str | Path | None = None):
    """The model (its family, ddpo/families), with a `ddpo train` checkpoint applied if given (through the
    trainer's own loader)."""
    from ddpo.generate import load_for_inference

    return load_for_inference(model, str(lora) if lora else None, device="cpu")


def generate(family, triples: list[tuple[str, str, str]], seed: int, steps: int, guidance: float, eta: float):
    """Images (N, 64, 64, 3) uint8 for the given (color, shape, background) triples, one batch, one seed."""
    import torch

    from ddpo.sampler import sample_trajectories

    device = family.device
    with torch.no_grad():
        embeds = family.encode([caption(*t) for t in triples], device)
        negative = family.encode([""], device).expand(len(triples))
        traj = sample_trajectories(family, family.denoiser, embeds, negative, num_steps=steps, guidance_scale=guidance,
                                   eta=eta, generator=torch.Generator().manual_seed(seed))
    return (traj.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def evaluate_pipeline(family, per_pair: int = 16, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
                      eta: float = EVAL_ETA, seed: int = 0, pairs: list[tuple[str, str]] | None = None,
                      grid_path: Path | None = None) -> dict[str, Any]:
    """Accuracy (all three attributes right) on common and rare pairs, plus per-attribute and per-pair rates."""
    pairs = pairs or all_pairs()
    per_pair_acc: dict[str, float] = {}
    attr_hits = {"color": [], "shape": [], "background": []}
    rare_images = []
    for k, (color, shape) in enumerate(all_pairs()):
        if (color, shape) not in pairs:
            continue
        triples = eval_prompts(color, shape, per_pair)
        images = generate(family, triples, seed * 1000 + k, steps, guidance, eta)
        seen = [analyse(im) for im in images]
        per_pair_acc[f"{color} {shape}"] = float(np.mean([s[:3] == t for s, t in zip(seen, triples)]))
        for s, t in zip(seen, triples):
            attr_hits["color"].append(s.color == t[0])
            attr_hits["shape"].append(s.shape == t[1])
            attr_hits["background"].append(s.background == t[2])
        if (color, shape) in RARE_PAIRS:
            rare_images.append(images)
    rare = [per_pair_acc[f"{c} {s}"] for c, s in RARE_PAIRS if f"{c} {s}" in per_pair_acc]
    common = [per_pair_acc[f"{c} {s}"] for c, s in COMMON_PAIRS if f"{c} {s}" in per_pair_acc]
    if grid_path is not None and rare_images:
        save_grid(np.stack(rare_images), grid_path)
    return {
        "rare_accuracy": float(np.mean(rare)) if rare else float("nan"),
        "common_accuracy": float(np.mean(common)) if common else float("nan"),
        "attribute_accuracy": {k: float(np.mean(v)) for k, v in attr_hits.items()},
        "per_pair": per_pair_acc,
        "settings": {"per_pair": per_pair, "steps": steps, "guidance": guidance, "eta": eta, "seed": seed},
    }


def save_grid(images: np.ndarray, path: Path, max_cols: int = 8) -> Path:
    """uint8 (rows, cols, H, W, 3) -> one PNG with 2 px gaps."""
    from PIL import Image

    images = images[:, :max_cols]
    rows, cols, h, w, _ = images.shape
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 128, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = images[r, c]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def default_eval_sampler(family) -> tuple[int, float, float]:
    """(steps, guidance, eta) `ddpo shapes eval` samples `family` with by default: the sampler its Shapes preset
    trains (shapes_flow_alignment for a flow model, shapes_alignment for a UNet)."""
    from ddpo.families.flow import FlowFamily
    from ddpo.shapes.flow import FLOW_EVAL_ETA, FLOW_EVAL_GUIDANCE, FLOW_EVAL_STEPS

    if isinstance(family, FlowFamily):
        return FLOW_EVAL_STEPS, FLOW_EVAL_GUIDANCE, FLOW_EVAL_ETA
    return EVAL_STEPS, EVAL_GUIDANCE, EVAL_ETA
