"""ddim_step_with_logprob against diffusers' DDIMScheduler.step and a hand-written Gaussian."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo.logprob import ddim_step_with_logprob


def make_scheduler(prediction_type="epsilon", steps=10, clip_sample=False):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=clip_sample,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_agrees_with_diffusers_step_for_the_same_noise(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    torch.manual_seed(0)
    for t in scheduler.timesteps:
        x, out, z = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        expected = scheduler.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        prev_int, lp_int = ddim_step_with_logprob(scheduler, out, int(t), x, eta=eta, prev_sample=expected)
        prev_vec, lp_vec = ddim_step_with_logprob(scheduler, out, torch.full((3,), int(t)), x, eta=eta,
                                                  prev_sample=expected)
        torch.testing.assert_close(prev_int, expected)
        torch.testing.assert_close(lp_int, lp_vec, rtol=0, atol=0)
        # The density of diffusers' own step: N(mean, std^2) with mean = expected - std * z.
        prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        std = eta * scheduler._get_variance(int(t), prev_t).sqrt()
        hand = torch.distributions.Normal(expected - std * z, std).log_prob(expected).mean(dim=(1, 2, 3))
        torch.testing.assert_close(lp_int, hand, rtol=1e-5, atol=1e-5)


def test_sampling_uses_the_generator_and_the_posterior_mean():
    scheduler = make_scheduler()
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[3]
    a, lp_a = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    b, lp_b = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    c, _ = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample)
    # A sample from the policy has log-density about E[log N(z; 0, 1)] - log std per dimension.
    assert lp_a.shape == (2,)
    assert torch.isfinite(lp_a).all()


def test_log_prob_is_a_mean_over_dimensions_not_a_sum():
    scheduler = make_scheduler()
    t = scheduler.timesteps[0]
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    small = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))[1]
    big_x, big_out = x.repeat(1, 1, 2, 2), out.repeat(1, 1, 2, 2)
    big = ddim_step_with_logprob(scheduler, big_out, t, big_x, eta=1.0, generator=torch.Generator().manual_seed(0))[1]
    # 4x the dimensions: a sum would be ~4x larger; the mean stays on the same scale.
    assert abs(big.item() - small.item()) < 0.5
    per_dim_entropy_bound = 10.0
    assert abs(small.item()) < per_dim_entropy_bound


def test_eta_zero_is_refused():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 4, 8, 8), eta=0.0)


def test_requires_set_timesteps():
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 4, 8, 8))


def test_gradient_flows_to_model_output_only():
    scheduler = make_scheduler()
    out = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, lp = ddim_step_with_logprob(scheduler, out, scheduler.timesteps[2], torch.randn(2, 4, 8, 8), prev_sample=prev)
    lp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert prev.grad is None
    assert math.isfinite(lp.sum().item())


def test_set_alpha_to_one_makes_the_last_step_deterministic_with_log_prob_zero():
    """With set_alpha_to_one the final step's alpha_prev is 1: std 0 for any eta, the step lands on the predicted
    x_0 (as diffusers' step does), and its log-prob is 0 with a zero, finite gradient instead of 0/0 = NaN."""
    from ddpo.logprob import step_std

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1)
    scheduler.set_timesteps(4)
    std = step_std(scheduler, scheduler.timesteps, eta=1.0)
    assert std[-1] == 0 and (std[:-1] > 0).all()
    x, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = scheduler.timesteps[-1]
    prev, lp = ddim_step_with_logprob(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prev, scheduler.step(out.detach(), t, x, eta=1.0, variance_noise=z).prev_sample)
    assert lp.tolist() == [0.0, 0.0]
    lp.sum().backward()
    assert torch.equal(out.grad, torch.zeros_like(out))
    # The other steps are unchanged: still the Gaussian density of diffusers' step.
    t = scheduler.timesteps[1]
    expected = scheduler.step(out.detach(), t, x, eta=1.0, variance_noise=z).prev_sample
    _, lp = ddim_step_with_logprob(scheduler, out.detach(), t, x, eta=1.0, prev_sample=expected)
    hand = torch.distributions.Normal(expected - std[1] * z, std[1]).log_prob(expected).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, hand, rtol=1e-5, atol=1e-5)
