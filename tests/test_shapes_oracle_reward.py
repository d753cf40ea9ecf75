"""The diagnostic oracle reward (benchmarks/shapes_oracle_reward.py) scores what the evaluator counts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from rewards import build_reward


def test_oracle_scores_attributes_the_evaluator_sees():
    from PIL import Image

    from ddpo.shapes.world import Scene, render

    image = Image.fromarray(render(Scene("purple", "square", "yellow", 10, 12, 30)))
    reward = build_reward("shapes_oracle_reward:oracle")
    prompts = ["a purple square on a yellow background", "a purple circle on a yellow background",
               "a red circle on a blue background", "a pink dolphin"]
    scores, info = reward([image] * 4, prompts)
    np.testing.assert_allclose(scores[:3], [1.0, 2 / 3, 0.0], atol=1e-6)
    assert np.isnan(scores[3]) and "pink dolphin" in info["unscorable"][3]


def test_noise_reward_depends_on_the_pixels_only():
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(400)]
    reward = build_reward("shapes_oracle_reward:noise")
    scores, _ = reward(images, ["a red square on a blue background"] * 400)
    again, _ = reward(images[:3], ["anything at all"] * 3)
    np.testing.assert_array_equal(again, scores[:3])  # the same image, any prompt: the same draw
    assert abs(scores.mean()) < 0.2 and 0.8 < scores.std() < 1.2  # N(0, 1): mean sd 0.05, sd sd 0.035
