"""Presets that mean what they say: DDPO-IS takes several optimizer steps per epoch, so the PPO clip acts."""

from pathlib import Path

import pytest

from ddpo.config import ConfigError, load_config
from ddpo.validation import optimizer_steps_per_epoch
from ddpo.metrics import read_metrics
from ddpo.trainer import train

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_ddpo_is_preset_takes_two_or_more_steps_and_says_how_many(name):
    config = load_config(name)
    if config.train.algorithm != "ddpo_is":
        return
    steps = optimizer_steps_per_epoch(config)
    assert steps >= 2, f"{name}: {steps} optimizer step per epoch: every importance ratio is 1, the clip never acts"
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert name.startswith("tiny_") or f"{steps} optimizer steps per epoch" in text  # smoke presets: no claims


def test_ddpo_sf_refuses_more_than_one_step_per_epoch():
    with pytest.raises(ConfigError, match=r"on-policy.* 2 optimizer steps per epoch.*"
                                          r"Set train.gradient_accumulation_steps=2"):
        load_config("tiny_cpu", ["train.algorithm=ddpo_sf"])
    assert optimizer_steps_per_epoch(load_config("tiny_cpu", ["train.algorithm=ddpo_sf",
                                                               "train.gradient_accumulation_steps=2"])) == 1


def test_the_clip_acts_from_the_second_step_of_the_tiny_preset(tmp_path):
    run_dir = train(load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "logging.run_name=r",
                                             "train.num_epochs=1"]))
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    # The first step's ratios are exactly 1 (tests/test_losses.py); the mean over 2 steps is > 0 only if the
    # second step's ratios moved and some left the clip range.
    assert row["optimizer_steps"] == 2
    assert row["clipfrac"] > 0 and row["approx_kl"] > 0
