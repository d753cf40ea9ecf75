"""Recipes for the shipped base policies: degraded demonstrations -> behaviour cloning -> a policy folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .experts import DECOYS, EXPERTS, Degradation, Demos, collect_demos
from .policy import DiffusionPolicy, DiffusionPolicyConfig

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@dataclass
class BaseRecipe:
    n_episodes: int
    degradation: Degradation
    horizon: int = 4
    bc_steps: int = 6000
    policy: dict = field(default_factory=dict)  # extra DiffusionPolicyConfig fields


# Degradations chosen so the cloned base scores well below the expert (see docs/steering.md for measurements).
RECIPES: dict[str, BaseRecipe] = {
    "Pendulum-v1": BaseRecipe(n_episodes=100, degradation=Degradation(p_expert=0.4, p_decoy=0.35)),
    "Reacher-v5": BaseRecipe(n_episodes=400, degradation=Degradation(p_expert=0.3, p_decoy=0.35)),
    # 200 noisy episodes; chunks that push/carry toward the mirrored goal (decoy) or hold a random action.
    "FetchPush-v4": BaseRecipe(n_episodes=200, degradation=Degradation(p_expert=0.9, p_decoy=0.05, noise_std=0.05),
                               bc_steps=15000),
    # Nearly half the chunks from a demonstrator that never lifts: the cloned policy's w = 0 mode lifts only
    # sometimes, so reaching goals in the air is what steering has to find.
    "FetchPickAndPlace-v4": BaseRecipe(n_episodes=200, degradation=Degradation(p_expert=0.45, p_decoy=0.5)),
}


def pretrained_path(env_id: str) -> Path:
    """Folder of the base policy shipped for `env_id` (raises if none ships)."""
    folder = PRETRAINED_DIR / env_id
    if not (folder / "config.json").is_file():
        shipped = sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())
        raise FileNotFoundError(f"no shipped base policy for {env_id!r}; shipped: {', '.join(shipped) or 'none'}")
    return folder


def make_demos(env_id: str, seed: int = 0) -> Demos:
    from .envs import make_env

    if env_id not in RECIPES:
        raise ValueError(f"no scripted expert for {env_id!r}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[env_id]
    return collect_demos(make_env(env_id), EXPERTS[env_id], DECOYS[env_id], recipe.n_episodes, recipe.horizon, recipe.degradation, seed)


def train_base_policy(env_id: str, demos: Demos, seed: int = 0, steps: int | None = None, log_every: int = 0) -> DiffusionPolicy:
    from .bc import train_bc
    from .envs import make_env

    recipe, env = RECIPES[env_id], make_env(env_id)
    config = DiffusionPolicyConfig(
        obs_dim=env.observation_space.shape[0],
        act_dim=env.action_space.shape[0],
        horizon=recipe.horizon,
        env_id=env_id,
        **recipe.policy,
    )
    return train_bc(
        demos, config, env.action_space.low, env.action_space.high,
        steps=steps or recipe.bc_steps, seed=seed, log_every=log_every,
    )
