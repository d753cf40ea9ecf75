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


# ---------------------------------------------------------------------------------------------- DiffusionNFT
#
# DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process") trains on the
# forward process: final samples x_0 are noised again at a random t and the model regresses the usual target there,
# with no log-probabilities and no sampling trajectories, so any sampler (ODE, high-order) can collect the data.
#
# | code name        | paper symbol                                                                   |
# |------------------|--------------------------------------------------------------------------------|
# | `prediction`     | v_theta(x_t, c, t), the trained model's output                                 |
# | `old_prediction` | v_old(x_t, c, t), the sampling policy's output (no gradient)                   |
# | `target`         | v, the regression target of the forward process (eps - x_0 for rectified flow) |
# | `r`              | r in [0, 1], the optimality probability of the sample                          |
# | `beta`           | beta, the strength of the implicit guidance (1.0 or 0.1 in the official configs) |
# | `positive`       | v+_theta = (1 - beta) v_old + beta v_theta, the implicit positive policy       |
# | `negative`       | v-_theta = (1 + beta) v_old - beta v_theta, the implicit negative policy       |


class NFTStats(NamedTuple):
    positive_loss: torch.Tensor  # batch mean of the per-sample positive term (as weighted in the loss)
    negative_loss: torch.Tensor  # batch mean of the per-sample negative term (as weighted in the loss)
    old_deviation: torch.Tensor  # mean (v_theta - v_old)^2: how far the trained policy moved from the sampling one


def nft_optimality(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    """The optimality probability r = 0.5 + 0.5 clamp(A / clip_max, -1, 1) in [0, 1], (N,) -> (N,).

    As the official DiffusionNFT code: the normalised advantage A (ddpo/advantages.py) is clipped to
    [-clip_max, clip_max] and mapped linearly onto [0, 1]; A = 0 gives r = 0.5, which leaves the sample out of the
    policy improvement (only the trust-region part of `nft_loss` acts on it)."""
    return 0.5 + 0.5 * (at_least_float32(advantages) / clip_max).clamp(-1.0, 1.0)


def _regression_error(error: torch.Tensor, adaptive_weight: bool, min_weight: float) -> torch.Tensor:
    """Per-sample mean of error^2 (B,), divided by the detached mean |error| per sample if adaptive_weight."""
    dims = tuple(range(1, error.ndim))
    squared = (error**2).mean(dim=dims)
    if not adaptive_weight:
        return squared
    return squared / error.detach().abs().mean(dim=dims).clamp(min=min_weight)


def nft_loss(prediction: torch.Tensor, old_prediction: torch.Tensor, target: torch.Tensor, r: torch.Tensor,
             beta: float, *, adaptive_weight: bool = False, x0_scale: torch.Tensor | float | None = None,
             min_weight: float = 1e-5) -> tuple[torch.Tensor, NFTStats]:
    """The DiffusionNFT policy loss: mean_b [r ||v+ - v||^2 + (1 - r) ||v- - v||^2].

    Samples with r = 1 pull the implicit positive policy v+ onto the target, samples with r = 0 pull the implicit
    negative policy v- onto it (which pushes v_theta the other way). Per sample, the minimiser (unweighted) is
    v_theta = v_old + (2r - 1) / beta * (v - v_old): r = 1 and beta = 1 regress the target, r = 0.5 keeps v_old
    (the loss is then ||v_old - v||^2 + beta^2 ||v_theta - v_old||^2, a pure trust region).

    Args:
        prediction: v_theta (B, ...), with gradient.
        old_prediction: v_old (B, ...), the sampling policy's output at the same (x_t, c, t); detached here.
        target: v (B, ...), the forward-process regression target in the same parametrisation; detached here.
        r: (B,) optimality probabilities in [0, 1] (`nft_optimality`).
        beta: the guidance strength beta > 0.
        adaptive_weight: the paper's adaptive loss weighting (its official code always uses it, with x0_scale = t):
            each per-sample term is divided by its own detached mean absolute error, ||e||^2 / sg(mean |e|)
            (clamped below by `min_weight`), in place of a hand-tuned weighting over t.
        x0_scale: None (errors in the prediction's own space) or c, a scalar or (B,), with x0_hat - x_0 =
            -c (prediction - target): the errors are then measured in x_0 space, e = c (v+- - v). Rectified flow
            (velocity): c = t; epsilon prediction: c = sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t); DDPM
            v-prediction: c = sqrt(1 - alpha_bar_t).
        min_weight: the floor of the adaptive weight (1e-5 as in the official code).

    The loss is linear in the parametrisation: it only combines predictions linearly and regresses them on the
    matching target, so it serves velocity (flow models) and epsilon (UNets) alike; only x0_scale depends on it.

    Returns:
        A scalar to minimise and `NFTStats`. The official code additionally multiplies the loss by
        adv_clip_max / beta (5 / beta there), a constant factor: multiply the result for the same gradient scale
        (it matters for gradient clipping and the relative weight of a KL term, hardly for Adam).
    """
    if beta <= 0:
        raise ValueError(f"beta={beta}: the DiffusionNFT guidance strength must be > 0")
    prediction = at_least_float32(prediction)
    old_prediction = at_least_float32(old_prediction.detach()).to(prediction.dtype)
    target = at_least_float32(target.detach()).to(prediction.dtype)
    r = at_least_float32(r.detach()).to(prediction.dtype)
    positive = (1 - beta) * old_prediction + beta * prediction
    negative = (1 + beta) * old_prediction - beta * prediction
    scale = 1.0
    if x0_scale is not None:
        scale = torch.as_tensor(x0_scale, dtype=prediction.dtype, device=prediction.device)
        scale = scale.reshape(-1, *([1] * (prediction.ndim - 1))) if scale.ndim else scale
    positive_loss = _regression_error(scale * (positive - target), adaptive_weight, min_weight)
    negative_loss = _regression_error(scale * (negative - target), adaptive_weight, min_weight)
    loss = (r * positive_loss + (1 - r) * negative_loss).mean()
    return loss, NFTStats(positive_loss=positive_loss.detach().mean(), negative_loss=negative_loss.detach().mean(),
                          old_deviation=((prediction.detach() - old_prediction) ** 2).mean())
