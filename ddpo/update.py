"""The policy update of one epoch: inner epochs over this process's samples, one backward per chunk of timesteps.

DDPO (ddpo_is, ddpo_sf) recomputes log p_theta(x_{t-1} | x_t, c) at the sampled steps of each trajectory;
RWR (rwr, rwr_sparse) regresses the noise of the final samples x_0 at random diffusion times, weighted by
reward. Gradients accumulate over `timestep_fraction * T` timesteps and `gradient_accumulation_steps`
micro-batches before each optimizer step; DDP synchronises them only on the last backward of a step.
DDPO sends `train.timesteps_per_call` steps of each sample of a micro-batch through the UNet in one call (per-row
timesteps) with one backward of their summed loss: the same gradient as one backward per step, fewer and larger
UNet calls, and K times the activation memory. 1 is one call per step.

Every optimizer step first checks that its losses and gradient norm are finite (all processes agree): a
non-finite step raises `NonFiniteError` naming the likely cause (train.on_nonfinite=error), or is dropped with the
weights untouched and counted (train.on_nonfinite=skip). Deterministic steps (std 0, see ddpo/logprob.py) have
no log-probability and are not trained on.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpo.logprob import ddim_step_mean_std, step_log_prob, step_std
from ddpo.losses import (NonFiniteError, ddpo_is_loss, ddpo_sf_loss, gaussian_kl, rwr_loss, rwr_sparse_weights,
                         rwr_weights)
from ddpo.rollout import Rollout, derive_seed
from ddpo.sampler import predict_noise

logger = logging.getLogger("ddpo")

_DDPO_LOSSES = {"ddpo_is": ddpo_is_loss, "ddpo_sf": ddpo_sf_loss}


def _ddpo_chunk_loss(unet, scheduler, rollout: Rollout, idx, t_idx, weights, config):
    """Losses of micro-batch `idx` (b,) at K steps per sample, `t_idx` (b, K) step indices, in ONE UNet call.

    The b*K rows (times 2 with CFG) are position-major: row k*b + i is sample idx[i] at its k-th step, each
    with its own timestep. Returns the summed loss (the gradient of K per-step backwards, as the loss is a sum
    over steps) and, per step k, (loss, approx_kl, clipfrac, KL to the pretrained model or None), each computed
    on that step's b rows exactly as a one-step call would. K=1 is the one-call-per-timestep update."""
    s, t = config.sample, config.train
    traj = rollout.trajectories
    b, k_steps = t_idx.shape
    rows, steps = idx.repeat(k_steps), t_idx.T.reshape(-1)  # (b*K,) each
    latents, next_latents = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    timesteps = traj.timesteps[rows, steps]
    guidance = s.guidance_scale if t.cfg else 1.0
    embeds, negative = traj.prompt_embeds[rows], traj.negative_embeds[rows]
    noise_pred = predict_noise(unet, latents, timesteps, embeds, negative, guidance)
    mean, std = ddim_step_mean_std(scheduler, noise_pred, timesteps, latents, s.eta)  # eta > 0: config-checked
    log_prob, old_log_prob = step_log_prob(next_latents, mean, std), traj.log_probs[rows, steps]
    ref_mean = None
    if t.kl_coef > 0:
        ref_pred = _reference_noise(unet, latents, timesteps, embeds, negative, guidance)
        ref_mean, _ = ddim_step_mean_std(scheduler, ref_pred, timesteps, latents, s.eta)
    per_step, total = [], None
    for k in range(k_steps):
        part = slice(k * b, (k + 1) * b)
        loss, stats = _DDPO_LOSSES[t.algorithm](log_prob[part], old_log_prob[part], weights[idx],
                                                t.clip_range, t.adv_clip_max)
        kl_ref = None
        if ref_mean is not None:
            kl_ref = gaussian_kl(mean[part], ref_mean[part], std[part]).mean()
            loss = loss + t.kl_coef * kl_ref
        per_step.append((loss, stats.approx_kl, stats.clipfrac, kl_ref))
        total = loss if total is None else total + loss
    return total, per_step


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


def _trainable_steps(scheduler, config) -> torch.Tensor:
    """(T,) bool: the steps the update trains on. DDPO skips deterministic steps (std 0: no log-probability)."""
    s = config.sample
    if config.train.algorithm not in _DDPO_LOSSES:
        return torch.ones(s.num_steps, dtype=torch.bool)
    trainable = (step_std(scheduler, scheduler.timesteps, s.eta) > 0).cpu()
    if not trainable.any():
        from ddpo.config import ConfigError

        raise ConfigError(f"sample.num_steps={s.num_steps}: every step of this scheduler is deterministic (its last "
                          "step reaches alpha=1, set_alpha_to_one), so DDPO has nothing to train; use more steps")
    return trainable


def policy_update(unet, scheduler, optimizer, accelerator, params: list, rollout: Rollout, weights: torch.Tensor,
                  config, epoch: int, progress: bool) -> dict[str, float | int | None]:
    """Run the inner epochs; `weights` (N,) are advantages (DDPO) or RWR weights. Returns mean loss statistics
    over the optimizer steps taken, and `nonfinite_steps`, the steps dropped by train.on_nonfinite=skip."""
    s, t = config.sample, config.train
    num_samples, num_steps = len(rollout.prompts), s.num_steps
    scheduler.set_timesteps(num_steps, device=weights.device)
    trainable = _trainable_steps(scheduler, config)
    steps_per_sample = max(1, int(int(trainable.sum()) * t.timestep_fraction))
    accumulation = t.gradient_accumulation_steps * steps_per_sample
    chunk = t.timesteps_per_call if t.algorithm in _DDPO_LOSSES else 1  # RWR: one call per step
    kept: dict[str, list[torch.Tensor]] = {"loss": [], "kl": [], "clipfrac": [], "kl_ref": []}
    step_stats: dict[str, list[torch.Tensor]] = {key: [] for key in kept}  # of the optimizer step being accumulated
    nonfinite, optimizer_steps, fp16_skipped, grad_norms = 0, 0, 0, []
    for inner in range(t.num_inner_epochs):
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(
            derive_seed(config.seed, epoch, inner, accelerator.process_index, "order")))
        # Each sample visits its steps in its own random order, seeded by its global index.
        step_orders = torch.stack([torch.randperm(num_steps, generator=torch.Generator().manual_seed(
            derive_seed(config.seed, epoch, inner, int(g), "steps"))) for g in rollout.global_index])
        step_orders = step_orders[trainable[step_orders]].reshape(num_samples, -1)  # same order, trainable steps
        micro_batches = order.split(t.batch_size)
        for k, idx in enumerate(tqdm(micro_batches, desc=f"epoch {epoch + 1} training", leave=False, disable=not progress)):
            last_of_step = (k + 1) % t.gradient_accumulation_steps == 0
            for j in range(0, steps_per_sample, chunk):
                end = min(j + chunk, steps_per_sample)
                sync = last_of_step and end == steps_per_sample
                with (contextlib.nullcontext() if sync else accelerator.no_sync(unet)), accelerator.autocast():
                    if t.algorithm in _DDPO_LOSSES:
                        loss, per_step = _ddpo_chunk_loss(unet, scheduler, rollout, idx, step_orders[idx, j:end],
                                                          weights, config)
                    else:
                        seeds = [derive_seed(config.seed, epoch, inner, int(g), j, "rwr")
                                 for g in rollout.global_index[idx]]
                        loss, *stats = _rwr_step_loss(unet, scheduler, rollout, idx, seeds, weights)
                        per_step = [(loss, *stats)]
                    accelerator.backward(loss / accumulation)
                for values in per_step:  # per timestep, as with one call per step: same means, same checks
                    for key, value in zip(("loss", "kl", "clipfrac", "kl_ref"), values):
                        if value is not None:
                            step_stats[key].append(value.detach())
            if last_of_step:
                optimizer_steps += 1
                grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                problem = _nonfinite(accelerator, step_stats["loss"], grad_norm)
                if problem and t.on_nonfinite == "error":
                    raise NonFiniteError(_diagnosis(problem, epoch, optimizer_steps, params, rollout, weights, config))
                if problem:
                    nonfinite += 1
                else:
                    optimizer.step()
                    # fp16: the GradScaler drops a step whose unscaled gradient overflowed (and halves its scale).
                    fp16_skipped += bool(getattr(optimizer, "step_was_skipped", False))
                    grad_norms.append(torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1)
                                      if grad_norm is not None else torch.full((1,), float("nan")))
                    for key in kept:
                        kept[key] += step_stats[key]
                optimizer.zero_grad(set_to_none=True)
                step_stats = {key: [] for key in kept}
    if nonfinite:
        logger.warning("epoch %d: skipped %d of %d optimizer steps whose loss or gradient was NaN/inf "
                       "(train.on_nonfinite=skip)", epoch + 1, nonfinite, optimizer_steps)
    ddpo = t.algorithm in _DDPO_LOSSES  # RWR has no importance ratio: None ("not applicable"), not NaN
    return {"loss": _mean(accelerator, kept["loss"]), "approx_kl": _mean(accelerator, kept["kl"]) if ddpo else None,
            "clipfrac": _mean(accelerator, kept["clipfrac"]) if ddpo else None,
            **({"kl_ref": _mean(accelerator, kept["kl_ref"])} if ddpo and t.kl_coef > 0 else {}),
            "nonfinite_steps": nonfinite, "optimizer_steps": optimizer_steps, "fp16_skipped_steps": fp16_skipped,
            "grad_norm": _finite_mean(grad_norms)}


def _finite_mean(values: list[torch.Tensor]) -> float | None:
    """Mean of the finite values (the gradient norm before clipping, unscaled under fp16; the same on every
    process, as DDP has averaged the gradients); None when there is none."""
    finite = [float(v) for v in values if bool(torch.isfinite(v).all())]
    return sum(finite) / len(finite) if finite else None


def grad_scaler_state(accelerator) -> dict | None:
    """The fp16 GradScaler's state (loss scale, growth tracker; plain numbers, JSON-able), None without fp16.

    accelerate's wrapped optimizer's `state_dict` leaves it out, so a checkpoint must carry it: a resumed run
    would otherwise restart the loss scale at 65536 and skip steps until it had backed off again."""
    scaler = getattr(accelerator, "scaler", None)
    return dict(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None


def load_grad_scaler_state(accelerator, state: dict | None) -> None:
    """Restore `grad_scaler_state`'s result; nothing to do without a saved state or without fp16 now."""
    scaler = getattr(accelerator, "scaler", None)
    if state and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(state)


def _nonfinite(accelerator, losses: list[torch.Tensor], grad_norm) -> str | None:
    """What is non-finite in this optimizer step ("loss", "gradient"), agreed by all processes; None if nothing.

    With fp16 the gradient scaler owns inf gradients (an overflow of the loss scale: it skips the step and lowers
    the scale), so only the loss is checked."""
    loss_bad = not bool(torch.isfinite(torch.stack(losses).float()).all())
    grad_bad = (accelerator.scaler is None and grad_norm is not None
                and not bool(torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32)).all()))
    flags = torch.tensor([float(loss_bad), float(grad_bad)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    if flags[0] > 0:
        return "loss"
    return "gradient" if flags[1] > 0 else None


def _diagnosis(problem: str, epoch: int, step: int, params: list, rollout: Rollout, weights: torch.Tensor,
               config) -> str:
    """One message: where training diverged, the likely cause from what is non-finite, and what to change."""
    t = config.train
    if t.algorithm in _DDPO_LOSSES and not bool(torch.isfinite(rollout.trajectories.log_probs).all()):
        cause = ("the log-probabilities recorded while sampling are NaN/inf: a denoising step of the scheduler has "
                 "std 0 or a NaN (check the scheduler config, e.g. its beta schedule)")
    elif not bool(torch.isfinite(weights).all()):
        cause = ("the advantages are NaN/inf: check the reward's scale (float32 statistics of rewards beyond about "
                 "1e19 overflow)")
    elif not all(bool(torch.isfinite(p.detach()).all()) for p in params):
        cause = (f"the weights are already NaN/inf, so an earlier step diverged: train.learning_rate="
                 f"{t.learning_rate:g} is likely too high (the default is 3e-4)")
    else:
        cause = (f"most likely train.learning_rate={t.learning_rate:g} is too high (the default is 3e-4; try 10x "
                 "lower), else a reward of extreme scale or a scheduler step with std near 0")
    return (f"epoch {epoch + 1}, optimizer step {step}: the {problem} is NaN or infinite, so the step was not applied "
            f"and no checkpoint of this epoch is written (earlier checkpoints are intact). Likely cause: {cause}. "
            "Or set train.on_nonfinite=skip to drop such steps (counted as nonfinite_steps in metrics.jsonl).")


def _mean(accelerator, values: list[torch.Tensor]) -> float:
    """The mean over all processes; NaN when no step was kept (every process keeps the same steps)."""
    if not values:
        return float("nan")
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
