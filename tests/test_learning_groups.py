"""Groups (`sample.images_per_prompt` > 1): an epoch draws each group's prompt without replacement."""

from ddpo.config import load_config
from ddpo.rollout import draw_prompts, epoch_group_prompts
from prompts import load_grammar


def _config(*overrides):
    return load_config("shapes_alignment", ["prompts.split=heldout", "sample.images_per_prompt=4", "sample.batch_size=16",
                                            "sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=1",
                                            *overrides])


def test_an_epochs_groups_have_distinct_prompts_on_one_and_on_two_processes():
    grammar = load_grammar("shapes")  # the held-out split: 42 prompts
    config = _config()
    repeats = 0
    for epoch in range(20):
        one = [p.text for b in range(2) for p in draw_prompts(grammar, config, epoch, b, 1,
                                                              epoch_group_prompts(grammar, config, epoch, 1))]
        assert len(one) == 8 and len(set(one)) == 8, f"epoch {epoch}: a prompt fills two groups: {one}"
        # 2 processes with 1 batch each: global batches 0 and 1 take the same slices.
        half = _config("sample.num_batches_per_epoch=1")
        groups = epoch_group_prompts(grammar, half, epoch, 2)
        two = [p.text for b in range(2) for p in draw_prompts(grammar, half, epoch, b, 2, groups)]
        assert two == one
        # Drawn with replacement (8 of 42), about half of the epochs repeat a prompt: the bug this replaces.
        old = [p.text for b in range(2) for p in draw_prompts(grammar, config, epoch, b, 1, None)[:4]]
        repeats += len(set(old)) < len(old)
    assert repeats > 0


def test_more_groups_than_prompts_use_every_prompt_before_any_repeats():
    grammar = load_grammar("shapes")
    config = _config("sample.num_batches_per_epoch=12")  # 48 groups, 42 held-out prompts
    texts = [p.text for p in epoch_group_prompts(grammar, config, 0, 1)]
    assert len(texts) == 48 and len(set(texts)) == 42 and len(set(texts[:42])) == 42


def test_evaluation_takes_each_distinct_prompt_once():
    from ddpo.rollout import evaluation_prompts

    grammar = load_grammar("shapes")
    config = load_config("shapes_alignment", ["prompts.eval_split=heldout", "prompts.eval_num_prompts=42"])
    texts = [p.text for p in evaluation_prompts(grammar, config)]
    assert len(texts) == 42 and set(texts) == {p.text for p in grammar.enumerate("heldout")}
    eight = [p.text for p in evaluation_prompts(grammar, load_config("shapes_alignment",
                                                                     ["prompts.eval_split=heldout",
                                                                      "prompts.eval_num_prompts=8"]))]
    assert len(set(eight)) == 8 and eight == texts[:8]


def test_evaluation_is_the_same_on_one_and_on_two_processes():
    from contextlib import nullcontext

    import numpy as np
    import torch

    from ddpo.reward_pool import RewardPool
    from ddpo.rollout import evaluate
    from ddpo.families import load_family

    config = load_config("tiny_cpu", ["prompts.eval_every=1", "prompts.eval_split=all", "prompts.eval_num_prompts=5"])
    family, grammar = load_family("tiny-random"), load_grammar("simple_animals")
    pool = RewardPool("rewards_for_tests:brightness", {}, "inline")
    try:
        def run(rank, world):
            return evaluate(family, family.denoiser, grammar, pool, config, rank, world, torch.device("cpu"), nullcontext)

        one, first, second = run(0, 1), run(0, 2), run(1, 2)
    finally:
        pool.close()
    assert one.positions == [0, 1, 2, 3, 4] and first.positions + second.positions == [0, 2, 4, 1, 3]
    two = dict(zip(first.positions + second.positions, np.concatenate([first.rewards, second.rewards])))
    np.testing.assert_allclose([two[i] for i in range(5)], one.rewards, rtol=1e-5)
    assert len(set(one.prompts)) == 5
