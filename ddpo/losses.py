"""DDPO and RWR losses as pure functions of tensors (Black et al. 2023, sections 4.2-4.3).

| code name        | paper symbol                                            |
|------------------|---------------------------------------------------------|
| `log_prob`       | log p_theta(x_{t-1} | x_t, c) under the current policy  |
| `old_log_prob`   | log p_theta_old(x_{t-1} | x_t, c), recorded at sampling |
| `ratio`          | p_theta / p_theta_old, the importance weight           |
| `advantages`     | normalised reward r(x_0, c) (see ddpo/advantages.py)    |
| `clip_range`     | epsilon of the PPO clip (1e-4 for MEAN log-probs)       |
| `gaussian_kl`    | KL(p_theta || p_ref) of one step, the `kl_coef` penalty |

`log_prob` is the per-dimension MEAN log-density (ddpo/logprob.py); the default `clip_range` of 1e-4 is
tuned for that: with summed log-probs it would clip every sample.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ddpo.logprob import at_least_float32


class NonFiniteError(RuntimeError):
    """Training diverged: a loss, gradient, sampled latent or weight is NaN/inf. The message names the likely cause."""


class LossStats(NamedTuple):
    approx_kl: torch.Tensor  # 0.5 * E[(log_prob - old_log_prob)^2], a KL(old || new) estimate
    clipfrac: torch.Tensor  # fraction of samples whose ratio left [1 - clip_range, 1 + clip_range]


def ratio_stats(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> LossStats:
    log_ratio = (log_prob - old_log_prob).detach()
    return LossStats(approx_kl=0.5 * (log_ratio**2).mean(),
                     clipfrac=((log_ratio.exp() - 1).abs() > clip_range).float().mean())


def ddpo_is_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                 clip_range: float, adv_clip_max: float) -> tuple[torch.Tensor, LossStats]:
    """DDPO_IS: the clipped importance-sampling surrogate. All inputs (B,); returns a scalar to minimise."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio_stats(log_prob, old_log_prob, clip_range)


def ddpo_sf_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                 clip_range: float, adv_clip_max: float) -> tuple[torch.Tensor, LossStats]:
    """DDPO_SF (REINFORCE): -A * log p_theta. On-policy, so one inner epoch; the ratio is logged, not used."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (-advantages * log_prob).mean(), ratio_stats(log_prob, old_log_prob, clip_range)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per latent dimension, averaged like the log-probs.

    mean, ref_mean: (B, C, h, w); std: (B, 1, 1, 1), the same for both policies (it depends only on t and eta).
    Returns (B,): ||mean - ref_mean||^2 / (2 std^2) / (C h w). The penalty `train.kl_coef` multiplies it.
    A step with std 0 is deterministic, not a policy decision (ddpo/logprob.py): its KL term is 0, not 0/0.
    """
    std = at_least_float32(std)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))  # no NaN in the gradient of the masked branch
    per_dim = torch.where(stochastic, (at_least_float32(mean) - at_least_float32(ref_mean)) ** 2 / (2 * safe_std**2),
                          0.0)
    return per_dim.mean(dim=tuple(range(1, per_dim.ndim)))


def rwr_weights(advantages: torch.Tensor, temperature: float) -> torch.Tensor:
    """RWR: w = exp(A / beta), normalised to mean 1 over the batch (a softmax times B). (N,) -> (N,)."""
    return torch.softmax(advantages / temperature, dim=0) * advantages.numel()


def rwr_sparse_weights(advantages: torch.Tensor, quantile: float) -> torch.Tensor:
    """Sparse RWR: w = 1 for samples at or above the `quantile` of the batch, else 0. (N,) -> (N,)."""
    return (advantages >= torch.quantile(advantages, quantile)).float()


def rwr_loss(model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted denoising loss: the ELBO stands in for the log-likelihood (paper, section 4.1).

    model_output, target: (B, C, h, w); weights: (B,). Returns a scalar.
    """
    per_sample = ((model_output.float() - target.float()) ** 2).mean(dim=tuple(range(1, target.ndim)))
    return (weights * per_sample).mean()
