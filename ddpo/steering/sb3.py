"""stable-baselines3 SAC, used unchanged for DSRL-SAC (on NoiseActionEnv) and for SAC from scratch.

What lives here is only glue: a quiet logger (SB3 otherwise leaves SB3-* folders in the temp dir), the
N(0, I) warm start written straight into SAC's replay buffer, and checkpoints without pickle
(safetensors for weights, weights_only torch files for Adam states, .npz for the replay buffer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch



def _buffer_arrays(buffer) -> dict[str, np.ndarray]:
    """Every numeric array of an SB3 replay buffer (plain, dict-observation or HER), dict entries as 'name/key'.
    Object arrays (HER's per-transition info dicts, unused here) and the RLPD demo tensors are not state."""
    arrays = {}
    for name, value in vars(buffer).items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            arrays[name] = value
        elif isinstance(value, dict) and name != "demo" and all(isinstance(v, np.ndarray) for v in value.values()):
            arrays.update({f"{name}/{key}": v for key, v in value.items()})
    return arrays


def make_sac(
    env, seed: int, hidden: int = 256, layers: int = 2, learning_starts: int = 0, buffer_size: int = 100_000,
    gradient_steps: int = 1, policy: str = "MlpPolicy", **kwargs,
):
    """SB3 SAC with the project's defaults; kwargs go to SAC (e.g. replay_buffer_class for HER or RLPD)."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.logger import Logger

    model = SAC(
        policy,
        env,
        learning_starts=learning_starts,
        buffer_size=buffer_size,
        batch_size=256,
        gradient_steps=gradient_steps,
        policy_kwargs={"net_arch": [hidden] * layers},
        seed=seed,
        device="cpu",
        verbose=0,
        **kwargs,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # no SB3-* folders, no stdout
    return model


def warm_start(model, noise_env, env_steps: int, seed: int) -> int:
    """Fill SAC's replay buffer by acting with w ~ N(0, I) (clipped to the box) for `env_steps` steps.

    Returns the number of decisions taken. DSRL's point: the base policy's own noise distribution already gives decent behaviour, whereas SB3's
    default warm-up (uniform over Box(-b, b)) would overweight the tails of the noise.
    """
    rng = np.random.default_rng(seed)
    obs, _ = noise_env.reset(seed=seed)
    start, decisions = noise_env.env_steps, 0
    while noise_env.env_steps - start < env_steps:
        noise = rng.standard_normal(noise_env.action_space.shape).astype(np.float32)
        noise = np.clip(noise, noise_env.action_space.low, noise_env.action_space.high)
        next_obs, reward, terminated, truncated, _ = noise_env.step(noise)
        info = {"TimeLimit.truncated": truncated and not terminated}
        model.replay_buffer.add(
            obs[None], next_obs[None], model.policy.scale_action(noise)[None],
            np.array([reward]), np.array([terminated or truncated]), [info],
        )
        obs = noise_env.reset()[0] if terminated or truncated else next_obs
        decisions += 1
    return decisions


def _optimizers(model) -> dict[str, torch.optim.Optimizer]:
    return {"actor": model.actor.optimizer, "critic": model.critic.optimizer, "ent_coef": model.ent_coef_optimizer}


def save_sac(model, folder: str | Path, state: dict) -> None:
    """Weights, optimizer states, replay buffer and `state` (JSON: counters) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"policy.{k}": v.contiguous() for k, v in model.policy.state_dict().items()}
    tensors["log_ent_coef"] = model.log_ent_coef.detach().contiguous()
    save_file(tensors, str(folder / "agent.safetensors"))
    torch.save({name: opt.state_dict() for name, opt in _optimizers(model).items()}, folder / "optimizers.pt")
    buffer = model.replay_buffer
    np.savez(folder / "replay.npz", pos=buffer.pos, full=buffer.full, **_buffer_arrays(buffer))
    state = dict(state, num_timesteps=model.num_timesteps, n_updates=model._n_updates)
    (folder / "state.json").write_text(json.dumps(state, indent=2))


def load_sac(model, folder: str | Path, with_buffer: bool = True) -> dict:
    """Restore what save_sac wrote into a freshly made `model`; returns the saved state dict.

    with_buffer=False loads only what acting needs (weights), e.g. for evaluation.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_file(str(folder / "agent.safetensors"))
    model.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    with torch.no_grad():
        model.log_ent_coef.copy_(tensors["log_ent_coef"])
    state = json.loads((folder / "state.json").read_text())
    if not with_buffer:
        return state
    states = torch.load(folder / "optimizers.pt", weights_only=True)
    for name, optimizer in _optimizers(model).items():
        optimizer.load_state_dict(states[name])
    with np.load(folder / "replay.npz", allow_pickle=False) as data:
        for name, array in _buffer_arrays(model.replay_buffer).items():
            array[...] = data[name]
        model.replay_buffer.pos, model.replay_buffer.full = int(data["pos"]), bool(data["full"])
    model.num_timesteps, model._n_updates = state["num_timesteps"], state["n_updates"]
    return state
