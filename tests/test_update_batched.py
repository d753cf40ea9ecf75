"""train.timesteps_per_call: several timesteps per UNet call give the gradient and statistics of one call per step."""

import pytest
import torch

from ddpo.config import ConfigError, load_config

from tiny_rollout import STEPS, tiny_rollout  # STEPS: tiny_cpu's sample.num_steps, all trained


class _RecordingOptimizer:
    """Stands in for AdamW: records the (accumulated, unclipped) LoRA gradients of each optimizer step."""

    def __init__(self, params):
        self.params, self.steps = params, []

    def step(self):
        self.steps.append([p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.fixture(scope="module")
def setup():
    """A tiny LoRA policy, perturbed after sampling (ratios != 1, KL to the reference > 0), and its rollout."""
    return tiny_rollout(double=True)


def _update(setup, *overrides):
    """(gradients of every optimizer step, returned statistics) of one policy_update with these overrides."""
    from accelerate import Accelerator

    from ddpo.update import policy_update

    family, params, rollout, weights = setup
    pipe = family.pipe
    # No gradient clipping (a factor of 1.0 changes nothing); a clip range that clips some samples, not all.
    config = load_config("tiny_cpu", ["train.max_grad_norm=1e12", "train.clip_range=3e-3", *overrides])
    optimizer = _RecordingOptimizer(params)
    pipe.unet.train()
    stats = policy_update(pipe.unet, family, optimizer, Accelerator(cpu=True), params, rollout, weights,
                          config, epoch=0, progress=False)
    return optimizer.steps, stats


def _assert_same(a, b, atol=1e-10):
    """Gradients equal to `atol` times their largest entry (float64 reaches about 5e-15), statistics alike."""
    (grads_a, stats_a), (grads_b, stats_b) = a, b
    assert len(grads_a) == len(grads_b) > 0
    for step_a, step_b in zip(grads_a, grads_b):
        scale = max(float(g.abs().max()) for g in step_a)
        assert scale > 0  # something was trained
        for ga, gb in zip(step_a, step_b):
            torch.testing.assert_close(ga, gb, rtol=0, atol=atol * scale)
    assert stats_a["clipfrac"] == stats_b["clipfrac"]
    for key in ("loss", "approx_kl", "kl_ref"):
        if stats_a.get(key) is not None:
            assert stats_b[key] == pytest.approx(stats_a[key], rel=1e-9, abs=1e-15)
    assert stats_a["optimizer_steps"] == stats_b["optimizer_steps"]


@pytest.mark.parametrize("extra", [["train.algorithm=ddpo_is", "train.gradient_accumulation_steps=2"],
                                   ["train.algorithm=ddpo_sf", "train.gradient_accumulation_steps=2"],
                                   ["train.algorithm=ddpo_is", "train.kl_coef=0.5"],
                                   ["train.algorithm=ddpo_is", "train.timestep_fraction=0.5", "train.kl_coef=0.1"]],
                         ids=["ddpo_is", "ddpo_sf", "kl", "fraction"])
def test_timesteps_per_call_gives_the_gradient_and_statistics_of_one_call_per_step(setup, extra):
    one = _update(setup, *extra, "train.timesteps_per_call=1")
    assert 0 < one[1]["clipfrac"] < 1 and one[1]["approx_kl"] > 0  # some ratios clipped, not all: it can fail
    for k in (2, 3, STEPS, "auto"):  # auto: all STEPS here (the tiny model's activations fit any budget)
        _assert_same(one, _update(setup, *extra, f"train.timesteps_per_call={k}"))


def test_each_call_takes_the_same_steps_per_sample(setup, monkeypatch):
    """A chunk holds each sample's next steps in its own random order; all of them, once, with fraction < 1."""
    family = setup[0]
    calls = []
    real = family.predict

    def spy(unet, latents, timesteps, *args):
        calls.append(timesteps.clone())
        return real(unet, latents, timesteps, *args)

    monkeypatch.setattr(family, "predict", spy)
    trained = {}
    for k in (1, 2, STEPS):
        calls.clear()
        _update(setup, "train.timestep_fraction=0.5", f"train.timesteps_per_call={k}")
        # 2 micro-batches of 2 samples, 2 of 4 steps each: k=1 makes 4 calls of 2 rows, k >= 2 two calls of 4
        assert [len(c) for c in calls] == ([2] * 4 if k == 1 else [4] * 2)
        trained[k] = torch.cat(calls).sort().values
    assert torch.equal(trained[1], trained[2]) and torch.equal(trained[1], trained[STEPS])
    assert len(trained[1].unique()) > 1  # per-sample orders: not every sample at the same step


def test_rwr_is_unaffected(setup):
    one = _update(setup, "train.algorithm=rwr", "train.timesteps_per_call=1")
    for k in (STEPS, "auto"):
        _assert_same(one, _update(setup, "train.algorithm=rwr", f"train.timesteps_per_call={k}"))


def test_timesteps_per_call_below_one_is_refused():
    with pytest.raises(ConfigError, match="train.timesteps_per_call=0 must be >= 1"):
        load_config("tiny_cpu", ["train.timesteps_per_call=0"])
