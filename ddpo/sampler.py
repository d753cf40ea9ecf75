"""Sampling trajectories: the denoising loop of any model family, with per-step log-probabilities.

Written against the family interface (ddpo/families/base.py), so that the same `family.predict` and
`family.step_mean_std` run at sampling and at training time and importance ratios start at exactly 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpo.families.base import Cond
from ddpo.logprob import step_log_prob
from ddpo.transfer import to_device


class Trajectories(NamedTuple):
    """A batch of B denoising trajectories of T steps (all float32 unless noted)."""

    latents: torch.Tensor  # (B, T+1, ...): x at each step, the noise first and the sample last
    log_probs: torch.Tensor  # (B, T): log pi(x_{i+1} | x_i) when sampled; NaN at a deterministic (ODE) step
    timesteps: torch.Tensor  # (B, T): the denoiser's time input at each step
    cond: Cond  # the prompts' conditioning, each tensor (B, ...)
    negative: Cond  # the unconditional (negative-prompt) conditioning, each tensor (B, ...)
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], on the CPU


def cat_trajectories(parts: list[Trajectories]) -> Trajectories:
    return Trajectories(*(Cond.cat(list(field)) if isinstance(field[0], Cond) else torch.cat(field)
                          for field in zip(*parts)))


def noise_levels(eta: float, num_steps: int, sde_steps: torch.Tensor | None) -> list[float]:
    """The noise level of each step: `eta` inside the SDE window (every step without one), 0 (ODE) outside."""
    return [eta if sde_steps is None or bool(sde_steps[i]) else 0.0 for i in range(num_steps)]


@torch.no_grad()
def sample_trajectories(family, model, cond: Cond, negative: Cond, *, num_steps: int, guidance_scale: float,
                        eta: float, generator: torch.Generator, progress: bool = False,
                        initial_noise: torch.Tensor | None = None,
                        sde_steps: torch.Tensor | None = None) -> Trajectories:
    """Run the family's sampler from N(0, I) noise and record every step.

    `model` is passed separately from `family` because during training it is the (possibly DDP-wrapped, LoRA)
    policy. Noise comes only from `generator` (a CPU generator), so a seed fixes the whole trajectory.
    `initial_noise` (B, ...), if given, is the N(0, I) draw of the first latents instead (e.g. one seed per
    evaluation prompt). `sde_steps` (T,) bool, if given, makes only those steps stochastic (an SDE window); the
    others take the deterministic step (log-prob NaN: no density, not trained on).
    """
    (trajectories,) = sample_merged(family, model, [cond], [negative], [generator], num_steps=num_steps,
                                    guidance_scale=guidance_scale, eta=eta, progress=progress,
                                    initial_noise=None if initial_noise is None else [initial_noise],
                                    sde_steps=sde_steps)
    return trajectories


@torch.no_grad()
def sample_merged(family, model, conds: list[Cond], negatives: list[Cond], generators: list[torch.Generator], *,
                  num_steps: int, guidance_scale: float, eta: float, progress: bool = False,
                  initial_noise: list[torch.Tensor] | None = None,
                  sde_steps: torch.Tensor | None = None) -> list[Trajectories]:
    """`sample_trajectories` of several batches at once: one denoiser call per step for all of them.

    Batch j has its conditioning `conds[j]` / `negatives[j]` (B_j, ...) and its own generator, which draws its
    initial noise and its per-step noise exactly as `sample_trajectories` would for it alone, so each returned
    Trajectories equals that batch sampled by itself up to the float rounding of the larger model calls. Each
    batch is decoded by itself (the VAE's peak memory stays that of one batch). One batch is exactly
    `sample_trajectories`.
    """
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    device = next(iter(conds[0].values())).device
    family.set_steps(num_steps, device)
    sizes = [next(iter(c.values())).shape[0] for c in conds]
    batch = sum(sizes)
    cond, negative = (conds[0], negatives[0]) if len(conds) == 1 else (Cond.cat(conds), Cond.cat(negatives))
    if initial_noise is None:
        initial_noise = [torch.randn(family.latent_shape(n), generator=g) for n, g in zip(sizes, generators)]
    noise = initial_noise[0] if len(sizes) == 1 else torch.cat(initial_noise)
    latents = family.initial_latents(to_device(noise, device))
    all_latents, all_log_probs = [latents], []
    levels = noise_levels(eta, num_steps, sde_steps)
    for i, t in enumerate(tqdm(family.timesteps, desc="sampling", leave=False, disable=not progress)):
        output = family.predict(model, latents, t.expand(batch), cond, negative, guidance_scale)
        step = torch.full((batch,), i, dtype=torch.long, device=device)  # made there: no copy per step
        mean, std = family.step_mean_std(output, step, latents, levels[i])
        if levels[i] > 0:
            draws = [randn_tensor((n, *mean.shape[1:]), generator=g, device=mean.device, dtype=mean.dtype)
                     for n, g in zip(sizes, generators)]  # each batch's own noise, in the order it alone draws it
            draw = draws[0] if len(draws) == 1 else torch.cat(draws)
            latents = (mean + std * draw).float()
            log_prob = step_log_prob(latents, mean, std)
        else:  # deterministic step (evaluation, or outside the SDE window): the policy has no density here
            latents, log_prob = mean, torch.full((batch,), float("nan"), device=device)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    all_latents, all_log_probs = torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1)
    if len(sizes) == 1:
        return [Trajectories(
            latents=all_latents, log_probs=all_log_probs, timesteps=family.timesteps.expand(batch, -1).clone(),
            cond=cond, negative=negative, images=family.decode(latents))]
    out, start = [], 0
    for n, c, neg in zip(sizes, conds, negatives):
        rows = slice(start, start + n)
        out.append(Trajectories(
            latents=all_latents[rows].clone(), log_probs=all_log_probs[rows].clone(),
            timesteps=family.timesteps.expand(n, -1).clone(), cond=c, negative=neg, images=family.decode(latents[rows])))
        start += n
    return out
