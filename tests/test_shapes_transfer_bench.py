"""benchmarks/shapes_transfer.py: the evaluator's pairs grouped as trained / unseen / common, averaged over seeds."""

import importlib.util
from pathlib import Path

import pytest

from ddpo.shapes.world import COMMON_PAIRS, RARE_PAIRS

_spec = importlib.util.spec_from_file_location(
    "shapes_transfer", Path(__file__).parent.parent / "benchmarks" / "shapes_transfer.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_split_is_the_transfer_grammars():
    from prompts import load_grammar

    assert sorted(bench.RARE) == sorted(f"{c} {s}" for c, s in RARE_PAIRS)
    grammar = load_grammar("shapes_transfer")
    heldout = {f"{p.metadata['color']} {p.metadata['shape']}" for p in grammar.enumerate("heldout")}
    drawn = {f"{p.metadata['color']} {p.metadata['shape']}" for p in grammar.enumerate(None)}
    assert heldout == set(bench.TRAINED) and not drawn & set(bench.UNSEEN)


def test_groups_weigh_each_pair_equally_and_seeds_are_averaged():
    per_pair = {f"{c} {s}": 0.5 for c, s in COMMON_PAIRS} | {p: 1.0 for p in bench.TRAINED}
    per_pair |= {"blue square": 0.0, "purple square": 0.25, "white square": 0.5}
    per_pair["orange square"] = 0.5 + 0.18  # one common pair of 18 up by 0.18: the mean up by 0.01
    one = bench.groups({"per_pair": per_pair})
    assert one == pytest.approx({"trained": 1.0, "unseen": 0.25, "common": 0.51})
    two = bench.over_seeds({0: one, 1: {"trained": 0.5, "unseen": 0.75, "common": 0.49}})
    assert (two["trained"], two["unseen"], two["common"]) == pytest.approx((0.75, 0.5, 0.5))
    assert two["eval_seeds"] == [0, 1] and two["per_eval_seed"][0] == one
