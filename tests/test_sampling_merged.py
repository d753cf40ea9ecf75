"""sample.batches_per_call: k consecutive sampling batches through the denoiser together (ddpo/sampler.py
sample_merged) give the epoch of k = 1 up to float rounding; k = 1 is the old path bit for bit."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from ddpo.config import ConfigError, load_config

CPU = torch.device("cpu")


@torch.no_grad()
def old_sample_trajectories(family, model, cond, negative, *, num_steps, guidance_scale, eta, generator,
                            progress=False, initial_noise=None, sde_steps=None):
    """ddpo/sampler.py's sample_trajectories before sample.batches_per_call (commit d1fc7ec), verbatim."""
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    from ddpo.logprob import step_log_prob
    from ddpo.sampler import Trajectories, noise_levels

    device = next(iter(cond.values())).device
    family.set_steps(num_steps, device)
    batch = next(iter(cond.values())).shape[0]
    noise = torch.randn(family.latent_shape(batch), generator=generator) if initial_noise is None else initial_noise
    latents = family.initial_latents(noise.to(device))
    all_latents, all_log_probs = [latents], []
    levels = noise_levels(eta, num_steps, sde_steps)
    for i, t in enumerate(tqdm(family.timesteps, desc="sampling", leave=False, disable=not progress)):
        output = family.predict(model, latents, t.expand(batch), cond, negative, guidance_scale)
        mean, std = family.step_mean_std(output, torch.full((batch,), i, dtype=torch.long), latents, levels[i])
        if levels[i] > 0:
            draw = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = (mean + std * draw).float()
            log_prob = step_log_prob(latents, mean, std)
        else:
            latents, log_prob = mean, torch.full((batch,), float("nan"), device=device)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return Trajectories(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=family.timesteps.expand(batch, -1).clone(),
        cond=cond,
        negative=negative,
        images=family.decode(latents),
    )


_FAMILIES = {}


def family_of(preset):
    from ddpo.families import load_family

    name = load_config(preset).model.pretrained
    if name not in _FAMILIES:
        _FAMILIES[name] = load_family(name)
    return _FAMILIES[name]


def rollout(preset, overrides, epoch=0, process_index=0, num_processes=1):
    from ddpo.reward_pool import RewardPool
    from ddpo.rollout import collect_rollout
    from prompts import load_grammar

    config = load_config(preset, overrides)
    family = family_of(preset)
    pool = RewardPool("rewards_for_tests:brightness", {}, "inline")  # continuous in the pixels (JPEG sizes jump)
    try:
        return collect_rollout(family, family.denoiser, load_grammar("simple_animals"), pool, config, epoch=epoch,
                               process_index=process_index, num_processes=num_processes, device=CPU,
                               autocast=nullcontext, progress=False)
    finally:
        pool.close()


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    """The same epoch to float rounding: a merged call batches the denoiser's matmuls differently, which moves a
    latent of size ~3 by up to ~1e-5 after 10 steps on some CPUs (AMD EPYC), hence a relative tolerance too."""
    t, u = a.trajectories, b.trajectories
    assert (a.prompts, a.metadata) == (b.prompts, b.metadata)
    assert torch.equal(a.global_index, b.global_index)
    torch.testing.assert_close(t.latents, u.latents, atol=atol, rtol=rtol)
    torch.testing.assert_close(t.log_probs, u.log_probs, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(t.images, u.images, atol=atol, rtol=rtol)
    assert torch.equal(t.timesteps, u.timesteps)
    for key in t.cond:
        assert torch.equal(t.cond[key], u.cond[key]) and torch.equal(t.negative[key], u.negative[key])
    torch.testing.assert_close(torch.tensor(a.rewards), torch.tensor(b.rewards), atol=atol, rtol=0)


@pytest.mark.parametrize("preset,extra", [
    ("tiny_cpu", []),  # sd: DDIM, CFG, every step stochastic
    ("tiny_sd3", []),  # sd3: flow SDE in a window of 2 of 4 steps (NaN log-probs elsewhere), 2 images per prompt
])
def test_merged_batches_give_the_same_epoch(preset, extra):
    base = ["sample.num_batches_per_epoch=4", *extra]
    one = rollout(preset, base)
    for k in (2, 4):
        merged = rollout(preset, base + [f"sample.batches_per_call={k}"])
        assert_close(merged, one)
    assert not torch.isnan(one.trajectories.log_probs).all()


def test_each_process_merges_its_own_batches():
    base = ["sample.num_batches_per_epoch=2"]
    one = rollout("tiny_cpu", base, epoch=1, process_index=1, num_processes=2)
    merged = rollout("tiny_cpu", base + ["sample.batches_per_call=2"], epoch=1, process_index=1, num_processes=2)
    assert_close(merged, one)
    assert one.global_index.tolist() == [2, 3, 6, 7]  # global batches 1 and 3 of batch size 2


@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_sd3"])
def test_default_is_the_old_path_bit_for_bit(preset, monkeypatch):
    import ddpo.rollout

    new = rollout(preset, [])
    monkeypatch.setattr(ddpo.rollout, "sample_trajectories", old_sample_trajectories)
    old = rollout(preset, [])
    t, u = new.trajectories, old.trajectories
    assert torch.equal(t.latents, u.latents) and torch.equal(t.images, u.images)
    assert torch.equal(torch.nan_to_num(t.log_probs, nan=7.0), torch.nan_to_num(u.log_probs, nan=7.0))
    assert torch.equal(torch.isnan(t.log_probs), torch.isnan(u.log_probs))
    assert (new.rewards == old.rewards).all() and new.prompts == old.prompts


def test_sample_trajectories_with_given_noise_is_unchanged():
    """The evaluation's path (initial noise given, eta 0) is also the old one bit for bit."""
    from ddpo.sampler import sample_trajectories

    family = family_of("tiny_cpu")
    cond, negative = family.encode(["a cat", "a dog"], CPU), family.encode([""], CPU).expand(2)
    noise = torch.randn(family.latent_shape(2), generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_steps=3, guidance_scale=3.0, eta=0.0, initial_noise=noise)
    new = sample_trajectories(family, family.denoiser, cond, negative, generator=torch.Generator(), **kwargs)
    old = old_sample_trajectories(family, family.denoiser, cond, negative, generator=torch.Generator(), **kwargs)
    assert torch.equal(new.latents, old.latents) and torch.equal(new.images, old.images)


@pytest.mark.parametrize("value,message", [
    (0, "sample.batches_per_call=0 must be >= 1"),
    (3, "sample.batches_per_call=3 does not divide sample.num_batches_per_epoch=2"),
])
def test_invalid_batches_per_call_is_refused_before_loading(value, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("tiny_cpu", [f"sample.batches_per_call={value}"])
    if value == 3:
        assert "Set sample.batches_per_call to a divisor of 2" in str(err.value)
