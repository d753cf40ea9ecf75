"""DDPO and RWR losses at their boundaries."""

import pytest
import torch

from ddpo.losses import ddpo_is_loss, ddpo_sf_loss, gaussian_kl, rwr_loss, rwr_sparse_weights, rwr_weights


def grad_of(loss_fn, log_prob, old, adv, clip=0.1, adv_max=5.0):
    lp = torch.tensor(log_prob, requires_grad=True)
    loss, stats = loss_fn(lp, torch.tensor(old), torch.tensor(adv), clip, adv_max)
    loss.backward()
    return loss, stats, lp.grad


def test_ratio_one_gives_minus_mean_advantage_and_zero_kl():
    loss, stats, grad = grad_of(ddpo_is_loss, [0.3, -0.2], [0.3, -0.2], [1.0, -2.0])
    assert loss.item() == pytest.approx(0.5)  # -mean(adv * 1)
    assert stats.approx_kl.item() == 0.0 and stats.clipfrac.item() == 0.0
    torch.testing.assert_close(grad, torch.tensor([-0.5, 1.0]))  # d/dlp of -adv * exp(lp - old) / B


@pytest.mark.parametrize("delta,adv,clipped", [
    (0.2, 1.0, True),     # ratio above 1 + eps with A > 0: no more incentive, zero gradient
    (-0.2, 1.0, False),   # ratio below 1 - eps with A > 0: unclipped term is the max, gradient flows
    (-0.2, -1.0, True),   # ratio below 1 - eps with A < 0: clipped
    (0.2, -1.0, False),   # ratio above 1 + eps with A < 0: gradient flows (pessimistic bound)
    (0.05, 1.0, False),   # inside the clip range: gradient flows
])
def test_clipping_boundaries(delta, adv, clipped):
    loss, stats, grad = grad_of(ddpo_is_loss, [delta], [0.0], [adv], clip=0.1)
    ratio = torch.exp(torch.tensor(delta))
    if clipped:
        assert grad.item() == 0.0
        assert loss.item() == pytest.approx(-adv * float(ratio.clamp(0.9, 1.1)))
    else:
        assert grad.item() == pytest.approx(-adv * ratio.item(), rel=1e-5)
    assert stats.clipfrac.item() == (1.0 if abs(ratio.item() - 1) > 0.1 else 0.0)
    assert stats.approx_kl.item() == pytest.approx(0.5 * delta**2, rel=1e-5)


def test_advantages_are_clipped():
    loss, _, _ = grad_of(ddpo_is_loss, [0.0], [0.0], [100.0], adv_max=5.0)
    assert loss.item() == pytest.approx(-5.0)


def test_score_function_gradient_is_minus_advantage():
    loss, stats, grad = grad_of(ddpo_sf_loss, [0.5, 0.1], [0.0, 0.1], [2.0, -1.0])
    torch.testing.assert_close(grad, torch.tensor([-1.0, 0.5]))  # -A / B
    assert stats.clipfrac.item() == 0.5


def test_rwr_weights():
    adv = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    w = rwr_weights(adv, temperature=1.0)
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.all(w[1:] > w[:-1])
    assert (rwr_weights(adv, temperature=0.01)[-1]).item() == pytest.approx(4.0, rel=1e-3)  # all weight on the best
    sparse = rwr_sparse_weights(adv, quantile=0.5)
    assert sparse.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_rwr_loss_is_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert rwr_loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert rwr_loss(pred, target, torch.tensor([0.0, 1.0])).item() == pytest.approx(2.0)


def test_gaussian_kl_is_the_squared_mean_gap_over_twice_the_variance_per_dimension():
    mean = torch.zeros(2, 4, 3, 3)
    ref = mean.clone()
    ref[0] += 0.3  # every dimension of sample 0 moved by 0.3; sample 1 equal
    std = torch.tensor([0.5, 0.5]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.tensor([0.3**2 / (2 * 0.25), 0.0]))
    ref[1, 0] += 1.0  # one channel of four: a quarter of the dimensions
    assert gaussian_kl(mean, ref, std)[1] == pytest.approx(1.0 / (2 * 0.25) / 4)
