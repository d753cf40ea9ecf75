"""Trainer checks on prompts that run before the model loads (or right after, for the tokenizer)."""

import warnings

import pytest

from ddpo.config import load_config
from ddpo.trainer import train


def test_heldout_eval_on_a_grammar_without_a_heldout_split_fails_early(tmp_path):
    grammar = tmp_path / "g.yaml"
    grammar.write_text("name: plain\nrules:\n  prompt: \"a {animal}\"\n  animal: [cat, dog]\n")
    config = load_config("tiny_cpu", [f"prompts.grammar={grammar}", "prompts.eval_every=1",
                                      f"logging.output_dir={tmp_path}", "model.pretrained=does-not-exist/never-loaded"])
    with pytest.raises(ValueError, match="prompts.eval_split=heldout but grammar 'plain' defines no held-out split"):
        train(config)


def test_prompts_longer_than_the_text_encoder_are_reported(tmp_path):
    grammar = tmp_path / "long.yaml"
    grammar.write_text("name: long\nrules:\n  prompt: \"{words}\"\n  words: [\"" + " ".join(["dog"] * 90) + "\", cat]\n")
    config = load_config("tiny_cpu", [f"prompts.grammar={grammar}", "train.num_epochs=1",
                                      f"logging.output_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config)
    assert any("77" in str(w.message) or "token" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_eval_reward_is_logged_every_k_epochs(tmp_path):
    from ddpo.metrics import read_metrics

    config = load_config("tiny_cpu", ["prompts.grammar=simple_animals", "prompts.eval_every=2", "train.num_epochs=2",
                                      "prompts.eval_num_prompts=3", f"logging.output_dir={tmp_path}",
                                      "logging.run_name=e"])
    run_dir = train(config)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert "eval_reward_mean" not in rows[0] and rows[1]["eval_reward_mean"] < 0  # JPEG kB, negated
    assert rows[0]["eval_reward_before"] < 0 and "eval_reward_before" not in rows[1]
    # Before/after grids of the same prompts and noise.
    assert (run_dir / "samples" / "eval_before.png").is_file()
    assert (run_dir / "samples" / "eval_epoch_0002.png").is_file()
