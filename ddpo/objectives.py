"""The loss of one micro-batch, per algorithm, written against the family interface (ddpo/families/base.py).

- DDPO (`ddpo_is`, `ddpo_sf`, `grpo`): recompute log pi_theta(x_{i+1} | x_i, c) at the sampled steps of each
  trajectory and apply the clipped importance-sampling (or score-function) surrogate; `grpo` is `ddpo_is` with
  group-relative advantages (ddpo/advantages.py).
- RWR (`rwr`, `rwr_sparse`): regress the family's denoising target on the final samples, noised at a random time,
  weighted by reward.
- DiffusionNFT (`nft`): the same forward noising, with the reward-weighted implicit positive and negative policies
  of the current and the sampling ("old") model (ddpo/losses.py `nft_loss`). Likelihood-free: any family, any
  sampler.

Each returns (summed loss, per-step statistics [(loss, approx_kl, clipfrac, kl_ref) ...]).
"""

from __future__ import annotations

import contextlib

import torch

from ddpo.logprob import step_log_prob
from ddpo.losses import ddpo_is_loss, ddpo_sf_loss, gaussian_kl, nft_loss, nft_optimality, rwr_loss
from ddpo.rollout import Rollout
from ddpo.transfer import to_device

DDPO_LOSSES = {"ddpo_is": ddpo_is_loss, "ddpo_sf": ddpo_sf_loss, "grpo": ddpo_is_loss}
FORWARD_NOISING = ("rwr", "rwr_sparse", "nft")


def training_guidance(family, config) -> float:
    """The guidance scale of the training forward pass: the sampling one where the model takes guidance as an
    input (FLUX.1-dev) or DDPO recomputes with CFG (`train.cfg`), else 1 (the conditional model alone)."""
    s, t = config.sample, config.train
    if not family.uses_cfg:
        return s.guidance_scale
    return s.guidance_scale if (t.cfg and t.algorithm in DDPO_LOSSES) else 1.0


def ddpo_chunk_loss(unet, family, rollout: Rollout, idx, t_idx, weights, config):
    """Losses of micro-batch `idx` (b,) at K steps per sample, `t_idx` (b, K) step indices, in ONE model call.

    The b*K rows (times 2 with CFG) are position-major: row k*b + i is sample idx[i] at its k-th step, each
    with its own timestep. Returns the summed loss (the gradient of K per-step backwards, as the loss is a sum
    over steps) and, per step k, (loss, approx_kl, clipfrac, KL to the pretrained model or None), each computed
    on that step's b rows exactly as a one-step call would. K=1 is the one-call-per-timestep update."""
    s, t = config.sample, config.train
    traj = rollout.trajectories
    b, k_steps = t_idx.shape
    idx = to_device(idx, traj.latents.device)  # the indices on the device: no blocking copy per use
    rows, steps = idx.repeat(k_steps), to_device(t_idx.T.reshape(-1), idx.device)  # (b*K,) each
    latents, next_latents = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    timesteps = traj.timesteps[rows, steps]
    guidance = training_guidance(family, config)
    cond, negative = traj.cond.rows(rows), traj.negative.rows(rows)
    output = family.predict(unet, latents, timesteps, cond, negative, guidance)
    mean, std = family.step_mean_std(output, steps, latents, s.eta)  # eta > 0: config-checked
    log_prob, old_log_prob = step_log_prob(next_latents, mean, std), traj.log_probs[rows, steps]
    ref_mean = None
    if t.kl_coef > 0:
        with torch.no_grad(), adapters_off(unet) as model:
            ref_output = family.predict(model, latents, timesteps, cond, negative, guidance)
        ref_mean, _ = family.step_mean_std(ref_output, steps, latents, s.eta)
    per_step, total = [], None
    for k in range(k_steps):
        part = slice(k * b, (k + 1) * b)
        loss, stats = DDPO_LOSSES[t.algorithm](log_prob[part], old_log_prob[part], weights[idx],
                                               t.clip_range, t.adv_clip_max)
        kl_ref = None
        if ref_mean is not None:
            kl_ref = gaussian_kl(mean[part], ref_mean[part], std[part]).mean()
            loss = loss + t.kl_coef * kl_ref
        per_step.append((loss, stats.approx_kl, stats.clipfrac, kl_ref))
        total = loss if total is None else total + loss
    return total, per_step


@contextlib.contextmanager
def adapters_off(unet):
    """The pretrained model: the same denoiser with its LoRA adapters turned off (no gradient, so the wrapped
    model under DDP, whose hooks are not needed)."""
    model = getattr(unet, "module", unet)
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


@contextlib.contextmanager
def weights_swapped(unet, params: list, values: list[torch.Tensor] | None):
    """The model with `params` holding `values` (the sampling policy's weights) for the block; nothing if None."""
    from ddpo.sharding import is_dtensor

    model = getattr(unet, "module", unet)
    if values is None:
        yield model
        return
    # FSDP (DTensor parameters) does not see a swapped `.data`: copy into them in place instead. A plain parameter
    # swaps `.data`, which an in-place copy would record in autograd's version counter.
    sharded = [is_dtensor(p) for p in params]
    current = [p.detach().clone() if s else p.data for p, s in zip(params, sharded)]
    _assign(params, values, sharded)
    try:
        yield model
    finally:
        _assign(params, current, sharded)


@torch.no_grad()
def _assign(params: list, values: list[torch.Tensor], sharded: list[bool]) -> None:
    for p, v, in_place in zip(params, values, sharded):
        if in_place:
            p.copy_(v)
        else:
            p.data = v


def forward_noising_loss(unet, family, rollout: Rollout, idx, seeds: list[int], weights, config,
                         old_params: list | None, params: list):
    """RWR or DiffusionNFT loss of micro-batch `idx` (b,) on its final samples at one random time per sample.

    `old_params` (DiffusionNFT): the sampling policy's weights; None while the model still holds them (before the
    epoch's first optimizer step), when the current prediction, detached, is the old one."""
    traj = rollout.trajectories
    idx = to_device(idx, traj.latents.device)
    x0 = traj.latents[idx, -1]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    times = to_device(family.train_times(generators), x0.device)
    noise = to_device(torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators]), x0.device)
    noisy, target = family.add_noise(x0, noise, times)
    cond, negative = traj.cond.rows(idx), traj.negative.rows(idx)
    guidance = training_guidance(family, config)
    prediction = family.predict(unet, noisy, times, cond, negative, guidance)
    t = config.train
    if t.algorithm != "nft":
        return rwr_loss(prediction, target, weights[idx]), None, None, None
    if old_params is None:
        old = prediction.detach()
    else:
        with torch.no_grad(), weights_swapped(unet, params, old_params) as model:
            old = family.predict(model, noisy, times, cond, negative, guidance)
    loss, _ = nft_loss(prediction, old, target, nft_optimality(weights[idx], t.adv_clip_max), t.nft_beta)
    # x adv_clip_max / beta, as DiffusionNFT's code scales it: the gradient size gradient clipping was tuned for.
    return loss * (t.adv_clip_max / t.nft_beta), None, None, None
