"""A small diffusion policy over action chunks, and the interface DSRL needs from any policy.

DSRL only needs a *deterministic* map (observation, noise) -> action chunk. `DiffusionPolicy` gets one by
sampling with DDIM at eta = 0: the initial noise x_T = w is the only randomness, so the same (obs, w) always
decodes to the same chunk. Anything else with that signature can be steered too: wrap it in `CallablePolicy`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@runtime_checkable
class SteerablePolicy(Protocol):
    """What DSRL steers: obs (B, obs_dim) and noise (B, horizon, act_dim) -> actions (B, horizon, act_dim).

    Actions are in environment units; the map must be deterministic in (obs, noise).
    """

    obs_dim: int
    act_dim: int
    horizon: int

    def __call__(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...


# What DSRL's learners see of an observation: standardised with the base policy's statistics, clipped to +-OBS_CLIP
# (a rare outlier stays bounded). The frozen policy itself always decodes from raw observations.
OBS_CLIP = 5.0


def policy_obs_stats(policy: SteerablePolicy) -> tuple[np.ndarray, np.ndarray] | None:
    """The base policy's observation mean and std (obs_dim,) each, or None for a policy without them."""
    if not (hasattr(policy, "obs_mean") and hasattr(policy, "obs_std")):
        return None
    mean, std = (np.asarray(torch.as_tensor(t).detach().cpu(), np.float32) for t in (policy.obs_mean, policy.obs_std))
    return mean, std


class CallablePolicy:
    """Wrap your own deterministic policy `fn(obs, noise) -> actions` (torch tensors, shapes as SteerablePolicy)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], obs_dim: int, act_dim: int, horizon: int):
        self.fn, self.obs_dim, self.act_dim, self.horizon = fn, obs_dim, act_dim, horizon

    def __call__(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.fn(obs, noise)


@dataclass
class DiffusionPolicyConfig:
    obs_dim: int
    act_dim: int
    horizon: int = 4  # action chunk length H, run open-loop
    hidden: int = 256
    layers: int = 2  # hidden layers of the noise predictor
    time_embed_dim: int = 32
    num_train_timesteps: int = 100
    num_inference_steps: int = 10  # DDIM steps at eta = 0
    env_id: str | None = None  # the environment the policy was trained for, checked when steering


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, (B,) integer timesteps -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DiffusionPolicy(nn.Module):
    """MLP noise predictor eps(x_k, k, obs) over flattened, normalised action chunks.

    Trained with diffusers' DDPMScheduler (epsilon prediction), sampled with DDIMScheduler at eta = 0.
    Observations are standardised with stored statistics; actions are scaled to [-1, 1] with the
    environment's action bounds, both kept as buffers so they save with the weights.
    """

    def __init__(self, config: DiffusionPolicyConfig):
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.config = config
        self.obs_dim, self.act_dim, self.horizon = config.obs_dim, config.act_dim, config.horizon
        sample_dim = config.horizon * config.act_dim
        widths = [sample_dim + config.obs_dim + config.time_embed_dim] + [config.hidden] * config.layers
        blocks: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(width_in, width_out), nn.Mish()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], sample_dim))
        self.register_buffer("obs_mean", torch.zeros(config.obs_dim))
        self.register_buffer("obs_std", torch.ones(config.obs_dim))
        self.register_buffer("act_low", -torch.ones(config.act_dim))
        self.register_buffer("act_high", torch.ones(config.act_dim))
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True
        )
        self.sample_scheduler = DDIMScheduler.from_config(self.train_scheduler.config)
        self.sample_scheduler.set_timesteps(config.num_inference_steps)

    def set_normalization(self, obs_mean, obs_std, act_low, act_high) -> None:
        """Observation statistics (obs_dim,) and action bounds (act_dim,); std is floored to avoid / 0."""
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32).reshape(-1)  # noqa: E731
        self.obs_mean.copy_(as_tensor(obs_mean))
        self.obs_std.copy_(as_tensor(obs_std).clamp_min(1e-3))
        self.act_low.copy_(as_tensor(act_low))
        self.act_high.copy_(as_tensor(act_high))

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return 2 * (actions - self.act_low) / (self.act_high - self.act_low) - 1

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return self.act_low + (actions.clamp(-1, 1) + 1) * (self.act_high - self.act_low) / 2

    def predict_noise(self, sample: torch.Tensor, timesteps: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """sample (B, H*A) normalised, timesteps (B,), obs (B, obs_dim) raw -> predicted noise (B, H*A)."""
        obs_normed = (obs - self.obs_mean) / self.obs_std
        embedding = timestep_embedding(timesteps, self.config.time_embed_dim)
        return self.net(torch.cat([sample, obs_normed, embedding], dim=-1))

    def bc_loss(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """DDPM epsilon loss on demonstration chunks: obs (B, obs_dim), actions (B, H, A) in env units."""
        clean = self.normalize_actions(actions).flatten(1)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (clean.shape[0],))
        noisy = self.train_scheduler.add_noise(clean, noise, timesteps)
        return nn.functional.mse_loss(self.predict_noise(noisy, timesteps, obs), noise)

    @torch.no_grad()
    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0): obs (B, obs_dim), noise (B, H, A) -> actions (B, H, A), env units."""
        if obs.shape[-1] != self.obs_dim or noise.shape[-2:] != (self.horizon, self.act_dim):
            raise ValueError(
                f"expected obs (B, {self.obs_dim}) and noise (B, {self.horizon}, {self.act_dim}); "
                f"got {tuple(obs.shape)} and {tuple(noise.shape)}"
            )
        sample = noise.flatten(1).float()
        obs = obs.float()
        for timestep in self.sample_scheduler.timesteps:
            batch_timesteps = torch.full((sample.shape[0],), int(timestep), dtype=torch.long)
            eps = self.predict_noise(sample, batch_timesteps, obs)
            sample = self.sample_scheduler.step(eps, timestep, sample, eta=0.0).prev_sample
        return self.unnormalize_actions(sample.view(-1, self.horizon, self.act_dim))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json and model.safetensors (weights and normalisation buffers) to `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DiffusionPolicy":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} is not a diffusion policy folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(write one with `ddpo steer bc ENV`)"
            )
        config = DiffusionPolicyConfig(**json.loads((folder / CONFIG_NAME).read_text()))
        policy = cls(config)
        policy.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return policy.eval()
