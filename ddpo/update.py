"""The policy update of one epoch: inner epochs over this process's samples, one backward per timestep.

DDPO (ddpo_is, ddpo_sf) recomputes log p_theta(x_{t-1} | x_t, c) at the sampled steps of each trajectory;
RWR (rwr, rwr_sparse) regresses the noise of the final samples x_0 at random diffusion times, weighted by
reward. Gradients accumulate over `timestep_fraction * T` timesteps and `gradient_accumulation_steps`
micro-batches before each optimizer step; DDP synchronises them only on the last backward of a step.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpo.logprob import ddim_step_mean_std, step_log_prob
from ddpo.losses import ddpo_is_loss, ddpo_sf_loss, gaussian_kl, rwr_loss, rwr_sparse_weights, rwr_weights
from ddpo.rollout import Rollout, derive_seed
from ddpo.sampler import predict_noise

_DDPO_LOSSES = {"ddpo_is": ddpo_is_loss, "ddpo_sf": ddpo_sf_loss}


def _ddpo_step_loss(unet, scheduler, rollout: Rollout, idx, t_idx, weights, config):
    """Loss of micro-batch `idx` (b,) at per-sample step indices `t_idx` (b,), with approx_kl, clipfrac and the
    KL to the pretrained model (None unless train.kl_coef > 0)."""
    s, t = config.sample, config.train
    traj = rollout.trajectories
    latents, next_latents = traj.latents[idx, t_idx], traj.latents[idx, t_idx + 1]
    timesteps = traj.timesteps[idx, t_idx]
    guidance = s.guidance_scale if t.cfg else 1.0
    noise_pred = predict_noise(unet, latents, timesteps, traj.prompt_embeds[idx], traj.negative_embeds[idx], guidance)
    mean, std = ddim_step_mean_std(scheduler, noise_pred, timesteps, latents, s.eta)  # eta > 0: config-checked
    log_prob = step_log_prob(next_latents, mean, std)
    loss, stats = _DDPO_LOSSES[t.algorithm](log_prob, traj.log_probs[idx, t_idx], weights[idx],
                                            t.clip_range, t.adv_clip_max)
    kl_ref = None
    if t.kl_coef > 0:
        ref_pred = _reference_noise(unet, latents, timesteps, traj.prompt_embeds[idx], traj.negative_embeds[idx],
                                    guidance)
        ref_mean, _ = ddim_step_mean_std(scheduler, ref_pred, timesteps, latents, s.eta)
        kl_ref = gaussian_kl(mean, ref_mean, std).mean()
        loss = loss + t.kl_coef * kl_ref
    return loss, stats.approx_kl, stats.clipfrac, kl_ref


@torch.no_grad()
def _reference_noise(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance) -> torch.Tensor:
    """The pretrained model's prediction (B, C, h, w): the same UNet with its LoRA adapters turned off."""
    model = getattr(unet, "module", unet)  # under DDP, the wrapped model (no gradient, so no DDP hooks needed)
    model.disable_adapters()
    try:
        return predict_noise(model, latents, timesteps, prompt_embeds, negative_embeds, guidance)
    finally:
        model.enable_adapters()


def _rwr_step_loss(unet, scheduler, rollout: Rollout, idx, seeds: list[int], weights):
    """Weighted denoising loss of micro-batch `idx` (b,) on x_0 at a random diffusion time per sample."""
    x0 = rollout.trajectories.latents[idx, -1]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in generators])
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators]).to(x0.device)
    t = t.to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    prediction = unet(noisy, t, encoder_hidden_states=rollout.trajectories.prompt_embeds[idx]).sample
    return rwr_loss(prediction, _denoising_target(scheduler, x0, noise, t), weights[idx]), None, None, None


def _denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses, by the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def policy_update(unet, scheduler, optimizer, accelerator, params: list, rollout: Rollout, weights: torch.Tensor,
                  config, epoch: int, progress: bool) -> dict[str, float | None]:
    """Run the inner epochs; `weights` (N,) are advantages (DDPO) or RWR weights. Returns mean loss statistics."""
    s, t = config.sample, config.train
    num_samples, num_steps = len(rollout.prompts), s.num_steps
    steps_per_sample = max(1, int(num_steps * t.timestep_fraction))
    scheduler.set_timesteps(num_steps, device=weights.device)
    accumulation = t.gradient_accumulation_steps * steps_per_sample
    losses, kls, clipfracs, kl_refs = [], [], [], []
    for inner in range(t.num_inner_epochs):
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(
            derive_seed(config.seed, epoch, inner, accelerator.process_index, "order")))
        # Each sample visits its steps in its own random order, seeded by its global index.
        step_orders = torch.stack([torch.randperm(num_steps, generator=torch.Generator().manual_seed(
            derive_seed(config.seed, epoch, inner, int(g), "steps"))) for g in rollout.global_index])
        micro_batches = order.split(t.batch_size)
        for k, idx in enumerate(tqdm(micro_batches, desc=f"epoch {epoch} training", leave=False, disable=not progress)):
            last_of_step = (k + 1) % t.gradient_accumulation_steps == 0
            for j in range(steps_per_sample):
                sync = last_of_step and j == steps_per_sample - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(unet)), accelerator.autocast():
                    if t.algorithm in _DDPO_LOSSES:
                        loss, kl, clipfrac, kl_ref = _ddpo_step_loss(unet, scheduler, rollout, idx,
                                                                     step_orders[idx, j], weights, config)
                    else:
                        seeds = [derive_seed(config.seed, epoch, inner, int(g), j, "rwr")
                                 for g in rollout.global_index[idx]]
                        loss, kl, clipfrac, kl_ref = _rwr_step_loss(unet, scheduler, rollout, idx, seeds, weights)
                    accelerator.backward(loss / accumulation)
                losses.append(loss.detach())
                if kl is not None:
                    kls.append(kl)
                    clipfracs.append(clipfrac)
                if kl_ref is not None:
                    kl_refs.append(kl_ref.detach())
            if last_of_step:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {"loss": _mean(accelerator, losses), "approx_kl": _mean(accelerator, kls) if kls else None,
            "clipfrac": _mean(accelerator, clipfracs) if clipfracs else None,
            **({"kl_ref": _mean(accelerator, kl_refs)} if kl_refs else {})}


def _mean(accelerator, values: list[torch.Tensor]) -> float:
    local = torch.stack(values).float().mean().reshape(1)
    return float(accelerator.reduce(local.to(accelerator.device), reduction="mean").item())


def epoch_weights(algorithm: str, advantages: np.ndarray, valid: np.ndarray, temperature: float,
                  quantile: float) -> np.ndarray:
    """Per-sample weights of the whole (gathered) epoch batch: advantages for DDPO, RWR weights for RWR.

    Skipped samples (valid False) get weight 0. (N,) -> (N,) float32.
    """
    adv = torch.as_tensor(np.where(valid, advantages, 0.0), dtype=torch.float32)
    if algorithm == "rwr":
        adv = rwr_weights(adv, temperature)
    elif algorithm == "rwr_sparse":
        adv = rwr_sparse_weights(adv, quantile)
    return np.where(valid, adv.numpy(), 0.0).astype(np.float32)
