"""Behaviour cloning of a DiffusionPolicy on demonstration chunks."""

from __future__ import annotations

import numpy as np
import torch

from .experts import Demos
from .policy import DiffusionPolicy, DiffusionPolicyConfig


def train_bc(
    demos: Demos,
    config: DiffusionPolicyConfig,
    action_low: np.ndarray,
    action_high: np.ndarray,
    steps: int = 6000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
) -> DiffusionPolicy:
    """Fit the DDPM noise predictor to (obs (N, obs_dim), actions (N, H, A)) chunks; returns the policy in eval mode."""
    if demos.actions.shape[1:] != (config.horizon, config.act_dim) or demos.obs.shape[1] != config.obs_dim:
        raise ValueError(
            f"demonstrations have obs {demos.obs.shape[1:]} and action chunks {demos.actions.shape[1:]}, "
            f"but the policy config expects ({config.obs_dim},) and ({config.horizon}, {config.act_dim})"
        )
    torch.manual_seed(seed)
    policy = DiffusionPolicy(config)
    policy.set_normalization(demos.obs.mean(0), demos.obs.std(0), action_low, action_high)
    obs, actions = torch.as_tensor(demos.obs), torch.as_tensor(demos.actions)
    optimizer = torch.optim.AdamW(policy.net.parameters(), lr=lr, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    policy.train()
    for step in range(steps):
        index = torch.randint(0, len(obs), (batch_size,), generator=generator)
        loss = policy.bc_loss(obs[index], actions[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"bc step {step:6d}  loss {loss.item():.4f}", flush=True)
    return policy.eval()
