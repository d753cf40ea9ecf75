"""prompts.split=mix (held-out and training prompts in every batch), the evaluation judge (reward.eval_name) with
its per-split means, the shapes_accuracy reward and the transfer grammar."""

import numpy as np
import pytest
from PIL import Image

from ddpo.config import ConfigError, load_config
from ddpo.rollout import draw_prompts, epoch_group_prompts
from ddpo.validation import validate
from prompts import load_grammar


def _heldout_count(grammar, prompts):
    return sum(grammar.is_heldout(p) for p in prompts)


def test_mix_puts_its_share_of_heldout_prompts_in_every_batch():
    grammar = load_grammar("shapes")
    for share, expected in ((0.5, 8), (0.25, 4), (0.9, 14)):
        config = load_config("shapes_alignment", ["prompts.split=mix", f"prompts.mix_heldout={share}"])
        for batch in range(3):
            prompts = draw_prompts(grammar, config, epoch=1, global_batch=batch, num_processes=1)
            assert len(prompts) == 16 and _heldout_count(grammar, prompts) == expected
    again = draw_prompts(grammar, config, epoch=1, global_batch=2, num_processes=1)
    assert [p.text for p in again] == [p.text for p in prompts]  # seeded by (seed, epoch, batch)


def test_mix_with_groups_draws_distinct_prompts_from_both_splits_interleaved():
    grammar = load_grammar("shapes")
    config = load_config("shapes_alignment", ["prompts.split=mix", "sample.images_per_prompt=4",
                                              "sample.num_batches_per_epoch=4"])
    prompts = epoch_group_prompts(grammar, config, epoch=0, num_processes=1)  # 16 groups
    assert len({p.text for p in prompts}) == 16 and _heldout_count(grammar, prompts) == 8
    flags = [grammar.is_heldout(p) for p in prompts]
    assert flags != sorted(flags) and flags != sorted(flags, reverse=True)  # not all held-out first


def test_other_splits_draw_as_before():
    grammar = load_grammar("shapes")
    config = load_config("shapes_alignment", ["prompts.split=heldout"])
    prompts = draw_prompts(grammar, config, epoch=0, global_batch=0, num_processes=1)
    from ddpo.rollout import derive_seed

    assert prompts == grammar.sample(16, split="heldout", seed=derive_seed(0, 0, 0, "prompts"))


@pytest.mark.parametrize("override, fragment", [
    ("prompts.mix_heldout=0", "prompts.mix_heldout=0"),
    ("prompts.mix_heldout=1.5", r"in \(0, 1\)"),
])
def test_bad_mix_settings_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(load_config("shapes_alignment", ["prompts.split=mix", override]))


def test_mix_on_a_grammar_without_heldout_fails_before_loading(tmp_path):
    from ddpo.trainer import train

    grammar = tmp_path / "g.yaml"
    grammar.write_text("name: g\nrules:\n  prompt: [a cat, a dog]\n")
    config = load_config("tiny_cpu", [f"prompts.grammar={grammar}", "prompts.split=mix",
                                      f"logging.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="prompts.split=mix"):
        train(config)


def test_shapes_accuracy_scores_what_the_evaluator_reads():
    from ddpo.shapes.world import random_scene, render
    from rewards import build_reward

    rng = np.random.default_rng(0)
    images = [Image.fromarray(render(random_scene("red", "square", "blue", rng))),
              Image.fromarray(render(random_scene("green", "circle", "white", rng)))]
    reward = build_reward("shapes_accuracy")
    scores, info = reward(images, ["a red square on a blue background"] * 2, None)
    assert scores.tolist() == [1.0, 0.0] and info["evaluator_saw"][1] == "green circle on white"
    metadata = [{"color": "green", "shape": "circle", "background": "white"}]  # metadata wins over the text
    assert reward(images[1:], ["anything"], metadata)[0].tolist() == [1.0]
    scores, info = reward(images[:1], ["a photo of a cat"], None)
    assert np.isnan(scores[0]) and "Shapes world" in info["unscorable"][0]


def test_transfer_grammar_never_draws_its_unseen_pairs():
    grammar = load_grammar("shapes_transfer")
    pairs = {(p.metadata["color"], p.metadata["shape"]) for p in grammar.enumerate()}
    assert not pairs & {("blue", "square"), ("purple", "square"), ("white", "square")}
    held = {(p.metadata["color"], p.metadata["shape"]) for p in grammar.enumerate("heldout")}
    assert held == {("red", "square"), ("yellow", "square"), ("green", "square")} and grammar.count("heldout") == 21


def test_judge_and_per_split_means_are_logged(tmp_path):
    """JPEG incompressibility as the judge of a JPEG-compressibility run: the judge's score is exactly minus the
    reward on every prompt, so its means are minus the reward's, on both splits and overall."""
    from ddpo.metrics import read_metrics
    from ddpo.trainer import train

    config = load_config("tiny_cpu", ["prompts.grammar=simple_animals", "prompts.eval_every=1", "train.num_epochs=1",
                                      "prompts.eval_split=all", "prompts.eval_num_prompts=45",
                                      "reward.eval_name=jpeg_incompressibility", f"logging.output_dir={tmp_path}",
                                      "logging.run_name=j"])
    row = read_metrics(train(config) / "metrics.jsonl")[0]
    for name in ("mean", "heldout", "train"):
        assert row[f"eval_score_{name}"] == pytest.approx(-row[f"eval_reward_{name}"], rel=1e-6)
    assert row["eval_score_before"] == pytest.approx(-row["eval_reward_before"], rel=1e-6)
    # 9 held-out animals of 45: the overall mean is the prompt-weighted mean of the two splits
    assert row["eval_reward_mean"] == pytest.approx((9 * row["eval_reward_heldout"] + 36 * row["eval_reward_train"]) / 45)
    assert row["eval_reward_heldout"] != row["eval_reward_train"] and row["eval_s"] > 0


def test_evaluation_does_not_change_training(tmp_path):
    """An evaluation samples with its own generator and noise: a run that evaluates (with a judge) every epoch
    trains exactly the run that never evaluates."""
    from safetensors.torch import load_file

    from ddpo.metrics import read_metrics
    from ddpo.trainer import train

    common = ["prompts.grammar=simple_animals", "train.num_epochs=2", f"logging.output_dir={tmp_path}"]
    plain = train(load_config("tiny_cpu", common + ["logging.run_name=plain"]))
    judged = train(load_config("tiny_cpu", common + ["logging.run_name=judged", "prompts.eval_every=1",
                                                     "prompts.eval_num_prompts=3",
                                                     "reward.eval_name=jpeg_incompressibility"]))
    assert [r["reward_mean"] for r in read_metrics(plain / "metrics.jsonl")] == \
        [r["reward_mean"] for r in read_metrics(judged / "metrics.jsonl")]
    weights = [load_file(run / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors")
               for run in (plain, judged)]
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])


def test_more_images_per_evaluation_prompt_extend_the_same_evaluation():
    """prompts.eval_images_per_prompt=3: every prompt 3 times, each image from its own noise; the first image of
    each prompt is the 1-image evaluation's (to float rounding: a larger batch sums in another order), two processes
    split the images between them and draw the same ones, and the judge's per-split mask follows the repeated
    prompts."""
    import contextlib

    import torch

    from ddpo.evaluation import Evaluator
    from ddpo.reward_pool import RewardPool
    from ddpo.rollout import evaluate
    from ddpo.trainer import build_policy

    common = ["prompts.grammar=simple_animals", "prompts.eval_every=1", "prompts.eval_split=all",
              "prompts.eval_num_prompts=5"]
    one, three = (load_config("tiny_cpu", common + [f"prompts.eval_images_per_prompt={k}"]) for k in (1, 3))
    grammar = load_grammar("simple_animals")
    torch.manual_seed(0)
    family, _ = build_policy(one, torch.device("cpu"))
    pool = RewardPool("jpeg_compressibility", {}, "inline")

    def run(config, rank=0, world=1):
        return evaluate(family, family.denoiser, grammar, pool, config, rank, world, torch.device("cpu"),
                        contextlib.nullcontext)

    a, b = run(one), run(three)
    assert a.positions == list(range(5)) and b.positions == list(range(15)) and b.prompts == a.prompts * 3
    assert torch.allclose(b.images[:5], a.images, atol=1e-5)
    for k in range(1, 3):  # the same prompt, other noise: other images
        assert all((b.images[k * 5 + i] - b.images[i]).abs().max() > 0.1 for i in range(5))
    halves = [run(three, rank, 2) for rank in (0, 1)]
    assert sorted(halves[0].positions + halves[1].positions) == list(range(15))
    for half in halves:
        assert torch.allclose(half.images, b.images[half.positions], atol=1e-5)
    # In sampler batches of sample.batch_size (2 here; 1 below: two processes then run 8 batches each, one of
    # process 1's empty and filled with a repeated image) or all at once: the same images.
    for size in (1, 16):
        config = load_config("tiny_cpu", common + ["prompts.eval_images_per_prompt=3", f"sample.batch_size={size}"])
        for rank in (0, 1):
            part = run(config, rank, 2)
            assert part.positions == halves[rank].positions and len(part.rewards) == len(part.positions)
            assert torch.allclose(part.images, b.images[part.positions], atol=1e-5)
    heldout = Evaluator(three, grammar, pool).heldout
    assert heldout is not None and np.array_equal(heldout, np.tile(Evaluator(one, grammar, pool).heldout, 3))
    pool.close()
    with pytest.raises(ConfigError, match="prompts.eval_images_per_prompt=0 must be >= 1"):
        validate(load_config("tiny_cpu", common + ["prompts.eval_images_per_prompt=0"]))


def test_evaluation_batches_are_as_many_on_every_process_and_fit_the_batch_size():
    from ddpo.rollout import evaluation_batches

    for images, processes, size in [(15, 2, 2), (15, 2, 1), (7, 3, 2), (42, 1, 16), (5, 4, 16), (64, 8, 3)]:
        shares = [list(range(rank, images, processes)) for rank in range(processes)]
        batches = [evaluation_batches(share, images, processes, size) for share in shares]
        assert len({len(b) for b in batches}) == 1  # a sharded denoiser's forward is collective
        for share, mine in zip(shares, batches):
            assert [i for batch in mine for i in batch] == share and all(len(batch) <= size for batch in mine)
            assert sum(not batch for batch in mine) <= (1 if size == 1 else 0)
    assert [len(b) for b in evaluation_batches(list(range(0, 15, 2)), 15, 2, 2)] == [2, 2, 2, 2]
