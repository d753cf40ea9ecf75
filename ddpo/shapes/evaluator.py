"""The independent evaluator: a rule-based pixel analyser of Shapes images (no learned weights).

It shares nothing with the captioner used as reward, so if DDPO learned to fool the captioner
(reward hacking), the accuracy measured here would not rise with the reward.

Rules, on a 64x64 RGB image:
  1. every pixel gets the nearest palette colour, or "unknown" if none is within MAX_COLOR_DISTANCE;
  2. background = the commonest colour on the image border (a shape may touch the border, never cover it);
  3. shape colour = the commonest non-background colour, if it covers at least MIN_SHAPE_PIXELS;
  4. shape = from that colour's pixels inside their (robust) bounding box: the box must be about square,
     and the fill ratio is ~1 for a square, ~pi/4 for a circle, ~1/2 for a triangle, whose apex must be up
     (its top quarter holds much less of the shape than its bottom quarter).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ddpo.shapes.world import COLORS, IMAGE_SIZE, PALETTE

MAX_COLOR_DISTANCE = 70.0  # RGB Euclidean; the closest two palette colours are ~110 apart
MIN_SHAPE_PIXELS = 120
SQUARE_MIN_FILL, CIRCLE_MIN_FILL = 0.865, 0.72  # the smallest shape, a 20 px triangle, has ~200 pixels
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (8, 3)


class Analysis(NamedTuple):
    """What the analyser sees; None where a rule could not decide (counts as wrong)."""

    color: str | None
    shape: str | None
    background: str | None
    fill: float  # fill ratio of the shape's bounding box (nan if no shape)


def color_labels(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> int (H, W): palette index of each pixel, -1 if no palette colour is close."""
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > MAX_COLOR_DISTANCE] = -1
    return labels


def _robust_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) inclusive, ignoring rows/columns with fewer than 2 mask pixels (stray pixels)."""
    rows = np.flatnonzero(mask.sum(1) >= 2)
    cols = np.flatnonzero(mask.sum(0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        return None
    return rows[0], rows[-1], cols[0], cols[-1]


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """Boolean (H, W) mask of one shape -> ("circle" | "square" | "triangle" | None, fill ratio)."""
    box = _robust_box(mask)
    if box is None:
        return None, float("nan")
    top, bottom, left, right = box
    height, width = bottom - top + 1, right - left + 1
    inside = mask[top:bottom + 1, left:right + 1]
    fill = float(inside.sum()) / (height * width)
    if not 0.75 <= width / height <= 1.33 or min(height, width) < 14:
        return None, fill
    # Thresholds sit between the fill ratios of VAE-decoded shapes (2nd-98th percentiles: triangle 0.53-0.70,
    # circle 0.75-0.86, square 0.87-0.99; exact renders: 0.5, 0.785, 1.0): decoders round corners a little.
    if fill >= SQUARE_MIN_FILL:
        return "square", fill
    if CIRCLE_MIN_FILL <= fill < SQUARE_MIN_FILL:
        return "circle", fill
    if 0.35 <= fill < CIRCLE_MIN_FILL:
        quarter = max(1, height // 4)
        top_mass, bottom_mass = inside[:quarter].sum(), inside[-quarter:].sum()
        return ("triangle" if top_mass < 0.5 * bottom_mass else None), fill
    return None, fill


def analyse(image: np.ndarray) -> Analysis:
    """uint8 (64, 64, 3) image -> Analysis."""
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the evaluator reads uint8 images of shape (64, 64, 3), got {image.shape}")
    labels = color_labels(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    if len(border) == 0:
        return Analysis(None, None, None, float("nan"))
    background = int(np.bincount(border, minlength=len(COLORS)).argmax())
    rest = labels[(labels >= 0) & (labels != background)]
    counts = np.bincount(rest, minlength=len(COLORS))
    if counts.max(initial=0) < MIN_SHAPE_PIXELS:
        return Analysis(None, None, COLORS[background], float("nan"))
    color = int(counts.argmax())
    shape, fill = classify_shape(labels == color)
    return Analysis(COLORS[color], shape, COLORS[background], fill)


def is_correct(image: np.ndarray, color: str, shape: str, background: str) -> bool:
    """True if the analyser sees exactly the prompt's colour, shape and background."""
    return analyse(image)[:3] == (color, shape, background)
