"""A diagnostic reward: the Shapes world's rule-based evaluator itself, as if the reward model were perfect.

Never a training reward for results: the evaluator is the independent judge, and a run trained on it cannot show
reward hacking. It answers one question: how much can DDPO raise rare-pair accuracy in a given budget when the
reward is exactly what the evaluator counts? If it cannot, a better captioner cannot either.

    PYTHONPATH=benchmarks ddpo train shapes_alignment reward.name=shapes_oracle_reward:oracle "reward.kwargs={}"
    ddpo shapes eval --rare-only --lora runs/NAME

Score: the fraction of colour, shape and background the evaluator sees as the prompt says (0, 1/3, 2/3 or 1),
partial credit like BERTScore's; NaN for a prompt outside the world.

`noise` is the opposite diagnostic: N(0, 1) seeded by the image's pixels, a reward that says nothing about the
prompt. What a run on it does to the evaluator's accuracy is what the update's noise alone does
(`reward.name=shapes_oracle_reward:noise`; docs/shapes.md, "The update is mostly noise").
"""

from __future__ import annotations

import hashlib

import numpy as np

from ddpo.shapes.evaluator import analyse
from ddpo.shapes.world import IMAGE_SIZE, parse_caption
from rewards.images import to_pil


def oracle():
    def reward(images, prompts, metadata):
        scores = []
        for image, prompt in zip(to_pil(images), prompts):
            wanted = parse_caption(prompt)
            if wanted is None:
                scores.append(float("nan"))
                continue
            seen = analyse(np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))))
            scores.append(float(np.mean([s == w for s, w in zip(seen[:3], wanted)])))
        return np.asarray(scores, dtype=np.float32), {}
    return reward


def noise():
    def reward(images, prompts, metadata):
        draws = []
        for image in to_pil(images):
            digest = hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).digest()
            draws.append(np.random.default_rng(int.from_bytes(digest[:8], "little")).normal())
        return np.asarray(draws, dtype=np.float32), {}
    return reward
