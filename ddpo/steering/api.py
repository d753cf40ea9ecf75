"""Functions for the UI (and notebooks): list base policies and runs, compare base and steered episodes.

Everything returns plain Python data (floats, lists, dicts, paths) so a Gradio tab can show it directly.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .base import PRETRAINED_DIR
from .evaluate import EVAL_SEED, ChunkActor, base_actor, evaluate, evaluate_episodes, record_comparison, steered_actor


def list_base_policies() -> list[dict]:
    """Shipped base policies: [{"env_id", "path", "horizon", "obs_dim", "act_dim"}]."""
    found = []
    for folder in sorted(PRETRAINED_DIR.iterdir()) if PRETRAINED_DIR.is_dir() else []:
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            found.append({"env_id": folder.name, "path": str(folder), **{k: config[k] for k in ("horizon", "obs_dim", "act_dim")}})
    return found


def list_runs(runs_dir: str | Path = "runs") -> list[dict]:
    """Run folders under `runs_dir` (those with a config.json and a method): name, path, config, last metrics line."""
    runs = []
    for config_path in sorted(Path(runs_dir).glob("*/config.json")):
        config = json.loads(config_path.read_text())
        if "method" not in config:
            continue
        metrics_path = config_path.parent / "metrics.jsonl"
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        runs.append({
            "name": config_path.parent.name, "path": str(config_path.parent), "env_id": config["env_id"],
            "method": config["method"], "seed": config["seed"], "last": json.loads(lines[-1]) if lines else None,
        })
    return runs


def load_run_actor(run_dir: str | Path) -> tuple[dict, ChunkActor]:
    """The trained agent of a run folder as a ChunkActor (deterministic), with the run's config dict."""
    from .baselines import RAW_METHODS, make_raw_model, raw_actor
    from .train import TrainConfig, dsrl_sac_env, load_base_policy

    run_dir = Path(run_dir)
    if run_dir.name == "checkpoint":
        run_dir = run_dir.parent
    if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint" / "state.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder with a checkpoint (expected config.json and checkpoint/)")
    config = json.loads((run_dir / "config.json").read_text())
    if config["method"] in RAW_METHODS:
        from .sb3 import load_sac

        # Acting needs only the networks: rlpd's are plain SAC's (its demonstrations live in the replay buffer).
        method = "sac_scratch" if config["method"] == "rlpd" else config["method"]
        _, model = make_raw_model(method, config["env_id"], config["seed"], config["hidden"], config["layers"], 0, buffer_size=1)
        load_sac(model, run_dir / "checkpoint", with_buffer=False)
        return config, raw_actor(method, model)
    policy = load_base_policy(config["env_id"], config["policy"])
    if config["method"] == "dsrl_sac":
        from .sb3 import load_sac, make_sac

        # Runs from before observations were standardised (no "normalize_obs" in config.json) saw raw ones.
        env = dsrl_sac_env(TrainConfig(**{"normalize_obs": False, **config}).resolved(), policy)
        model = make_sac(env, config["seed"], config["hidden"], config["layers"], buffer_size=1)
        load_sac(model, run_dir / "checkpoint", with_buffer=False)
        return config, steered_actor(policy, lambda obs: model.predict(env.observation(obs), deterministic=True)[0])
    from .dsrl_na import DSRLNA, DSRLNAConfig

    agent = DSRLNA(policy, policy.obs_dim, DSRLNAConfig(noise_bound=config["noise_bound"], hidden=config["hidden"], layers=config["layers"]))
    agent.load(run_dir / "checkpoint", with_optimizers=False)
    return config, steered_actor(policy, lambda obs: agent.act(obs, deterministic=True))


def run_episodes(
    env_id: str,
    policy: str | None = None,
    steering_checkpoint: str | None = None,
    n: int = 5,
    seed: int = 0,
    render: bool = True,
    video_dir: str | None = None,
) -> tuple[list[float], list[float] | None, str | None]:
    """Run the base policy (w ~ N(0, I)) and, given a run folder, the steered agent on seeds seed .. seed + n - 1.

    policy: base policy folder (None = the shipped one for env_id). Returns (returns_base, returns_steered or
    None, path of a side-by-side GIF of the first episode or None when render=False).
    """
    from .train import load_base_policy

    base_policy = load_base_policy(env_id, policy)
    actors = {"base": base_actor(base_policy, "gaussian", seed)}
    if steering_checkpoint is not None:
        config, actors["steered"] = load_run_actor(steering_checkpoint)
        if config["env_id"] != env_id:
            raise ValueError(f"the run {steering_checkpoint} was trained on {config['env_id']}, not {env_id}")
    returns = {name: evaluate(env_id, act, n, seed=seed).tolist() for name, act in actors.items()}
    video_path = None
    if render:
        folder = Path(video_dir or tempfile.mkdtemp(prefix="ddpo_steer_"))
        video_path, _ = record_comparison(env_id, actors, folder / f"{env_id}_seed{seed}.gif", seed=seed)
        video_path = str(video_path)
    return returns["base"], returns.get("steered"), video_path


def compare_base(env_id: str, policy: str | None = None, episodes: int = 10, noise_seed: int = 0) -> dict:
    """Base policy with w ~ N(0, I) (noise drawn from `noise_seed`) and w = 0, and the scripted expert,
    on the fixed evaluation seeds."""
    from .envs import REFERENCE_RETURNS, make_env, normalized_score
    from .experts import EXPERTS
    from .train import load_base_policy

    base_policy = load_base_policy(env_id, policy)
    actors = {
        "base_gaussian": base_actor(base_policy, "gaussian", noise_seed),
        "base_zero": base_actor(base_policy, "zero"),
        "expert": lambda obs: EXPERTS[env_id](obs)[None],
    }
    summary = {}
    for name, act in actors.items():
        returns, success_rate = evaluate_episodes(env_id, act, episodes)
        summary[name] = {"return_mean": float(returns.mean()), "return_std": float(returns.std())}
        if success_rate is not None:
            summary[name]["success_rate"] = success_rate
        if env_id in REFERENCE_RETURNS:
            summary[name]["normalized_score"] = normalized_score(env_id, float(returns.mean()))
    return summary


def evaluate_run(run_dir: str | Path, episodes: int | None = None, video: bool = True) -> dict:
    """Evaluate a run's agent and its base on the fixed evaluation seeds (`episodes`: default, as many as the run's
    own evaluations used); optionally write rollout.gif."""
    from .baselines import RAW_METHODS

    config, steered = load_run_actor(run_dir)
    episodes = episodes or config.get("eval_episodes") or 10
    returns, success_rate = evaluate_episodes(config["env_id"], steered, episodes, seed=EVAL_SEED)
    summary = {"run": str(run_dir), "method": config["method"], "episodes": episodes,
               "steered_return_mean": float(returns.mean()), "steered_return_std": float(returns.std())}
    if success_rate is not None:
        summary["steered_success_rate"] = success_rate
    if config["method"] not in RAW_METHODS:
        from .train import load_base_policy

        base_act = base_actor(load_base_policy(config["env_id"], config["policy"]), "gaussian")
        base, base_success = evaluate_episodes(config["env_id"], base_act, episodes)
        summary.update(base_return_mean=float(base.mean()), base_return_std=float(base.std()))
        if base_success is not None:
            summary["base_success_rate"] = base_success
    if video:
        from .train import TrainConfig, write_video

        summary["video"] = str(write_video(TrainConfig(**config), Path(run_dir), steered))
    return summary
