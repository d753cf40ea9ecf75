"""The DiffusionNFT loss and optimality probability (ddpo/losses.py)."""

from __future__ import annotations

import pytest
import torch

from ddpo.losses import NFTStats, nft_loss, nft_optimality


def test_optimality_is_a_clipped_linear_map_onto_0_1():
    a = torch.linspace(-10, 10, 201)
    r = nft_optimality(a, clip_max=5.0)
    assert r.min() == 0.0 and r.max() == 1.0
    assert torch.all(r[1:] >= r[:-1])  # monotone
    assert nft_optimality(torch.zeros(1), 5.0).item() == 0.5
    torch.testing.assert_close(nft_optimality(torch.tensor([-5.0, -2.5, 2.5, 5.0, 7.0]), 5.0),
                               torch.tensor([0.0, 0.25, 0.75, 1.0, 1.0]))


def test_loss_equals_a_hand_computed_value():
    # B = 2 samples of 2 dims; beta = 0.5.
    prediction = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    r = torch.tensor([1.0, 0.25])
    # v+ = 0.5 old + 0.5 pred = [[0.5, 1.5], [0.5, 0.0]];  v- = 1.5 old - 0.5 pred = [[-0.5, 0.5], [1.5, 2.0]]
    # ||v+ - v||^2 / 2: [(0.25 + 0.25) / 2, (0.25 + 0) / 2] = [0.25, 0.125]
    # ||v- - v||^2 / 2: [(2.25 + 0.25) / 2, (2.25 + 4) / 2] = [1.25, 3.125]
    # loss = mean(1 * 0.25 + 0 * 1.25, 0.25 * 0.125 + 0.75 * 3.125) = (0.25 + 2.375) / 2 = 1.3125
    loss, stats = nft_loss(prediction, old, target, r, beta=0.5)
    assert isinstance(stats, NFTStats)
    torch.testing.assert_close(loss, torch.tensor(1.3125))
    torch.testing.assert_close(stats.positive_loss, torch.tensor((0.25 + 0.125) / 2))
    torch.testing.assert_close(stats.negative_loss, torch.tensor((1.25 + 3.125) / 2))
    torch.testing.assert_close(stats.old_deviation, torch.tensor((1 + 1 + 1 + 4) / 4))

    # Adaptive weighting: each term over its detached mean |error|.
    # |v+ - v| means: [0.5, 0.25]; |v- - v| means: [(1.5 + 0.5) / 2, (1.5 + 2) / 2] = [1.0, 1.75]
    # terms: pos [0.25 / 0.5, 0.125 / 0.25] = [0.5, 0.5]; neg [1.25 / 1.0, 3.125 / 1.75]
    adaptive, _ = nft_loss(prediction, old, target, r, beta=0.5, adaptive_weight=True)
    expected = (1 * 0.5 + 0.25 * 0.5 + 0.75 * 3.125 / 1.75) / 2
    torch.testing.assert_close(adaptive, torch.tensor(expected))
    # The weights are constants of the gradient (stop-gradient): d/dv_theta of r ||e+||^2 / (D w+) is
    # 2 r beta e+ / (D w+), and of (1 - r) ||e-||^2 / (D w-) it is -2 (1 - r) beta e- / (D w-); then / B.
    adaptive.backward()
    e_pos = torch.tensor([[-0.5, 0.5], [0.5, 0.0]])
    e_neg = torch.tensor([[-1.5, -0.5], [1.5, 2.0]])
    w_pos, w_neg = torch.tensor([[0.5], [0.25]]), torch.tensor([[1.0], [1.75]])
    expected_grad = (2 * r[:, None] * 0.5 * e_pos / (2 * w_pos) - 2 * (1 - r[:, None]) * 0.5 * e_neg / (2 * w_neg)) / 2
    torch.testing.assert_close(prediction.grad, expected_grad)
    prediction.grad = None

    # In x0 space with c = t per sample: e = c (v+- - v). Unweighted: c^2 times; adaptive: c times (c^2 / c).
    t = torch.tensor([0.5, 2.0])
    scaled, _ = nft_loss(prediction, old, target, r, beta=0.5, x0_scale=t)
    torch.testing.assert_close(scaled, torch.tensor((0.25 * 0.25 + 4 * 2.375) / 2))
    scaled_adaptive, _ = nft_loss(prediction, old, target, r, beta=0.5, adaptive_weight=True, x0_scale=t)
    torch.testing.assert_close(scaled_adaptive, torch.tensor((0.5 * 0.5 + 2 * (0.25 * 0.5 + 0.75 * 3.125 / 1.75)) / 2))


def _distance_after_one_step(r: float, beta: float, adaptive_weight: bool, lr: float = 0.1) -> tuple[float, float]:
    """||prediction - target|| before and after one gradient step from prediction = old_prediction."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randn(4, 3, 8, 8, generator=g)
    prediction = old.clone().requires_grad_(True)
    loss, _ = nft_loss(prediction, old, target, torch.full((4,), r), beta, adaptive_weight=adaptive_weight)
    loss.backward()
    stepped = prediction.detach() - lr * prediction.grad / prediction.grad.norm().clamp(min=1e-30)
    return (old - target).norm().item(), (stepped - target).norm().item()


@pytest.mark.parametrize("adaptive_weight", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_positive_samples_move_toward_the_target_and_negative_ones_away(beta, adaptive_weight):
    before, after = _distance_after_one_step(1.0, beta, adaptive_weight)
    assert after < before - 0.05
    before, after = _distance_after_one_step(0.0, beta, adaptive_weight)
    assert after > before + 0.05


@pytest.mark.parametrize("adaptive_weight", [False, True])
def test_neutral_samples_give_no_gradient_at_the_old_policy(adaptive_weight):
    """r = 0.5 at v_theta = v_old: the positive and negative pulls cancel exactly (gradient 0)."""
    g = torch.Generator().manual_seed(1)
    old, target = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    prediction = old.clone().requires_grad_(True)
    loss, _ = nft_loss(prediction, old, target, torch.full((3,), 0.5), 0.3, adaptive_weight=adaptive_weight)
    loss.backward()
    assert prediction.grad.abs().max() < 1e-6


def test_neutral_samples_are_a_trust_region_and_the_minimiser_is_closed_form():
    """Unweighted, the per-sample minimiser is v_old + (2r - 1) / beta (v - v_old); at r = 0.5 the loss is
    ||v_old - v||^2 + beta^2 ||v_theta - v_old||^2 (per-dimension means), pulling v_theta back to v_old."""
    g = torch.Generator().manual_seed(2)
    old, target = (torch.randn(3, 16, generator=g, dtype=torch.float64) for _ in range(2))
    away = old + torch.randn(3, 16, generator=g, dtype=torch.float64)
    beta = 0.3
    loss, _ = nft_loss(away, old, target, torch.full((3,), 0.5, dtype=torch.float64), beta)
    expected = (((old - target) ** 2).mean(1) + beta**2 * ((away - old) ** 2).mean(1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)

    r = torch.tensor([1.0, 0.8, 0.1], dtype=torch.float64)
    optimum = (old + (2 * r[:, None] - 1) / beta * (target - old)).requires_grad_(True)
    loss, _ = nft_loss(optimum, old, target, r, beta)
    loss.backward()
    assert optimum.grad.abs().max() < 1e-12
    # beta = 1, r = 1 is plain regression on the target.
    prediction = torch.randn(3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = nft_loss(prediction, old, target, torch.ones(3, dtype=torch.float64), 1.0)
    torch.testing.assert_close(loss, ((prediction - target) ** 2).mean(1).mean())


def test_gradient_reaches_only_the_prediction():
    prediction = torch.randn(2, 4, requires_grad=True)
    old, target = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    r = torch.tensor([0.9, 0.2], requires_grad=True)
    loss, stats = nft_loss(prediction, old, target, r, 0.5, adaptive_weight=True)
    loss.backward()
    assert prediction.grad is not None
    assert old.grad is None and target.grad is None and r.grad is None
    assert not any(s.requires_grad for s in stats)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(prediction, old, target, r, 0.0)


def test_half_precision_inputs_are_computed_in_float32():
    prediction = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = nft_loss(prediction, torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 4), torch.rand(2), 1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert prediction.grad.dtype == torch.bfloat16
