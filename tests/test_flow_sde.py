"""The flow-matching SDE / CPS step and its log-probability (ddpo/flow_sde.py)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.flow_sde import flow_cps_mean_std, flow_sde_mean_std, flow_sde_sigma, flow_step_with_logprob

KINDS = {"sde": flow_sde_mean_std, "cps": flow_cps_mean_std}


def sd3_scheduler(steps: int = 10) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's scheduler config
    scheduler.set_timesteps(steps)
    return scheduler


def gaussian_mean_log_density(x, mean, std):
    """log N(x; mean, std^2) averaged over non-batch dims, written out by hand in float64."""
    x, mean, std = x.double(), mean.double(), std.double()
    per_dim = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per_dim.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_log_prob_is_the_mean_gaussian_log_density(kind):
    g = torch.Generator().manual_seed(0)
    sigmas = sd3_scheduler().sigmas.double()
    index = torch.tensor([0, 3, 5, 7])  # rows at different steps in one call; none is the last (std 0 for CPS)
    v, x, x_next = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mean, std = KINDS[kind](v, x, sigmas[index], sigmas[index + 1], 0.7, sigmas[1].item())
    _, log_prob = flow_step_with_logprob(v, x, sigmas[index], sigmas[index + 1], 0.7, sigmas[1].item(), kind=kind,
                                         prev_sample=x_next)
    assert log_prob.dtype == torch.float64 and log_prob.shape == (4,)
    torch.testing.assert_close(log_prob, gaussian_mean_log_density(x_next, mean, std), rtol=1e-12, atol=1e-12)


def test_sde_mean_and_std_match_flow_grpo_formulas_by_hand():
    """Hand-written Flow-GRPO step in float64, including the t = 1 row where sigma_max replaces t in 1 - t."""
    g = torch.Generator().manual_seed(1)
    v, x = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1.0, 0.6, 0.05], dtype=torch.float64)
    t_next = torch.tensor([0.9, 0.4, 0.0], dtype=torch.float64)
    a, sigma_max = 0.7, 0.9
    mean, std = flow_sde_mean_std(v, x, t, t_next, a, sigma_max)
    denominator = 1 - torch.tensor([sigma_max, 0.6, 0.05], dtype=torch.float64)
    sigma_t = a * (t / denominator).sqrt()
    dt = (t_next - t)[:, None]
    expected = x + (v + (sigma_t**2 / (2 * t))[:, None] * (x + (1 - t)[:, None] * v)) * dt
    torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, sigma_t[:, None] * dt.abs().sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow_sde_sigma(t, a, sigma_max), sigma_t, rtol=1e-12, atol=1e-12)
    at_one = flow_sde_sigma(1.0, a, sigma_max)
    assert torch.isfinite(at_one) and at_one.dtype == torch.float32


def test_cps_mean_and_std_by_hand():
    g = torch.Generator().manual_seed(2)
    v, x = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(2))
    t, t_next, a = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.0], dtype=torch.float64), 0.7
    mean, std = flow_cps_mean_std(v, x, t, t_next, a, 0.9)
    s = t_next[:, None] * math.sin(a * math.pi / 2)
    x0_hat, eps_hat = x - t[:, None] * v, x + (1 - t[:, None]) * v
    expected = (1 - t_next[:, None]) * x0_hat + (t_next[:, None] ** 2 - s**2).sqrt() * eps_hat
    torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, s, rtol=1e-12, atol=1e-12)
    assert std[1].item() == 0  # the last step (t_next = 0) lands on x0_hat: deterministic


def test_cps_preserves_the_forward_coefficients_given_the_true_x0_and_noise():
    """Flow-CPS's defining property: with the oracle velocity v = eps - x0, the step's output is exactly
    (1 - t_next) x0 + t_next * (unit-variance noise), i.e. q(x_{t_next} | x0). The SDE has no such property."""
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
    t, t_next, a = 0.7, 0.4, 0.6
    x_t = (1 - t) * x0 + t * eps
    mean, std = flow_cps_mean_std(eps - x0, x_t, t, t_next, a)
    noise_coefficient = (t_next**2 - std**2).sqrt()
    torch.testing.assert_close(mean, (1 - t_next) * x0 + noise_coefficient * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(noise_coefficient**2 + std**2, torch.full_like(std, t_next**2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("index", [0, 1, 4, 8, 9])
def test_noise_level_zero_is_the_diffusers_euler_step(kind, index):
    g = torch.Generator().manual_seed(index)
    scheduler = sd3_scheduler()  # fresh: its step index is found from the timestep
    v, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    expected = scheduler.step(v, scheduler.timesteps[index], x).prev_sample
    sigma, sigma_next = scheduler.sigmas[index].expand(2), scheduler.sigmas[index + 1].expand(2)
    mean, std = KINDS[kind](v, x, sigma, sigma_next, 0.0, scheduler.sigmas[1].item())
    assert mean.dtype == torch.float32 and std.shape == (2, 1, 1, 1)
    torch.testing.assert_close(mean, expected)
    assert torch.equal(std, torch.zeros_like(std))
    _, log_prob = flow_step_with_logprob(v, x, sigma, sigma_next, 0.0, scheduler.sigmas[1].item(), kind=kind)
    assert torch.equal(log_prob, torch.zeros(2))


def test_per_row_sigmas_equal_separate_calls():
    g = torch.Generator().manual_seed(4)
    sigmas = sd3_scheduler().sigmas
    v, x = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    index = torch.tensor([0, 2, 9])
    mean, std = flow_sde_mean_std(v, x, sigmas[index], sigmas[index + 1], 0.7, sigmas[1].item())
    for row, i in enumerate(index.tolist()):
        mean_i, std_i = flow_sde_mean_std(v[row:row + 1], x[row:row + 1], sigmas[i], sigmas[i + 1], 0.7, sigmas[1])
        torch.testing.assert_close(mean[row:row + 1], mean_i)
        torch.testing.assert_close(std[row:row + 1], std_i)
        assert std_i.shape == (1, 1, 1, 1)
    _, scalar_std = flow_cps_mean_std(v, x, 0.5, 0.25, 0.7, 0.9)  # scalar sigmas: std still (B, 1, ..., 1)
    assert scalar_std.shape == (3, 1, 1, 1)


def test_dtypes_and_bad_arguments():
    v, x = torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3, dtype=torch.bfloat16)
    mean, std = flow_sde_mean_std(v, x, torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.3]), 0.7, 0.9)
    assert mean.dtype == std.dtype == torch.float32
    prev, log_prob = flow_step_with_logprob(v, x, torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.3]), 0.7, 0.9)
    assert prev.dtype == log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_mean_std(v, x, 0.5, 0.3, -0.1, 0.9)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_mean_std(v, x, 1.0, 0.9, 0.7, 1.0)
    with pytest.raises(ValueError, match="one per row"):
        flow_sde_mean_std(v, x, torch.tensor([1.0, 0.5, 0.2]), 0.1, 0.7, 0.9)
    with pytest.raises(ValueError, match="kind"):
        flow_step_with_logprob(v, x, 0.5, 0.3, 0.7, 0.9, kind="ode")


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sampling_is_reproducible_and_a_given_action_is_scored_not_resampled(kind):
    sigmas = sd3_scheduler().sigmas
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    v = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6), requires_grad=True)
    args = (sigmas[2].expand(3), sigmas[3].expand(3), 0.7, sigmas[1].item())
    a, log_a = flow_step_with_logprob(v, x, *args, kind=kind, generator=torch.Generator().manual_seed(7))
    b, log_b = flow_step_with_logprob(v, x, *args, kind=kind, generator=torch.Generator().manual_seed(7))
    c, _ = flow_step_with_logprob(v, x, *args, kind=kind, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(log_a, log_b) and not torch.equal(a, c)

    # The noise convention: mean + std * randn_tensor(mean.shape, generator, device, dtype), as the DDIM step.
    from diffusers.utils.torch_utils import randn_tensor

    mean, std = KINDS[kind](v, x, *args)
    z = randn_tensor(mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    torch.testing.assert_close(a, mean.detach() + std * z)

    action = torch.randn(3, 4, 8, 8, requires_grad=True)
    scored, log_prob = flow_step_with_logprob(v, x, *args, kind=kind, prev_sample=action)
    assert torch.equal(scored, action.detach())
    torch.testing.assert_close(log_prob, gaussian_mean_log_density(action.detach(), mean, std).float())
    log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert action.grad is None and not a.requires_grad


def test_a_deterministic_step_has_log_prob_zero_and_no_gradient():
    """The last CPS step (t_next = 0) has std 0: log-prob 0 and zero gradient, not the 0/0 NaN."""
    v = torch.randn(2, 5, requires_grad=True)
    x = torch.randn(2, 5)
    prev, log_prob = flow_step_with_logprob(v, x, torch.tensor([0.3, 0.3]), torch.tensor([0.0, 0.0]), 0.7, 0.9,
                                            kind="cps", prev_sample=torch.randn(2, 5))
    assert torch.equal(log_prob, torch.zeros(2))
    log_prob.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


# ------------------------------------------------------------------ the toy problem with the exact velocity

MU, S = 1.5, 0.5  # data x_0 ~ N(MU, S^2) in 1-D


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x_0 | x_t = x] for x_0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1 - t) x_0 + t eps.

    x_t is Gaussian with mean (1 - t) MU and variance V_t = (1 - t)^2 S^2 + t^2, and Cov(eps - x_0, x_t) =
    t - (1 - t) S^2, so v(x, t) = -MU + (t - (1 - t) S^2) / V_t * (x - (1 - t) MU) (jointly Gaussian regression).
    """
    variance = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / variance * (x - (1 - t) * MU)


def exact_discrete_moments(kind: str, sigmas: torch.Tensor, a: float) -> tuple[float, float]:
    """Mean and std of the sampler's x_0 in exact arithmetic: with an affine velocity every step is
    x -> A x + c + std z, so N(m, var) -> N(A m + c, A^2 var + std^2), starting from N(0, 1)."""
    m, var = 0.0, 1.0
    probe = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(2)
        mean, std = KINDS[kind](exact_velocity(probe, t[:, None]), probe, t, sigmas[i + 1].expand(2), a,
                                sigmas[1].item())
        c, slope = mean[0, 0].item(), (mean[1, 0] - mean[0, 0]).item()
        m, var = slope * m + c, slope**2 * var + std[0, 0].item() ** 2
    return m, math.sqrt(var)


def sample_final(kind: str, sigmas: torch.Tensor, a: float, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(n)
        x, _ = flow_step_with_logprob(exact_velocity(x, t[:, None]), x, t, sigmas[i + 1].expand(n), a,
                                      sigmas[1].item(), kind=kind, generator=g)
    return x[:, 0]


N_TRAJ, STEPS = 20000, 100
SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)
# Sampling error of N_TRAJ draws from N(., S^2): SE(mean) = S / sqrt(N), SE(std) ~ S / sqrt(2N); allow 5 SE.
TOL_MEAN, TOL_STD = 5 * S / math.sqrt(N_TRAJ), 5 * S / math.sqrt(2 * N_TRAJ)
# Euler discretisation error of the std at 100 uniform steps, from exact_discrete_moments: ODE 0.0074, SDE 0.0004.
TOL_DISCRETE = 0.01


def test_ode_and_sde_recover_the_gaussian_data_distribution():
    ode = sample_final("sde", SIGMAS, 0.0, N_TRAJ, seed=10)
    sde = sample_final("sde", SIGMAS, 0.7, N_TRAJ, seed=11)
    for name, x, a in (("ode", ode, 0.0), ("sde", sde, 0.7)):
        exact_mean, exact_std = exact_discrete_moments("sde", SIGMAS.double(), a)
        assert abs(exact_mean - MU) < 1e-9 and abs(exact_std - S) < TOL_DISCRETE, (name, exact_mean, exact_std)
        assert abs(x.mean().item() - MU) < TOL_MEAN, (name, x.mean().item())
        assert abs(x.std().item() - exact_std) < TOL_STD, (name, x.std().item(), exact_std)
        assert abs(x.std().item() - S) < TOL_DISCRETE + TOL_STD, (name, x.std().item())
    # Same marginal: the two samplers agree with each other within the sampling error of a difference of two.
    assert abs(ode.mean().item() - sde.mean().item()) < math.sqrt(2) * TOL_MEAN
    assert abs(ode.std().item() - sde.std().item()) < math.sqrt(2) * TOL_STD + TOL_DISCRETE


def test_cps_keeps_the_mean_but_under_disperses_with_the_exact_velocity():
    """Flow-CPS re-noises the predicted x0 = E[x_0 | x_t], whose variance is below x_0's, with a fraction
    sin(a pi / 2) of fresh noise per step whatever the step size: unlike the SDE it does not converge to the data
    distribution as steps grow (at a = 0.7 the std tends to ~0.426, not 0.5, from exact_discrete_moments at 100 to
    5000 steps). The mean is exact. This pins that behaviour, and checks the sampler against the exact moments."""
    x = sample_final("cps", SIGMAS, 0.7, N_TRAJ, seed=12)
    exact_mean, exact_std = exact_discrete_moments("cps", SIGMAS.double(), 0.7)
    assert abs(exact_mean - MU) < 1e-9
    assert 0.40 < exact_std < 0.44
    assert abs(x.mean().item() - MU) < TOL_MEAN
    assert abs(x.std().item() - exact_std) < TOL_STD, (x.std().item(), exact_std)
    # At a = 0 CPS is the ODE, and the deficit grows with a.
    stds = [exact_discrete_moments("cps", SIGMAS.double(), a)[1] for a in (0.0, 0.3, 0.7)]
    assert abs(stds[0] - exact_discrete_moments("sde", SIGMAS.double(), 0.0)[1]) < 1e-9
    assert stds[0] > stds[1] > stds[2]
