"""The Shapes world: 64x64 images of one flat-coloured shape on a flat background of another colour.

The world is fixed (outside checks render and judge it): the palette, the three shapes, the phrasing
"a {color} {shape} on a {background} background", and the six rare colour-shape pairs that the
pretraining distribution deliberately starves (the analogue of "a dolphin riding a bike").

Rendering is vectorised numpy, so the pretraining data (tens of thousands of images) costs seconds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 64
MIN_BOX, MAX_BOX = 20, 44

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (249, 115, 22),
    "yellow": (250, 204, 21),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "purple": (147, 51, 234),
    "white": (248, 250, 252),
    "black": (15, 23, 42),
}
COLORS: list[str] = list(PALETTE)
SHAPES: list[str] = ["circle", "square", "triangle"]

# The held-out split of the `shapes` grammar: colour-shape pairs that pretraining almost never shows.
# In pretraining a square is nearly always orange or black, as a bike is nearly always ridden by a person.
# Why squares: a model of this size composes colour and shape it has seen apart, and a rare triangle or
# circle is drawn right as soon as common pairs are (measured: rare triangles 88-100% right at 1,500 steps
# with a mixed rare set; rare circles and triangles 69-88% right at 1,000 steps); squares, the shape closest
# to another (a circle) at 8x8 latents, are not. Pretraining shows orange and black squares often
# (PretrainConfig.common_square_weight), so the model draws crisp squares, in the wrong colour for a rare pair.
RARE_PAIRS: list[tuple[str, str]] = [
    ("red", "square"), ("yellow", "square"), ("green", "square"),
    ("blue", "square"), ("purple", "square"), ("white", "square"),
]
COMMON_PAIRS: list[tuple[str, str]] = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in RARE_PAIRS]

# The words of the world, in the order the tokenizer numbers them.
VOCABULARY: list[str] = ["a", "on", "background"] + COLORS + SHAPES


class Scene(NamedTuple):
    """One image's content: what the prompt names, and where the shape is (pixel box, top-left + side)."""

    color: str
    shape: str
    background: str
    x: int
    y: int
    size: int


def caption(color: str, shape: str, background: str) -> str:
    """The world's phrasing, shared by prompts, captions and the grammar."""
    return f"a {color} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(color, shape, background) if `text` is a sentence of the world, else None (out of vocabulary)."""
    words = text.strip().lower().rstrip(".").split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    color, shape, background = words[1], words[2], words[5]
    if color not in PALETTE or shape not in SHAPES or background not in PALETTE or color == background:
        return None
    return color, shape, background


def is_rare(color: str, shape: str) -> bool:
    return (color, shape) in RARE_PAIRS


def sample_scenes(n: int, rng: np.random.Generator, rare_fraction: float,
                  common_square_weight: int = 1) -> list[Scene]:
    """Draw `n` scenes from the skewed pretraining distribution.

    A scene is rare with probability `rare_fraction` (then its pair is uniform over RARE_PAIRS), otherwise
    its pair is drawn from COMMON_PAIRS, each common square (orange, black) `common_square_weight` times as
    often as any other common pair; the background is uniform over the other seven colours, and the box
    size and position are uniform with the shape fully inside the image.
    """
    if common_square_weight < 1:
        raise ValueError(f"common_square_weight must be a whole number >= 1, got {common_square_weight}")
    # Each common square listed `common_square_weight` times, then one uniform index: same draws as unweighted at 1.
    common = [p for p in COMMON_PAIRS for _ in range(common_square_weight if p[1] == "square" else 1)]
    scenes = []
    for _ in range(n):
        pairs = RARE_PAIRS if rng.random() < rare_fraction else common
        color, shape = pairs[rng.integers(len(pairs))]
        background = [c for c in COLORS if c != color][rng.integers(len(COLORS) - 1)]
        size = int(rng.integers(MIN_BOX, MAX_BOX + 1))
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
        scenes.append(Scene(color, shape, background, x, y, size))
    return scenes


def shape_mask(shape: str, x: int, y: int, size: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask (H, W) of a shape whose bounding box is the square [x, x+size) x [y, y+size)."""
    # Pixel centres, in units where the box spans [0, 1] on both axes.
    coords = (np.arange(image_size) + 0.5)
    u = ((coords - x) / size)[None, :]
    v = ((coords - y) / size)[:, None]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        # Apex at the top centre (v=0), base along the bottom (v=1): half-width grows linearly with v.
        return inside & (np.abs(u - 0.5) <= 0.5 * v)
    raise ValueError(f"unknown shape {shape!r}; the world's shapes are {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """uint8 array (64, 64, 3) of the scene."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    image[shape_mask(scene.shape, scene.x, scene.y, scene.size)] = PALETTE[scene.color]
    return image


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """uint8 array (N, 64, 64, 3)."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def random_scene(color: str, shape: str, background: str, rng: np.random.Generator) -> Scene:
    """A scene with the given content at a random size and position."""
    size = int(rng.integers(MIN_BOX, MAX_BOX + 1))
    x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
    return Scene(color, shape, background, x, y, size)
