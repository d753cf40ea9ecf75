"""benchmarks/shapes_algorithms.py: every variant is a valid config at equal reward queries, and the table's
"to +15 points" and "equal wall-clock" readings of a run's judge curve."""

import importlib.util
from pathlib import Path

import pytest

from ddpo.config import load_config
from ddpo.validation import optimizer_steps_per_epoch

_spec = importlib.util.spec_from_file_location(
    "shapes_algorithms", Path(__file__).parent.parent / "benchmarks" / "shapes_algorithms.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("model,variant", [(m, v) for m in bench.VARIANTS for v in bench.VARIANTS[m]])
def test_every_variant_draws_64_samples_in_two_steps_or_one_on_policy(model, variant):
    config = load_config(bench.PRESET[model], bench.VARIANTS[model][variant])  # validated, as `ddpo train` would
    assert config.sample.batch_size * config.sample.num_batches_per_epoch == 64
    assert optimizer_steps_per_epoch(config) == (1 if config.train.algorithm == "ddpo_sf" else 2)
    if model == "shapes-flow" and variant != "grpo_fast":
        assert config.sample.sde_window == 0  # every step stochastic and trained; only grpo_fast keeps the window
    assert (config.train.algorithm == "grpo") == variant.startswith("grpo")


def _run(judge: list[tuple[int, float, float]]) -> dict:
    return {"judge": judge, "samples_per_epoch": 64, "epoch_s": [2.0] * 40}


def test_to_gain_is_the_first_evaluation_15_points_above_the_start():
    run = _run([(0, 0.50, 0.9), (10, 0.60, 0.9), (20, 0.66, 0.9), (30, 0.55, 0.9), (40, 0.70, 0.9)])
    assert bench.to_gain(run) == (20 * 64, 40.0)  # 0.65 is +15; epoch 20 after 20 epochs of 2 s
    assert bench.to_gain(_run([(0, 0.5, 0.9), (10, 0.64, 0.9)])) == (None, None)


def test_judge_at_takes_the_last_evaluation_within_the_budget():
    run = _run([(0, 0.50, 0.90), (10, 0.60, 0.91), (20, 0.66, 0.92)])
    assert bench.judge_at(run, 39.9) == (0.60, 0.91)  # epoch 20 ends at 40 s
    assert bench.judge_at(run, 40.0) == (0.66, 0.92)
    assert bench.judge_at(run, 0.0) == (0.50, 0.90)  # the start, before any training


def _tried(lr: float, rare: float, common: float, rare_eta0: float = 0.5) -> dict:
    final = {"training": {"rare": rare, "common": common}, "deterministic": {"rare": rare_eta0, "common": common}}
    return {"model": "shapes", "variant": "nft", "seed": 0, "lr": lr, "final": final}


def test_tuned_lr_is_the_best_rare_that_keeps_common_within_3_points():
    base = {"shapes": {"training": {"rare": 0.35, "common": 0.934}}}
    runs = [_tried(1e-4, 0.417, 0.931), _tried(3e-4, 0.448, 0.903), _tried(1e-3, 0.40, 0.95)]
    assert bench.tuned_lr(runs, base, "shapes", "nft") == 1e-4  # 3e-4 gains more but loses 3.1 common points
    runs.append(_tried(3e-5, 0.417, 0.94, rare_eta0=0.6))
    assert bench.tuned_lr(runs, base, "shapes", "nft") == 3e-5  # a tie on rare, broken at the deterministic sampler
    assert bench.tuned_lr([_tried(1e-3, 0.1, 0.5), _tried(3e-3, 0.2, 0.4)], base, "shapes", "nft") == 1e-3
    with pytest.raises(SystemExit, match="no seed-0 run"):
        bench.tuned_lr(runs, base, "shapes", "rwr")


def test_the_table_keeps_the_variants_run_on_several_seeds():
    grid = [_tried(1e-4, 0.4, 0.93), _tried(3e-4, 0.45, 0.90)]  # seed 0 of the tuning grid
    seeds = [{**_tried(1e-4, 0.4, 0.93), "seed": s} for s in (1, 2)]
    assert bench.measured(grid + seeds) == [grid[0], *seeds]
    assert bench.measured(grid) == grid  # nothing measured on several seeds yet: every run
