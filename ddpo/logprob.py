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
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _gather(values: torch.Tensor, index: torch.Tensor, fallback: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[index] where index >= 0, else fallback; shaped (B, 1, ..., 1) to broadcast over a latent of `ndim` dims."""
    gathered = torch.where(index >= 0, values[index.clamp(min=0)], fallback)
    return gathered.reshape(-1, *([1] * (ndim - 1)))


def ddim_step_mean_std(scheduler, model_output: torch.Tensor, timestep: int | torch.Tensor,
                       sample: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM posterior N(mu, std^2): mean (B, C, h, w) and std (B, 1, 1, 1), computed in float32."""
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps yet: call scheduler.set_timesteps(num_steps) first")
    cfg = scheduler.config
    sample, model_output = sample.float(), model_output.float()
    device, batch = sample.device, sample.shape[0]
    t = torch.as_tensor(timestep, device=device, dtype=torch.long).reshape(-1).expand(batch)
    t_prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float32)
    alpha_prod_t = _gather(alphas_cumprod, t, final, sample.ndim)
    alpha_prod_t_prev = _gather(alphas_cumprod, t_prev, final, sample.ndim)
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev

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

    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.clamp(min=0).sqrt()
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
    into prev_sample (an action already taken).
    """
    log_prob = (-((prev_sample.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
