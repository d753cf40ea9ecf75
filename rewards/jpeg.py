"""JPEG (in)compressibility, as in the DDPO paper: the size in kB of the image saved as JPEG at quality 95."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from rewards.images import to_pil

JPEG_QUALITY = 95


def jpeg_kb(images: Any) -> np.ndarray:
    """Images -> (B,) float32 JPEG sizes in kB (1 kB = 1000 bytes) at quality 95."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return np.asarray(sizes, dtype=np.float32)


def jpeg_compressibility():
    """Reward = -size in kB: smaller files (smoother, simpler images) score higher."""
    def reward(images, prompts, metadata):
        kb = jpeg_kb(images)
        return -kb, {"jpeg_kb": kb.tolist()}
    return reward


def jpeg_incompressibility():
    """Reward = +size in kB: larger files (busier, more detailed images) score higher."""
    def reward(images, prompts, metadata):
        kb = jpeg_kb(images)
        return kb, {"jpeg_kb": kb.tolist()}
    return reward
