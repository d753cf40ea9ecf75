"""One epoch's data: prompts from the grammar -> trajectories -> rewards (computed while the next batch samples).

Every random draw is seeded from (config seed, epoch, *global* batch index), where global batch
`b * num_processes + process_index` is this process's b-th batch. So a 2-process run draws exactly the
samples of a 1-process run with twice the batches, and a resumed run redraws the epoch it lost.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpo.losses import NonFiniteError
from ddpo.reward_pool import RewardPool, check_finite
from ddpo.sampler import Trajectories, cat_trajectories, sample_merged, sample_trajectories


class Rollout(NamedTuple):
    """This process's N samples of one epoch."""

    trajectories: Trajectories  # every field batched over N
    prompts: list[str]  # N
    metadata: list[dict[str, Any]]  # N, from the grammar
    global_index: torch.Tensor  # (N,) long: a sample's index in the epoch across all processes
    rewards: np.ndarray  # (N,) float32 (NaN/inf only where `valid` is False)
    valid: np.ndarray  # (N,) bool: False for non-finite rewards skipped by reward.on_nonfinite=skip
    reward_info: dict[str, list]  # per-sample reward details (captions, sub-scores)
    sample_s: float  # wall time of the sampling loop
    reward_s: float  # wall time spent waiting for rewards after sampling ended (what overlap did not hide)


class Evaluation(NamedTuple):
    positions: list[int]  # n_local: each image's position in `evaluation_images`
    prompts: list[str]  # n_local
    images: torch.Tensor  # (n_local, 3, H, W) in [0, 1]
    rewards: np.ndarray  # (n_local,) float32


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from any tuple of ints and strings, stable across runs, processes and machines."""
    ints = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") % (2**32) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def split_arg(split: str) -> str | None:
    return None if split == "all" else split


def sde_window(config, epoch: int) -> torch.Tensor | None:
    """(T,) bool: the steps of epoch `epoch` that sample with the SDE (and are trained); None for all of them.

    With `sample.sde_window` = k > 0 only k consecutive steps are stochastic and the rest are deterministic
    (Flow-GRPO-Fast, MixGRPO): the window starts at one of `sample.sde_window_starts` (all positions if empty),
    drawn per epoch (`sde_window_schedule=random`, seeded by (seed, epoch)) or in turn (`sliding`)."""
    s = config.sample
    if s.sde_window == 0:
        return None
    starts = s.sde_window_starts or list(range(s.num_steps - s.sde_window + 1))
    if s.sde_window_schedule == "sliding":
        start = starts[epoch % len(starts)]
    else:
        start = starts[int(np.random.default_rng(derive_seed(config.seed, epoch, "sde-window")).integers(len(starts)))]
    mask = torch.zeros(s.num_steps, dtype=torch.bool)
    mask[start:start + s.sde_window] = True
    return mask


def collect_rollout(family, unet, grammar, reward_pool: RewardPool, config, epoch: int, process_index: int,
                    num_processes: int, device: torch.device, autocast, progress: bool) -> Rollout:
    s = config.sample
    negative = family.encode([s.negative_prompt], device)
    window = sde_window(config, epoch)
    batches, futures, texts, metadata, indices = [], [], [], [], []
    group_prompts = epoch_group_prompts(grammar, config, epoch, num_processes) if s.images_per_prompt > 1 else None
    start = time.perf_counter()
    per_call = s.batches_per_call

    def sampled(trajectories, batch_texts, batch_meta, global_batch) -> None:
        """A sampled batch: check it, send its images to the reward (which runs while the next batch samples)."""
        check_finite_latents(trajectories, epoch)
        futures.append(reward_pool.submit(trajectories.images, batch_texts, batch_meta))
        batches.append(trajectories)
        texts.extend(batch_texts)
        metadata.extend(batch_meta)
        indices.extend(range(global_batch * s.batch_size, (global_batch + 1) * s.batch_size))

    pending = []  # the batches drawn but not yet sampled: (texts, metadata, cond, generator, global batch)
    for b in tqdm(range(s.num_batches_per_epoch), desc=f"epoch {epoch + 1} sampling", leave=False, disable=not progress):
        global_batch = b * num_processes + process_index
        drawn = draw_prompts(grammar, config, epoch, global_batch, num_processes, group_prompts)
        prompts = [p for p in drawn for _ in range(s.images_per_prompt)]  # each prompt's images side by side
        batch_texts, batch_meta = [p.text for p in prompts], [dict(p.metadata) for p in prompts]
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, global_batch, "noise"))
        # With sample.batches_per_call = k > 1 this batch waits for the next k - 1, then all go through the denoiser
        # together (one call per step), each with its own prompts, noise and generator as above (k = 1: alone)
        pending.append((batch_texts, batch_meta, encode_distinct(family, batch_texts, device), generator, global_batch))
        if len(pending) < per_call:
            continue
        with autocast():
            merged = sample_merged(family, unet, [cond for _, _, cond, _, _ in pending],
                                   [negative.expand(s.batch_size)] * len(pending),
                                   [g for _, _, _, g, _ in pending], num_steps=s.num_steps,
                                   guidance_scale=s.guidance_scale, eta=s.eta, sde_steps=window)
        for (batch_texts, batch_meta, _, _, global_batch), trajectories in zip(pending, merged):
            sampled(trajectories, batch_texts, batch_meta, global_batch)
        pending = []
    sample_s = time.perf_counter() - start
    results = [reward_pool.result(f) for f in futures]  # a RewardError raised by the reward surfaces here
    reward_s = time.perf_counter() - start - sample_s
    rewards = np.concatenate([r.scores for r in results])
    info = {k: sum((r.info.get(k, [None] * len(r.scores)) for r in results), []) for k in results[0].info}
    valid = check_finite(rewards, texts, info, config.reward.on_nonfinite)
    return Rollout(cat_trajectories(batches), texts, metadata, torch.tensor(indices), rewards, valid, info,
                   sample_s, reward_s)


def encode_distinct(family, texts: list[str], device: torch.device):
    """`family.encode(texts)`, encoding each distinct text once: one call on the distinct texts (in first-seen
    order), its rows then repeated where `texts` repeats them. A group's `sample.images_per_prompt` images share
    one encoding instead of that many. Without repeats this is exactly `family.encode(texts)`. It depends only on
    the batch's texts, so a batch is encoded alike on any number of processes."""
    distinct = list(dict.fromkeys(texts))
    cond = family.encode(distinct, device)
    if len(distinct) == len(texts):
        return cond
    position = {text: i for i, text in enumerate(distinct)}
    return cond.rows(torch.tensor([position[text] for text in texts], device=next(iter(cond.values())).device))


def draw_prompts(grammar, config, epoch: int, global_batch: int, num_processes: int,
                 group_prompts: list | None = None) -> list:
    """The distinct prompts of one sampling batch (batch_size // images_per_prompt of them).

    Without groups each batch draws its own prompts (with replacement, as the paper does). With groups
    (`group_prompts`, from `epoch_group_prompts`) the batch takes its slice of the epoch's list."""
    s = config.sample
    per_batch = s.batch_size // s.images_per_prompt
    if group_prompts is None:
        draws = split_draws(config, per_batch, derive_seed(config.seed, epoch, global_batch, "prompts"))
        return [prompt for split, n, seed in draws for prompt in grammar.sample(n, split=split, seed=seed)]
    return group_prompts[global_batch * per_batch:(global_batch + 1) * per_batch]


def split_draws(config, n: int, seed: int) -> list[tuple[str | None, int, int]]:
    """[(grammar split, how many of `n` prompts to draw from it, seed)]: one split with `seed`, or with
    `prompts.split=mix` round(mix_heldout x n) held-out prompts (at least 1 and at most n - 1 when n > 1) and the rest
    training ones, each split with its own seed derived from `seed`."""
    p = config.prompts
    if p.split != "mix":
        return [(split_arg(p.split), n, seed)]
    heldout = min(max(round(p.mix_heldout * n), 1), n - 1) if n > 1 else int(p.mix_heldout >= 0.5)
    return [(split, k, derive_seed(seed, split)) for split, k in (("heldout", heldout), ("train", n - heldout))]


def epoch_group_prompts(grammar, config, epoch: int, num_processes: int, oversample: int = 16) -> list:
    """The prompts of every group of an epoch, across all processes, drawn *without replacement*.

    A prompt drawn twice in one epoch would put two groups under one prompt; each group must be normalised by
    itself (see `advantages.group_advantages`, which also keeps them apart when a repeat cannot be avoided).
    Distinct prompts are taken in the order of a long draw by the grammar's weights (`oversample` x the groups
    needed), so the result depends only on (seed, epoch) and the epoch's size, not on how it is split over
    processes. When the split has fewer distinct prompts than the epoch has groups, they are used in turn.
    """
    s = config.sample
    needed = s.batch_size // s.images_per_prompt * s.num_batches_per_epoch * num_processes
    seed = derive_seed(config.seed, epoch, "group-prompts")
    drawn = []
    for split, n, split_seed in split_draws(config, needed, seed):
        pool = grammar.sample(n * oversample, split=split, seed=split_seed)
        first: dict[str, Any] = {}
        for prompt in pool:
            first.setdefault(prompt.text, prompt)  # first occurrences, in draw order
        distinct = list(first.values())
        drawn += [distinct[i % len(distinct)] for i in range(n)]
    if config.prompts.split == "mix":  # interleave, so that every sampling batch holds both splits
        order = np.random.default_rng(derive_seed(seed, "mix-order")).permutation(needed)
        drawn = [drawn[i] for i in order]
    return drawn


def check_finite_latents(trajectories: Trajectories, epoch: int | None) -> None:
    """Refuse NaN/inf latents before their images reach the reward (which would otherwise be blamed for them)."""
    bad = int((~torch.isfinite(trajectories.latents.flatten(1)).all(dim=1)).sum())
    if bad:
        when = f"in epoch {epoch + 1}" if epoch is not None else "in the evaluation"
        raise NonFiniteError(f"{bad} of {len(trajectories.latents)} trajectories sampled {when} hold NaN/inf latents: "
                             "the policy's weights are broken (most often train.learning_rate is too high; the default "
                             "is 3e-4). Resume from an earlier checkpoint with a lower train.learning_rate.")


def evaluation_prompts(grammar, config, oversample: int = 16) -> list:
    """The evaluation's prompts: `prompts.eval_num_prompts` *distinct* prompts of `prompts.eval_split`, or all of
    a finite split that has fewer. Taken in the order of a long draw by the grammar's weights (seed
    `prompts.eval_seed`; `oversample` x the number wanted), then, for a finite split, in the grammar's order."""
    p = config.prompts
    split = split_arg(p.eval_split)
    first: dict[str, Any] = {}
    for prompt in grammar.sample(p.eval_num_prompts * oversample, seed=p.eval_seed, split=split):
        first.setdefault(prompt.text, prompt)
    if len(first) < p.eval_num_prompts and grammar.is_finite:
        for prompt in grammar.enumerate(split):
            first.setdefault(prompt.text, prompt)
    return list(first.values())[:p.eval_num_prompts]


def evaluation_images(grammar, config) -> list:
    """The prompt of each evaluation image: `evaluation_prompts` repeated `prompts.eval_images_per_prompt` times
    (all prompts once, then all again, ...), so position i < n_prompts is the same image for any repeat count."""
    return evaluation_prompts(grammar, config) * config.prompts.eval_images_per_prompt


def evaluation_noise(family, eval_seed: int, positions: list[int]) -> torch.Tensor:
    """The initial noise for the evaluation images at `positions` (n, ...): one seed per image position, so an
    image gets the same noise whichever process evaluates it and however many there are."""
    shape = family.latent_shape(1)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(
        derive_seed(eval_seed, i, "eval-noise"))) for i in positions])


def evaluation_batches(mine: list[int], num_images: int, num_processes: int, batch_size: int) -> list[list[int]]:
    """This process's evaluation positions `mine` in sampler batches of at most `batch_size` (`sample.batch_size`,
    what fits in memory), as many batches on every process: a sharded denoiser's (FSDP) forward is collective, so
    each process must call it as often. The count comes from the largest share; with batch_size 1 a smaller share
    can get one empty batch, which `evaluate` fills with a repeated image and drops."""
    largest = -(-num_images // num_processes)
    return [[int(i) for i in part] for part in np.array_split(np.array(mine, dtype=np.int64),
                                                               max(1, -(-largest // batch_size)))]


@torch.no_grad()
def evaluate(family, unet, grammar, reward_pool: RewardPool, config, process_index: int, num_processes: int,
             device: torch.device, autocast) -> Evaluation:
    """This process's share of the fixed evaluation prompts, sampled deterministically (eta = 0), and their rewards.

    Prompts (`evaluation_images`: each distinct prompt `prompts.eval_images_per_prompt` times) and initial noise
    (seeded by the image's position) depend only on `prompts.eval_seed`, so every evaluation of a run (and of any run
    with the same settings, on any number of processes or batch size) sees the same prompts and noise: grids of two
    evaluations are before/after pictures. A process samples its share in batches of at most `sample.batch_size`
    (`evaluation_batches`); a batch's rewards run while the next one samples.
    """
    p, s = config.prompts, config.sample
    prompts = evaluation_images(grammar, config)
    mine = list(range(process_index, len(prompts), num_processes))
    if not mine:
        return Evaluation([], [], torch.zeros(0, 3, 1, 1), np.zeros(0, dtype=np.float32))
    negative = family.encode([s.negative_prompt], device)
    images, futures = [], []
    for batch in evaluation_batches(mine, len(prompts), num_processes, s.batch_size):
        positions = batch or mine[-1:]  # an empty batch samples a repeated image (dropped) to keep FSDP in step
        texts = [prompts[i].text for i in positions]
        with autocast():
            trajectories = sample_trajectories(family, unet, family.encode(texts, device),
                                               negative.expand(len(positions)),
                                               num_steps=s.eval_num_steps or s.num_steps,
                                               guidance_scale=s.guidance_scale, eta=0.0, generator=torch.Generator(),
                                               initial_noise=evaluation_noise(family, p.eval_seed, positions))
        check_finite_latents(trajectories, None)
        if batch:
            images.append(trajectories.images)
            futures.append(reward_pool.submit(trajectories.images, texts, [dict(prompts[i].metadata) for i in batch]))
    rewards = np.concatenate([reward_pool.result(f).scores for f in futures])
    return Evaluation(mine, [prompts[i].text for i in mine], torch.cat(images), rewards)
