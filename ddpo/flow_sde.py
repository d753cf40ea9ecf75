"""The flow-matching sampling step as a Gaussian policy, with the log-density of the step it takes.

Flow models (SD3, FLUX) use rectified flow: x_t = (1 - t) x_0 + t eps, t runs from 1 (noise) to 0 (data), and the
model predicts the velocity v = eps - x_0. The Euler step of the ODE is x_{t+dt} = x_t + v dt, dt = t_next - t < 0.
Flow-GRPO (Liu et al. 2025) turns it into an SDE with the same marginals, whose Euler-Maruyama step is a Gaussian
policy pi(x_{t+dt} | x_t) = N(mean, std^2 I):

  x_{t+dt} = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t sqrt(|dt|) eps,  sigma_t = a sqrt(t / (1 - t)).

Coefficients-preserving sampling (Flow-CPS, Wang & Yu 2025) instead re-noises the predicted x_0 so that, were the
predictions exact, x_{t+dt} would have exactly the forward process's coefficients (1 - t_next) on x_0 and t_next on
unit noise: x_{t+dt} = (1 - t_next) x0_hat + sqrt(t_next^2 - std^2) eps_hat + std eps, std = t_next sin(a pi / 2).
Its fresh-noise fraction does not shrink with the step size, and x0_hat = E[x_0 | x_t] has less variance than x_0:
with the exact velocity of Gaussian data it keeps the mean but under-disperses, and more steps do not cure it (std
about 0.42 for 0.5 at a = 0.7; tests/test_flow_sde.py). The SDE converges to the data distribution as steps grow.

| code name      | paper symbol                                                                     |
|----------------|----------------------------------------------------------------------------------|
| `sample`       | x_t, the state                                                                   |
| `prev_sample`  | x_{t+dt}, the action (named as in ddpo/logprob.py: the next, less noisy latent)  |
| `model_output` | v_theta(x_t, t), the predicted velocity eps - x_0                                |
| `sigma`        | t, diffusers' `FlowMatchEulerDiscreteScheduler.sigmas[i]` (1 = pure noise)       |
| `sigma_next`   | t + dt, `sigmas[i + 1]` (0 after the last step)                                  |
| `noise_level`  | a (Flow-GRPO's noise level, 0.7 there; Flow-CPS's eta)                           |
| `sigma_max`    | the schedule's second sigma `sigmas[1]`: stands in for t in 1 - t at t = 1       |
| `std_t`        | sigma_t = a sqrt(t / (1 - t)) of the SDE (`flow_sde_sigma`)                      |
| `std`          | the policy's std: sigma_t sqrt(|dt|) (SDE), t_next sin(a pi / 2) (CPS)           |
| `x0_hat`       | x_t - t v, the predicted x_0                                                     |
| `eps_hat`      | x_t + (1 - t) v, the predicted noise                                             |

At t = 1 sigma_t = a sqrt(1 / 0) is infinite. Flow-GRPO's code uses t = `sigma_max` (the schedule's second sigma,
the largest t < 1) in the denominator 1 - t there, and so do we: sigma_t(1) = a sqrt(1 / (1 - sigma_max)). Since
sigma_t^2 / (2t) = a^2 / (2 (1 - t)), the drift is computed in that form, which is finite also at t = 0.

With a = 0 both variants are the Euler ODE step with std exactly 0; a step with std 0 (every step at a = 0, and the
last CPS step, where t_next = 0) is deterministic and gets log-probability 0 (see ddpo/logprob.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ddpo.logprob import at_least_float32, step_log_prob

Sigma = float | torch.Tensor


def _as_column(value: Sigma, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, ..., 1) tensor in the dtype and device of `like` (B, ...)."""
    column = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    if column.numel() not in (1, like.shape[0]):
        raise ValueError(f"sigma has {column.numel()} values for a batch of {like.shape[0]}: pass one per row or one")
    return column.expand(like.shape[0]).reshape(-1, *([1] * (like.ndim - 1)))


def _inputs(model_output: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float):
    if noise_level < 0:
        raise ValueError(f"noise_level={noise_level}: the SDE noise level must be >= 0 (0: the deterministic ODE)")
    model_output, sample = at_least_float32(model_output), at_least_float32(sample)
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    model_output, sample = model_output.to(dtype), sample.to(dtype)
    return model_output, sample, _as_column(sigma, sample), _as_column(sigma_next, sample)


def _one_minus_t(sigma: torch.Tensor, sigma_max: Sigma) -> torch.Tensor:
    """1 - t, with t = sigma_max where t = 1 (Flow-GRPO's stand-in for the infinite sigma_t at t = 1)."""
    if not isinstance(sigma_max, torch.Tensor) and not 0 <= sigma_max < 1:
        raise ValueError(f"sigma_max={sigma_max}: pass the schedule's second sigma, sigmas[1], which is < 1")
    return 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device), sigma)


def flow_sde_sigma(sigma: Sigma, noise_level: float, sigma_max: Sigma) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient sigma_t = a sqrt(t / (1 - t)), t = sigma_max in 1 - t at t = 1.

    sigma: t, a float or a tensor of any shape; returns a tensor of that shape (float32 unless sigma is float64)."""
    sigma = at_least_float32(torch.as_tensor(sigma))
    return noise_level * (sigma / _one_minus_t(sigma, sigma_max)).sqrt()


def flow_sde_mean_std(model_output: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                      noise_level: float, sigma_max: Sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step as N(mean, std^2): mean (B, ...) and std (B, 1, ..., 1).

    Args:
        model_output: v_theta(x_t, t) (B, ...), the predicted velocity eps - x_0.
        sample: x_t (B, ...).
        sigma, sigma_next: t and t + dt, (B,) tensors (one per row: rows may be at different steps), or scalars;
            the scheduler's `sigmas[i]` and `sigmas[i + 1]`, in [0, 1].
        noise_level: a >= 0; 0 gives the Euler ODE step with std exactly 0.
        sigma_max: the schedule's second sigma `sigmas[1]`, used for t in 1 - t at t = 1 (module docstring).

    Returns:
        mean = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt and std = sigma_t sqrt(|dt|), computed in float32
        (float64 if an input is float64).
    """
    model_output, sample, t, t_next = _inputs(model_output, sample, sigma, sigma_next, noise_level)
    dt = t_next - t
    one_minus_t = _one_minus_t(t, sigma_max)
    std_t = noise_level * (t / one_minus_t).sqrt()
    drift_correction = noise_level**2 / (2 * one_minus_t)  # sigma_t^2 / (2t), finite at t = 0
    mean = sample + (model_output + drift_correction * (sample + (1 - t) * model_output)) * dt
    return mean, std_t * dt.abs().sqrt()


def flow_cps_mean_std(model_output: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                      noise_level: float, sigma_max: Sigma | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients-preserving step (Flow-CPS, Wang & Yu 2025) as N(mean, std^2): (B, ...), (B, 1, ..., 1).

    Arguments as `flow_sde_mean_std` (`sigma_max` is accepted for the same signature and unused; noise_level is
    the paper's eta in [0, 1]): std = t_next sin(a pi / 2), mean = (1 - t_next) x0_hat + sqrt(t_next^2 - std^2)
    eps_hat with x0_hat = x_t - t v and eps_hat = x_t + (1 - t) v. The last step (t_next = 0) has std 0.
    """
    model_output, sample, t, t_next = _inputs(model_output, sample, sigma, sigma_next, noise_level)
    std = t_next * math.sin(noise_level * math.pi / 2)
    x0_hat = sample - t * model_output
    eps_hat = sample + (1 - t) * model_output
    mean = (1 - t_next) * x0_hat + (t_next**2 - std**2).clamp(min=0).sqrt() * eps_hat
    return mean, std


_KINDS = {"sde": flow_sde_mean_std, "cps": flow_cps_mean_std}


def flow_step_with_logprob(model_output: torch.Tensor, sample: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                           noise_level: float, sigma_max: Sigma, *, kind: Literal["sde", "cps"] = "sde",
                           prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | list[torch.Generator] | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic flow-matching step and the log-density of the step.

    Args:
        model_output, sample, sigma, sigma_next, noise_level, sigma_max: as `flow_sde_mean_std`.
        kind: "sde" (Flow-GRPO, `flow_sde_mean_std`) or "cps" (Flow-CPS, `flow_cps_mean_std`).
        prev_sample: x_{t+dt} (B, ...) to score; if None one is sampled as mean + std z with
            z = randn_tensor(mean.shape, generator, device, dtype), the noise convention of `ddim_step_with_logprob`.
        generator: for sampling `prev_sample` (one generator, or one per batch element).

    Returns:
        prev_sample (B, ...) and log_prob (B,), float32 (float64 for float64 inputs): the Gaussian log-density of
        `prev_sample` **averaged** over the non-batch dimensions (`ddpo.logprob.step_log_prob`), the convention of
        `ddpo.logprob.ddim_step_with_logprob`, to which the PPO clip range `train.clip_range` (1e-4) is tuned: a
        sum would make log-ratios thousands of times larger. No gradient flows into prev_sample. A step with std 0
        is deterministic and gets log-prob 0. (Flow-GRPO's code also averages; Flow-CPS's keeps only
        -(x - mean)^2, which is not a density: here both use the full Gaussian.)
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(_KINDS)}")
    mean, std = _KINDS[kind](model_output, sample, sigma, sigma_next, noise_level, sigma_max)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean.detach() + std * noise
    prev_sample = at_least_float32(prev_sample.detach())
    return prev_sample, step_log_prob(prev_sample, mean, std)
