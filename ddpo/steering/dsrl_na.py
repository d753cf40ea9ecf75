"""DSRL-NA: noise-aliased latent-noise SAC (Wagenmaker et al., 2025), cleanrl-style.

Three learners share one replay buffer of (s, a, r, s', done) where a is the *executed action chunk*:
  Q^A(s, a)  twin critics on real actions, soft TD targets through the frozen policy a' = pi_dp(s', w');
  Q^W(s, w)  distilled from min Q^A(s, pi_dp(s, w)) on fresh w ~ N(0, I): noise that decodes to the same
             action gets the same value ("aliasing"), so Q^W learns from every noise, not only those tried;
  pi^W(w|s)  a tanh-Gaussian noise actor in Box(-b, b), maximising Q^W with an automatic temperature on its
             regulariser: entropy (SAC) or KL to the base policy's noise N(0, I) ("base_kl").
Because Q^A is defined on actions, offline (s, a, r, s') demonstrations can go into the buffer as they are.
The actor and critics see observations standardised with the base policy's statistics; transitions carry
their own discount (gamma ** steps run), so a chunk cut short by a time limit bootstraps correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .policy import OBS_CLIP, SteerablePolicy, policy_obs_stats


@dataclass
class DSRLNAConfig:
    noise_bound: float = 1.5
    hidden: int = 256
    layers: int = 2
    gamma: float = 0.99  # per environment step; a chunk of k steps is discounted by gamma ** k (discounted_chunk)
    tau: float = 0.005
    lr: float = 3e-4
    batch_size: int = 256
    buffer_size: int = 100_000
    updates_per_decision: int = 1
    distill_steps: int = 1  # Q^W regression steps per update
    init_alpha: float = 1.0  # initial entropy temperature (tuned automatically from there)
    backup_entropy: bool = True  # soft TD target (- alpha log pi) on Q^A; False: Q^A is the task return only
    # The actor's regulariser: "entropy" (SAC: maximise H(pi^W), temperature tuned to a target entropy of
    # -noise_dim) or "base_kl" (minimise KL(pi^W || N(0, I)), the base policy's own noise, tuned to
    # target_kl nats per noise dimension): a high temperature then means "act like the base policy", not
    # "act uniformly over the box".
    regularizer: str = "entropy"
    target_kl: float = 0.5
    # Standardise observations for the actor and critics with the base policy's statistics (clipped to +-5).
    # Fetch positions sit near 1.3 m with spreads of a few cm: raw, the block-to-goal distance is lost.
    normalize_obs: bool = True


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    widths = [in_dim] + [hidden] * layers
    blocks: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        blocks += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(widths[-1], out_dim))


class NoiseActor(nn.Module):
    """pi^W(w | s): obs (B, obs_dim) -> noise (B, noise_dim) in (-b, b), squashed Gaussian."""

    def __init__(self, obs_dim: int, noise_dim: int, noise_bound: float, hidden: int, layers: int):
        super().__init__()
        self.body = mlp(obs_dim, 2 * noise_dim, hidden, layers)
        self.noise_bound = noise_bound

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample w (B, noise_dim) and log pi(w|s) (B,), with the tanh change of variables."""
        mean, log_std = self.body(obs).chunk(2, dim=-1)
        std = log_std.clamp(-5, 2).exp()
        pre_tanh = mean + std * torch.randn_like(mean)
        squashed = torch.tanh(pre_tanh)
        log_prob = torch.distributions.Normal(mean, std).log_prob(pre_tanh)
        log_prob = log_prob - torch.log(self.noise_bound * (1 - squashed.pow(2)) + 1e-6)
        return self.noise_bound * squashed, log_prob.sum(-1)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self.body(obs).chunk(2, dim=-1)
        return self.noise_bound * torch.tanh(mean)


class Batch(NamedTuple):
    obs: torch.Tensor  # (B, obs_dim)
    actions: torch.Tensor  # (B, H*A) executed chunk, env units
    rewards: torch.Tensor  # (B,) the chunk's rewards, discounted per environment step inside it
    next_obs: torch.Tensor  # (B, obs_dim)
    dones: torch.Tensor  # (B,) 1.0 on termination (not truncation: a time limit still bootstraps)
    discounts: torch.Tensor  # (B,) gamma_step ** (steps the chunk ran): what next_obs's value is worth


class ReplayBuffer:
    """A ring buffer of chunk transitions, numpy arrays (saved as .npz, no pickle)."""

    fields = ("obs", "actions", "rewards", "next_obs", "dones", "discounts")

    def __init__(self, capacity: int, obs_dim: int, action_dim: int):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.discounts = np.zeros(capacity, np.float32)

    def add(self, obs, actions, reward, next_obs, done, discount: float) -> None:
        """One chunk transition; `discount` multiplies next_obs's value in the TD target (gamma ** k for a
        chunk of k environment steps), so a chunk cut short by the episode's end is discounted by what ran."""
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, np.asarray(actions).reshape(-1), reward
        self.next_obs[i], self.dones[i], self.discounts[i] = next_obs, float(done), discount
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        index = rng.integers(0, self.size, batch_size)
        return Batch(*(torch.as_tensor(getattr(self, name)[index]) for name in self.fields))

    def save(self, path: str | Path) -> None:
        np.savez(path, pos=self.pos, size=self.size, **{name: getattr(self, name) for name in self.fields})

    def load(self, path: str | Path) -> None:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in self.fields if name not in data]
            if missing:
                raise ValueError(f"{path} lacks {missing}: a replay buffer from an older version; start a new run")
            for name in self.fields:
                getattr(self, name)[...] = data[name]
            self.pos, self.size = int(data["pos"]), int(data["size"])


class DSRLNA(nn.Module):
    """The learnable parts of DSRL-NA; `policy` is the frozen diffusion policy (not a submodule, never saved)."""

    def __init__(self, policy: SteerablePolicy, obs_dim: int, config: DSRLNAConfig):
        super().__init__()
        # Plain attribute, not a submodule: the frozen policy must stay out of state_dict() and the optimizers.
        object.__setattr__(self, "policy", policy)
        self.config = config
        self.noise_shape = (policy.horizon, policy.act_dim)
        self.noise_dim = noise_dim = action_dim = policy.horizon * policy.act_dim
        sizes = (config.hidden, config.layers)
        self.actor = NoiseActor(obs_dim, noise_dim, config.noise_bound, *sizes)
        self.qa1, self.qa2 = mlp(obs_dim + action_dim, 1, *sizes), mlp(obs_dim + action_dim, 1, *sizes)
        self.qa1_target, self.qa2_target = mlp(obs_dim + action_dim, 1, *sizes), mlp(obs_dim + action_dim, 1, *sizes)
        self.qa1_target.load_state_dict(self.qa1.state_dict())
        self.qa2_target.load_state_dict(self.qa2.state_dict())
        self.qw = mlp(obs_dim + noise_dim, 1, *sizes)
        mean, std = torch.zeros(obs_dim), torch.ones(obs_dim)
        stats = policy_obs_stats(policy) if config.normalize_obs else None
        if stats is not None:
            mean, std = (torch.as_tensor(a) for a in stats)
        self.register_buffer("obs_mean", mean)
        self.register_buffer("obs_std", std)
        self.log_alpha = nn.Parameter(torch.full((1,), math.log(config.init_alpha)))
        self.target_entropy = -float(noise_dim)
        if config.regularizer not in ("entropy", "base_kl"):
            raise ValueError(f"regularizer must be 'entropy' or 'base_kl', got {config.regularizer!r}")
        self.qa_optimizer = torch.optim.Adam([*self.qa1.parameters(), *self.qa2.parameters()], lr=config.lr)
        self.qw_optimizer = torch.optim.Adam(self.qw.parameters(), lr=config.lr)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.lr)

    def decode(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """obs (B, obs_dim), noise (B, H*A) -> flattened action chunk (B, H*A) through the frozen policy."""
        with torch.no_grad():
            return self.policy(obs, noise.view(-1, *self.noise_shape)).flatten(1)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """What the actor and critics see: (obs - mean) / std, clipped to +-5 (the frozen policy gets raw obs)."""
        return ((obs - self.obs_mean) / self.obs_std).clamp(-OBS_CLIP, OBS_CLIP)

    def min_qa(self, obs: torch.Tensor, actions: torch.Tensor, target: bool = False) -> torch.Tensor:
        q1, q2 = (self.qa1_target, self.qa2_target) if target else (self.qa1, self.qa2)
        obs_actions = torch.cat([obs, actions], dim=-1)
        return torch.min(q1(obs_actions), q2(obs_actions)).squeeze(-1)

    def penalty(self, noise: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
        """What alpha weighs, per sample (B,): log pi^W(w|s) (entropy), or log pi^W(w|s) - log N(w; 0, I),
        a one-sample estimate of KL(pi^W || N(0, I)) (base_kl)."""
        if self.config.regularizer == "entropy":
            return log_prob
        return log_prob - torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum(-1)

    def alpha_loss(self, penalty: torch.Tensor) -> torch.Tensor:
        """Raise alpha when the actor is less random (entropy) or further from N(0, I) (base_kl) than its target."""
        if self.config.regularizer == "entropy":
            return -(self.log_alpha * (penalty + self.target_entropy)).mean()
        return (self.log_alpha * (self.config.target_kl * self.noise_dim - penalty)).mean()

    def update(self, batch: Batch) -> dict[str, float]:
        """One DSRL-NA update: soft TD on Q^A, distil Q^W, improve pi^W, tune alpha, move the targets."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            obs_n, next_obs_n = self.normalize(batch.obs), self.normalize(batch.next_obs)
            next_noise, next_log_prob = self.actor(next_obs_n)
            next_q = self.min_qa(next_obs_n, self.decode(batch.next_obs, next_noise), target=True)
            if self.config.backup_entropy:
                next_q = next_q - alpha * self.penalty(next_noise, next_log_prob)
            td_target = batch.rewards + batch.discounts * (1 - batch.dones) * next_q
        obs_actions = torch.cat([obs_n, batch.actions], dim=-1)
        qa_loss = F.mse_loss(self.qa1(obs_actions).squeeze(-1), td_target) + F.mse_loss(
            self.qa2(obs_actions).squeeze(-1), td_target
        )
        self.qa_optimizer.zero_grad(set_to_none=True)
        qa_loss.backward()
        self.qa_optimizer.step()

        for _ in range(self.config.distill_steps):
            # Fresh noise from the base distribution, clipped to the actor's range: Q^W(s, w) ~ Q^A(s, pi_dp(s, w)).
            noise = torch.randn(batch.obs.shape[0], self.noise_dim)
            noise = noise.clamp(-self.config.noise_bound, self.config.noise_bound)
            with torch.no_grad():
                qw_target = self.min_qa(obs_n, self.decode(batch.obs, noise))
            qw_loss = F.mse_loss(self.qw(torch.cat([obs_n, noise], dim=-1)).squeeze(-1), qw_target)
            self.qw_optimizer.zero_grad(set_to_none=True)
            qw_loss.backward()
            self.qw_optimizer.step()

        noise, log_prob = self.actor(obs_n)
        penalty = self.penalty(noise, log_prob)
        actor_loss = (alpha * penalty - self.qw(torch.cat([obs_n, noise], dim=-1)).squeeze(-1)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()

        alpha_loss = self.alpha_loss(penalty.detach())
        self.alpha_optimizer.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optimizer.step()

        with torch.no_grad():
            for net, target in ((self.qa1, self.qa1_target), (self.qa2, self.qa2_target)):
                for param, target_param in zip(net.parameters(), target.parameters()):
                    target_param.lerp_(param, self.config.tau)
        with torch.no_grad():  # how often the actor sits at the box's edge (sampled, and its mean)
            edge = 0.95 * self.config.noise_bound
            saturated = (noise.detach().abs() > edge).float().mean()
            mean_saturated = (self.actor.deterministic(obs_n).abs() > edge).float().mean()
        return {"qa_loss": qa_loss.item(), "qw_loss": qw_loss.item(), "actor_loss": actor_loss.item(), "alpha": alpha.item(),
                "q_mean": td_target.mean().item(), "log_prob": log_prob.mean().item(),
                "penalty": penalty.mean().item(), "saturation": saturated.item(),
                "mean_saturation": mean_saturated.item()}

    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """obs (obs_dim,) -> noise (H*A,) for the environment wrapper."""
        obs_tensor = self.normalize(torch.as_tensor(np.asarray(obs, np.float32))[None])
        with torch.no_grad():
            noise = self.actor.deterministic(obs_tensor) if deterministic else self.actor(obs_tensor)[0]
        return noise[0].numpy()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"qa": self.qa_optimizer, "qw": self.qw_optimizer, "actor": self.actor_optimizer, "alpha": self.alpha_optimizer}

    def save(self, folder: str | Path) -> None:
        """agent.safetensors (all networks, log_alpha) and optimizers.pt (Adam states, loaded weights_only)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "agent.safetensors"))
        torch.save({name: opt.state_dict() for name, opt in self.optimizers().items()}, folder / "optimizers.pt")

    def load(self, folder: str | Path, with_optimizers: bool = True) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        state = load_file(str(folder / "agent.safetensors"))
        if "obs_mean" not in state:  # saved before observations were standardised: the networks saw raw ones
            state["obs_mean"], state["obs_std"] = torch.zeros_like(self.obs_mean), torch.ones_like(self.obs_std)
        self.load_state_dict(state)
        if with_optimizers and (folder / "optimizers.pt").is_file():
            states = torch.load(folder / "optimizers.pt", weights_only=True)
            for name, optimizer in self.optimizers().items():
                optimizer.load_state_dict(states[name])
