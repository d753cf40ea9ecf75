"""A CI-sized DDPO run on the shipped Shapes model raises the alignment reward (captioner + BERTScore)."""

from __future__ import annotations

import numpy as np
import pytest

from ddpo.shapes.world import caption

# One rare pair on two backgrounds: the base model draws these purple squares crimson (mean expected reward 0.84;
# after 15 epochs at lr 1e-3: 0.90. With greedy captions, 0.84 -> 0.91; at lr 2e-3 that fell to 0.79).
GRAMMAR = """\
name: purple_squares
description: one rare colour-shape pair of the Shapes world
rules:
  prompt: "a {color} {shape} on a {background} background"
  color: [purple]
  shape: [square]
  background: [blue, yellow]
"""


def _mean_reward(pipe, reward, n: int = 16) -> float:
    from ddpo.shapes.evaluate import EVAL_ETA, EVAL_GUIDANCE, EVAL_STEPS, generate

    triples = [("purple", "square", bg) for bg in ["blue", "yellow"] * (n // 2)]
    images = generate(pipe, triples, seed=123, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE, eta=EVAL_ETA)
    from PIL import Image

    scores, _ = reward([Image.fromarray(im) for im in images], [caption(*t) for t in triples], [{}] * n)
    return float(np.mean(scores))


@pytest.mark.slow
def test_short_ddpo_run_raises_the_alignment_reward(tmp_path):
    from ddpo.config import load_config
    from ddpo.shapes.evaluate import load_pipeline
    from ddpo.trainer import train
    from rewards import build_reward

    grammar = tmp_path / "purple_squares.yaml"
    grammar.write_text(GRAMMAR)
    config = load_config("shapes_alignment", [
        f"prompts.grammar={grammar}", "prompts.split=all", "prompts.eval_every=0", "reward.executor=inline",
        "sample.batch_size=8", "sample.num_batches_per_epoch=2", "train.batch_size=8",
        "train.num_epochs=15", "train.per_prompt_stat_tracking=false", "train.learning_rate=1e-3",
        f"logging.output_dir={tmp_path}", "logging.run_name=ci", "logging.progress=false",
        "logging.sample_grid=false", "logging.save_every=10",
    ])
    reward = build_reward(config.reward.name, **config.reward.kwargs)  # the preset's: expected captioner score
    before = _mean_reward(load_pipeline("shapes"), reward)
    run_dir = train(config)
    after = _mean_reward(load_pipeline("shapes", run_dir), reward)
    print(f"mean reward before {before:.4f}, after {after:.4f}")
    assert after > before + 0.01, (before, after)
