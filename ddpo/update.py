"""The policy update of one epoch: inner epochs over this process's samples, one backward per chunk of timesteps.

The per-algorithm losses are in ddpo/objectives.py: DDPO (ddpo_is, ddpo_sf, grpo) recomputes each sampled step's
log-probability; RWR (rwr, rwr_sparse) and DiffusionNFT (nft) train on the final samples, noised at random times.
Gradients accumulate over `timestep_fraction * T` timesteps and `gradient_accumulation_steps`
micro-batches before each optimizer step; DDP synchronises them only on the last backward of a step.
DDPO sends `train.timesteps_per_call` steps of each sample of a micro-batch through the denoiser in one call
(per-row timesteps) with one backward of their summed loss: the same gradient as one backward per step (up to float
rounding), fewer and larger calls, and K times the activation memory. 1 is one call per step, bit for bit the
per-step update. `auto` (the default) takes as many as fit `train.activation_memory_gib`: the first update measures
the bytes one step of a micro-batch saves for backward (ddpo/memory.py: two forward passes, no backward, no
gradient, no draw from training's random streams), and every process uses the smallest choice of all; the number
used is `timesteps_per_call` in the epoch's metrics. RWR and NFT train one random time per sample: one per call.

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

from ddpo.losses import NonFiniteError, rwr_sparse_weights, rwr_weights
from ddpo.memory import resolve_timesteps_per_call
from ddpo.objectives import DDPO_LOSSES, ddpo_chunk_loss, forward_noising_loss
from ddpo.rollout import Rollout, derive_seed

logger = logging.getLogger("ddpo")


def _trainable_steps(family, rollout: Rollout, config) -> torch.Tensor:
    """(T,) bool: the steps the update trains on. DDPO skips deterministic steps: std 0 (no log-probability) or
    sampled outside the SDE window (log-prob NaN)."""
    s = config.sample
    if config.train.algorithm not in DDPO_LOSSES:
        return torch.ones(s.num_steps, dtype=torch.bool)
    sampled = torch.isfinite(rollout.trajectories.log_probs).all(dim=0).cpu()
    trainable = (family.step_stds(s.eta) > 0).cpu() & sampled
    if not trainable.any():
        from ddpo.config import ConfigError

        raise ConfigError(f"sample.num_steps={s.num_steps}: every step of this scheduler is deterministic (its last "
                          "step reaches alpha=1, set_alpha_to_one), so DDPO has nothing to train; use more steps")
    return trainable


def policy_update(unet, family, optimizer, accelerator, params: list, rollout: Rollout, weights: torch.Tensor,
                  config, epoch: int, progress: bool) -> dict[str, float | int | None]:
    """Run the inner epochs; `weights` (N,) are advantages (DDPO) or RWR weights. Returns mean loss statistics
    over the optimizer steps taken, and `nonfinite_steps`, the steps dropped by train.on_nonfinite=skip."""
    s, t = config.sample, config.train
    num_samples, num_steps = len(rollout.prompts), s.num_steps
    family.set_steps(num_steps, weights.device)
    trainable = _trainable_steps(family, rollout, config)
    # DiffusionNFT's "old" policy is the one that sampled: the weights at the start of the epoch, needed once an
    # optimizer step has changed them (with one step per epoch the current prediction, detached, is the old one).
    from ddpo.validation import optimizer_steps_per_epoch

    several = optimizer_steps_per_epoch(config) > 1
    start_params = [p.detach().clone() for p in params] if t.algorithm == "nft" and several else None
    steps_per_sample = max(1, int(int(trainable.sum()) * t.timestep_fraction))
    accumulation = t.gradient_accumulation_steps * steps_per_sample
    chunk = _timesteps_per_call(unet, family, optimizer, accelerator, params, rollout, weights, config, trainable,
                                steps_per_sample)
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
                    if t.algorithm in DDPO_LOSSES:
                        loss, per_step = ddpo_chunk_loss(unet, family, rollout, idx, step_orders[idx, j:end],
                                                         weights, config)
                    else:
                        seeds = [derive_seed(config.seed, epoch, inner, int(g), j, "rwr")
                                 for g in rollout.global_index[idx]]
                        old = start_params if optimizer_steps > 0 else None
                        loss, *stats = forward_noising_loss(unet, family, rollout, idx, seeds, weights, config,
                                                            old, params)
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
    ddpo = t.algorithm in DDPO_LOSSES  # RWR has no importance ratio: None ("not applicable"), not NaN
    return {"loss": _mean(accelerator, kept["loss"]), "approx_kl": _mean(accelerator, kept["kl"]) if ddpo else None,
            "clipfrac": _mean(accelerator, kept["clipfrac"]) if ddpo else None,
            **({"kl_ref": _mean(accelerator, kept["kl_ref"])} if ddpo and t.kl_coef > 0 else {}),
            "nonfinite_steps": nonfinite, "optimizer_steps": optimizer_steps, "fp16_skipped_steps": fp16_skipped,
            "grad_norm": _finite_mean(grad_norms), "timesteps_per_call": chunk}


def _timesteps_per_call(unet, family, optimizer, accelerator, params: list, rollout: Rollout, weights: torch.Tensor,
                        config, trainable: torch.Tensor, steps_per_sample: int) -> int:
    """Trained timesteps per denoiser call: 1 for RWR and NFT (one random time per sample), the configured number
    for DDPO, or with `auto` the most whose activations fit the budget (ddpo/memory.py; measured once, cached)."""
    t = config.train
    if t.algorithm not in DDPO_LOSSES:
        return 1
    if t.timesteps_per_call != "auto":
        return min(t.timesteps_per_call, steps_per_sample)
    model = getattr(unet, "module", unet)  # the bare model: a forward without backward must not arm DDP's reducer
    steps = trainable.nonzero().flatten()  # which steps does not matter for memory: the first trainable ones
    idx = torch.arange(min(t.batch_size, len(rollout.prompts)))

    def chunk_loss(k: int):  # (b,) samples at k steps each: the training call's shapes, dtypes and autocast
        with accelerator.autocast():
            return ddpo_chunk_loss(model, family, rollout, idx, steps[:k].expand(len(idx), k), weights, config)

    latent_shape = tuple(rollout.trajectories.latents.shape[2:])
    key = (len(idx), steps_per_sample, latent_shape, t.algorithm, t.cfg, t.kl_coef > 0, t.activation_memory_gib,
           config.model.mixed_precision, config.model.gradient_checkpointing)
    has_state = any(len(state) > 0 for state in optimizer.state.values()) if hasattr(optimizer, "state") else False
    return resolve_timesteps_per_call(model, key, steps_per_sample, chunk_loss, accelerator, params, has_state,
                                      t.activation_memory_gib)


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
    log_probs = rollout.trajectories.log_probs  # NaN marks a step outside the SDE window: only inf is broken there
    broken = torch.isinf(log_probs) if config.sample.sde_window else ~torch.isfinite(log_probs)
    if t.algorithm in DDPO_LOSSES and bool(broken.any()):
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
