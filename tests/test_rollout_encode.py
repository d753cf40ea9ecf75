"""Each distinct prompt of a sampling batch goes through the text encoder once (ddpo/rollout.py encode_distinct)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ddpo.config import load_config

CPU = torch.device("cpu")


class CountingFamily:
    """A family whose `encode` records the prompt lists it is given."""

    def __init__(self, family):
        self.family, self.calls = family, []

    def __getattr__(self, name):
        return getattr(self.family, name)

    def encode(self, prompts, device):
        self.calls.append(list(prompts))
        return self.family.encode(prompts, device)


def test_repeated_prompts_are_encoded_once_and_their_rows_repeated():
    from ddpo.families import load_family
    from ddpo.rollout import encode_distinct

    family = CountingFamily(load_family("tiny-random-sdxl"))  # several conditioning tensors
    cond = encode_distinct(family, ["cat", "cat", "dog", "cat", "dog", "owl"], CPU)
    assert family.calls == [["cat", "dog", "owl"]]
    distinct = family.family.encode(["cat", "dog", "owl"], CPU)
    assert set(cond) == set(distinct)
    for key in cond:
        assert torch.equal(cond[key], distinct[key][torch.tensor([0, 0, 1, 0, 1, 2])])


def test_without_repeats_it_is_exactly_one_encode_call():
    from ddpo.families import load_family
    from ddpo.rollout import encode_distinct

    family = load_family("tiny-random")
    texts = ["cat", "dog", "owl", "a horse"]
    assert all(torch.equal(encode_distinct(family, texts, CPU)[k], v) for k, v in family.encode(texts, CPU).items())


def test_a_group_of_images_per_prompt_costs_one_encoding():
    from ddpo.families import load_family
    from ddpo.reward_pool import RewardPool
    from ddpo.rollout import collect_rollout
    from prompts import load_grammar

    config = load_config("tiny_cpu", ["sample.batch_size=6", "sample.images_per_prompt=3", "train.batch_size=3"])
    family = CountingFamily(load_family("tiny-random"))
    pool = RewardPool("rewards_for_tests:brightness", {}, "inline")
    try:
        rollout = collect_rollout(family, family.denoiser, load_grammar("simple_animals"), pool, config, epoch=0,
                                  process_index=0, num_processes=1, device=CPU, autocast=nullcontext, progress=False)
    finally:
        pool.close()
    # the negative prompt, then each batch's 2 distinct prompts (not its 6 images)
    assert family.calls == [[""], rollout.prompts[0:6:3], rollout.prompts[6:12:3]]
    embeds = rollout.trajectories.cond["embeds"]
    assert embeds.shape[0] == 12 and all(torch.equal(embeds[i], embeds[i - i % 3]) for i in range(12))
