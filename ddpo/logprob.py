"""The DDIM step as a Gaussian policy, with the log-density of the step it takes.

In DDPO each denoising step is one MDP step: the state is (x_t, t, prompt), the action is x_{t-1}, and the
policy is the DDIM posterior pi(x_{t-1} | x_t) = N(mu_t, sigma_t^2 I) with eta > 0 (Song et al. 2021, eqs. 12, 16).

| code name              | paper symbol                                   |
|------------------------|------------------------------------------------|
| `sample`               | x_t                                            |
| `prev_sample`          | x_{t-1} (the action)                           |
| `alpha_prod_t`         | alpha_t (cumulative product, "alpha bar")      |
| `alpha_prod_t_prev`    | alpha_{t-1}                                    |
| `pred_original_sample` | f_theta(x_t, t), the predicted x_0             |
| `pred_epsilon`         | epsilon_theta(x_t, t)                          |
| `std_dev_t`            | sigma_t(eta) = eta * sqrt(variance(t, t_prev)) |
| `prev_sample_mean`     | mu_t, the posterior mean                       |

A step whose previous cumulative alpha is 1 has sigma_t = 0 for any eta: with `set_alpha_to_one=True` (the default
of the Euler, DPM-Solver and PNDM configs that `DDIMScheduler.from_config` converts) the final step jumps to
alpha_{t-1} = final_alpha_cumprod = 1, where the DDIM posterior q(x_{t-1} | x_t, x_0) is the point mass at the
predicted x_0 (variance (1 - alpha_{t-1}) / (1 - alpha_t) * (1 - alpha_t / alpha_{t-1}) = 0). Such a step is a
deterministic function of the state, not a decision of the policy: it has no density, and no log-probability
belongs in the policy gradient for it. So `step_log_prob` gives it log-prob 0 (a ratio of exactly 1) instead of
the 0/0 = NaN of the Gaussian formula, and the update (ddpo/update.py) does not train on it. Flooring sigma
instead would be wrong: x_{t-1} was taken with sigma = 0, so under a floor eps any change of the mean would score
-(delta mu)^2 / (2 eps^2), a gradient as large as 1/eps^2.
"""

from __future__ import annotations

import math

import torch

from ddpo.transfer import to_device

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is (half precision is too coarse for log-densities; float64 checks exactness)."""
    return x if x.dtype == torch.float64 else x.float()


def _gather(values: torch.Tensor, index: torch.Tensor, fallback: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[index] where index >= 0, else fallback; shaped (B, 1, ..., 1) to broadcast over a latent of `ndim` dims."""
    gathered = torch.where(index >= 0, values[index.clamp(min=0)], fallback)
    return gathered.reshape(-1, *([1] * (ndim - 1)))


def _alpha_prods(scheduler, timestep: int | torch.Tensor, batch: int, ndim: int, device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t and alpha_{t-1} (cumulative), each (B, 1, ..., 1) float32; alpha_{t-1} of the last step is
    `final_alpha_cumprod` (1 with set_alpha_to_one)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps yet: call scheduler.set_timesteps(num_steps) first")
    t = to_device(torch.as_tensor(timestep, dtype=torch.long), device).reshape(-1).expand(batch)
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = to_device(scheduler.alphas_cumprod, device).to(torch.float32)  # diffusers keeps it on the CPU
    final = to_device(torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32), device)
    return _gather(alphas_cumprod, t, final, ndim), _gather(alphas_cumprod, t_prev, final, ndim)


def _std(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) (Song et al. 2021, eq. 16); exactly 0 where alpha_{t-1} = 1 (a deterministic step)."""
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    return eta * variance.clamp(min=0).sqrt()


def step_std(scheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t (T,) float32 of each step of `timesteps` (T,); 0 marks a deterministic step (no log-probability)."""
    timesteps = torch.as_tensor(timesteps)
    alpha_prod_t, alpha_prod_t_prev = _alpha_prods(scheduler, timesteps, len(timesteps), 1, timesteps.device)
    return _std(alpha_prod_t, alpha_prod_t_prev, eta)


def ddim_step_mean_std(scheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                       sample: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM posterior N(mu, std^2): mean (B, C, h, w) and std (B, 1, 1, 1), computed in float32 (or float64).

    std is 0 at a deterministic step (see the module docstring)."""
    cfg = scheduler.config
    sample, model_output = at_least_float32(sample), at_least_float32(model_output)
    alpha_prod_t, alpha_prod_t_prev = _alpha_prods(scheduler, timestep, sample.shape[0], sample.ndim, sample.device)
    beta_prod_t = 1 - alpha_prod_t

    if cfg.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        pred_epsilon = model_output
    elif cfg.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    elif cfg.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        pred_epsilon = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    else:
        raise ValueError(f"scheduler prediction_type {cfg.prediction_type!r} is not one of epsilon, sample, v_prediction")

    if cfg.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif cfg.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

    std_dev_t = _std(alpha_prod_t, alpha_prod_t_prev, eta)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction
    return prev_sample_mean, std_dev_t


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                           eta: float = 1.0, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | list[torch.Generator] | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step and the log-density of the step.

    Args:
        scheduler: a diffusers `DDIMScheduler` on which `set_timesteps` has been called.
        model_output: the UNet output (B, C, h, w), in the scheduler's prediction type (epsilon, v, sample).
        timestep: t, an int or a (B,) tensor of ints.
        sample: x_t, (B, C, h, w).
        eta: DDIM stochasticity; must be > 0, since a deterministic step has no density.
        prev_sample: x_{t-1} to score, (B, C, h, w); if None one is sampled from the policy.
        generator: for sampling `prev_sample` (one generator, or one per batch element).

    Returns:
        prev_sample (B, C, h, w) float32 and log_prob (B,) float32: the Gaussian log-density of `prev_sample`
        **averaged** over the non-batch dimensions. The mean, not the sum: a sum over 4x64x64 latent dims makes
        log-ratios thousands of times larger, so the PPO clip range (1e-4 by default, `train.clip_range`) would be
        meaningless and the importance ratios exp(sum) overflow and diverge. The tiny default clip range is tuned
        for this mean.

    For the same noise z it agrees with `DDIMScheduler.step(model_output, t, sample, eta, variance_noise=z)`.
    """
    if eta <= 0:
        raise ValueError(f"eta={eta}: a deterministic DDIM step (eta = 0) has no log-probability; use eta > 0")
    prev_sample_mean, std_dev_t = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(prev_sample_mean.shape, generator=generator, device=prev_sample_mean.device,
                             dtype=prev_sample_mean.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    prev_sample = prev_sample.float()
    return prev_sample, step_log_prob(prev_sample, prev_sample_mean, std_dev_t)


def step_log_prob(prev_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(prev_sample; mean, std^2) (B,), the MEAN over non-batch dimensions (see ddim_step_with_logprob).

    prev_sample, mean: (B, C, h, w); std: (B, 1, 1, 1), as ddim_step_mean_std returns them. No gradient flows
    into prev_sample (an action already taken). Where std is 0 (a deterministic step) the result is 0 with zero
    gradient: such a step has no density (see the module docstring).
    """
    stochastic = std > 0
    # Evaluate the Gaussian with std 1 where std is 0 and mask it after: torch.where alone would still carry the
    # NaN of 0/0 into the gradient.
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    action = at_least_float32(prev_sample.detach())
    log_prob = -((action - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
