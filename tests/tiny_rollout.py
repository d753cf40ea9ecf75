"""A tiny LoRA policy perturbed after sampling, and its rollout of 4 samples: the update tests' shared setup."""

from __future__ import annotations

import numpy as np
import torch

STEPS = 4  # tiny_cpu's sample.num_steps, all trained


def tiny_rollout(double: bool = False):
    """(family, params, rollout, weights (4,)) from tiny_cpu: sampled, then the LoRA weights moved by 0.03 N(0, 1)
    so that ratios differ from 1 (and the KL to the reference is > 0). `double`: the UNet and the trajectory in
    float64, where differences of summation order vanish below 1e-6."""
    from ddpo.config import load_config
    from ddpo.rollout import Rollout
    from ddpo.sampler import sample_trajectories
    from ddpo.trainer import build_policy

    torch.manual_seed(0)
    family, params = build_policy(load_config("tiny_cpu"), torch.device("cpu"))
    prompts = ["a cat", "a dog", "a red fox", "an owl"]
    embeds = family.encode(prompts, torch.device("cpu"))
    negative = family.encode([""] * len(prompts), torch.device("cpu"))
    traj = sample_trajectories(family, family.pipe.unet, embeds, negative, num_steps=STEPS, guidance_scale=3.0,
                               eta=1.0, generator=torch.Generator().manual_seed(0))
    if double:
        family.pipe.unet.double()  # params keep their identity
        traj = traj._replace(latents=traj.latents.double(), log_probs=traj.log_probs.double(),
                             cond=traj.cond.map(torch.Tensor.double), negative=traj.negative.map(torch.Tensor.double))
    n = len(prompts)
    rollout = Rollout(traj, prompts, [{}] * n, torch.arange(n), np.zeros(n, np.float32), np.ones(n, bool), {}, 0.0, 0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.03 * torch.randn(p.shape, generator=generator))
    return family, params, rollout, torch.randn(n, generator=generator)
