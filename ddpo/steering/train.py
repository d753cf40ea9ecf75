"""`ddpo steer train`: one run of dsrl_sac, dsrl_na, sac_scratch, sac_her or rlpd, with metrics, checkpoints and a rollout GIF.

A run folder holds config.json, metrics.jsonl (one line per evaluation), checkpoint/ (resumable; a resumed
run starts a fresh episode) and rollout.gif (base against steered, same seed). Budgets count every
environment step, the warm start included.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .envs import make_env, normalized_score, REFERENCE_RETURNS
from .baselines import RAW_METHODS
from .evaluate import ChunkActor, base_actor, evaluate_episodes, record_comparison, steered_actor
from .noise_env import AgentView, NoiseActionEnv, check_policy_matches
from .policy import policy_obs_stats

METHODS = ("dsrl_sac", "dsrl_na", *RAW_METHODS)

# The DSRL learners' discount and entropy temperature. Dense tasks (Pendulum, Reacher, the toy): 0.99 per
# 4-step decision, the soft Q of SAC, temperature from 1 (what the dense benchmark measured). Fetch: see
# ENV_DSRL_DEFAULTS and docs/steering.md ("Why DSRL-NA degraded on FetchPush, and the fix").
DSRL_DEFAULTS: dict[str, float | bool | str] = {"gamma": 0.99**0.25, "init_alpha": 1.0, "backup_entropy": True,
                                          "reward_shift": 0.0, "regularizer": "entropy"}
# Fetch (sparse -1/0 reward, 50-step time limit, never terminates): a 50-step horizon (0.98 per step, HER's
# Fetch discount, instead of ~400 steps); rewards shifted to 0/1 so that an untrained critic (outputs ~0) is
# pessimistic, not optimistic, about chunks it has not seen (the shift changes no policy's ranking: there is no
# termination); and the noise actor regularised toward the base policy's own noise N(0, I) (KL, temperature
# from 0.1) rather than toward the uniform distribution over the box. Measured in docs/steering.md.
_FETCH_DSRL = {"gamma": 0.98, "init_alpha": 0.1, "reward_shift": 1.0, "regularizer": "base_kl"}
ENV_DSRL_DEFAULTS: dict[str, dict[str, float | bool | str]] = {"FetchPush-v4": _FETCH_DSRL, "FetchPickAndPlace-v4": _FETCH_DSRL}
# Evaluation episodes per metrics line: 10, or 20 on Fetch, where a success rate is a coarse number (what the
# documented tables used). Evaluation draws no random numbers, so this never changes what a run trains.
EVAL_EPISODES, ENV_EVAL_EPISODES = 10, {"FetchPush-v4": 20, "FetchPickAndPlace-v4": 20}


@dataclass
class TrainConfig:
    env_id: str
    method: str
    steps: int = 30_000  # environment steps, warm start included
    seed: int = 0
    policy: str | None = None  # base policy folder; None = the one shipped for env_id
    noise_bound: float = 1.5
    warm_start_steps: int = 1000
    eval_every: int = 2500
    eval_episodes: int | None = None  # None = the environment's default (ENV_EVAL_EPISODES, else EVAL_EPISODES)
    checkpoint_every: int = 5000
    hidden: int = 256
    layers: int = 2
    updates_per_decision: int = 1  # gradient updates per decision (one action chunk), dsrl_sac and dsrl_na
    offline_demos: bool = False  # dsrl_na: put degraded demonstrations into the replay buffer
    video: bool = True
    # DSRL learners; None = the environment's default (DSRL_DEFAULTS, ENV_DSRL_DEFAULTS), filled in by resolved().
    gamma: float | None = None  # discount per environment step (a chunk of k steps: gamma ** k)
    init_alpha: float | None = None  # initial entropy temperature of the noise actor (then tuned automatically)
    backup_entropy: bool | None = None  # dsrl_na: entropy bonus in Q^A's TD target (soft Q) or not
    reward_shift: float | None = None  # DSRL: added to every step's reward the learner sees (not in metrics)
    regularizer: str | None = None  # dsrl_na: "entropy" (SAC) or "base_kl" (KL to N(0, I)); see DSRLNAConfig
    normalize_obs: bool = True  # DSRL: the learner sees observations standardised with the base policy's statistics

    def resolved(self) -> "TrainConfig":
        """This config with every None replaced by the environment's default (what config.json records)."""
        defaults = {**DSRL_DEFAULTS, **ENV_DSRL_DEFAULTS.get(self.env_id, {}),
                    "eval_episodes": ENV_EVAL_EPISODES.get(self.env_id, EVAL_EPISODES)}
        return replace(self, **{key: value for key, value in defaults.items() if getattr(self, key) is None})

    def validate(self) -> None:
        """Every check that can fail, before the run folder is created (a half-written folder would block the name)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not (math.isfinite(self.noise_bound) and self.noise_bound > 0):
            raise ValueError(f"--noise-bound must be a finite number > 0, got {self.noise_bound}")
        for flag, value in [("--steps", self.steps), ("--eval-every", self.eval_every),
                            ("--eval-episodes", self.eval_episodes), ("--checkpoint-every", self.checkpoint_every),
                            ("--updates-per-decision", self.updates_per_decision), ("hidden", self.hidden),
                            ("layers", self.layers)]:
            if value is not None and value < 1:  # None: not resolved yet (the environment's default)
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.gamma is not None and not 0.0 < self.gamma < 1.0:
            raise ValueError(f"--gamma (per environment step) must be in (0, 1), got {self.gamma}")
        if self.init_alpha is not None and not (math.isfinite(self.init_alpha) and self.init_alpha > 0):
            raise ValueError(f"--init-alpha must be a finite number > 0, got {self.init_alpha}")
        if self.regularizer is not None and self.regularizer not in ("entropy", "base_kl"):
            raise ValueError(f"regularizer must be 'entropy' or 'base_kl', got {self.regularizer!r}")
        if self.warm_start_steps < 0:
            raise ValueError(f"--warm-start-steps must be >= 0, got {self.warm_start_steps}")
        if self.steps <= self.warm_start_steps:
            raise ValueError(f"--steps {self.steps} must be larger than --warm-start-steps {self.warm_start_steps}: "
                             "the budget counts the warm start, so no update would run")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, {2**32 - 1}], got {self.seed}")
        if self.offline_demos and self.method != "dsrl_na":
            raise ValueError(f"--offline-demos is for dsrl_na (rlpd always uses the demonstrations), not {self.method}")
        from .base import RECIPES
        from .fetch import FETCH_ENVS

        if self.method == "sac_her" and self.env_id not in FETCH_ENVS:
            raise ValueError(f"sac_her needs a goal-conditioned task ({', '.join(FETCH_ENVS)}), not {self.env_id}")
        if (self.method == "rlpd" or self.offline_demos) and self.env_id not in RECIPES:
            raise ValueError(f"{self.env_id} has no scripted demonstrator for rlpd / --offline-demos; "
                             f"choose one of: {', '.join(RECIPES)}")


def load_base_policy(env_id: str, folder: str | None):
    """The frozen diffusion policy for `env_id`: `folder`, or the shipped one. Checks sizes against the env."""
    from .base import pretrained_path
    from .policy import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained(folder or pretrained_path(env_id))
    check_policy_matches(make_env(env_id), policy)
    trained_for = policy.config.env_id
    if trained_for is not None and trained_for != env_id:
        raise ValueError(f"the policy in {folder} was trained for {trained_for}, not {env_id}")
    return policy


class Progress:
    """Evaluates, logs metrics.jsonl and checkpoints on an environment-step schedule."""

    def __init__(self, config: TrainConfig, run_dir: Path, actor: Callable[[], ChunkActor], save: Callable[[dict], None], start: int,
                 diagnostics: Callable[[], dict] | None = None):
        self.config, self.run_dir, self.actor, self.save = config, run_dir, actor, save
        self.diagnostics = diagnostics  # extra training statistics for each metrics line (e.g. critic scale)
        self.next_eval = 0 if start == 0 else (start // config.eval_every + 1) * config.eval_every
        self.next_checkpoint = (start // config.checkpoint_every + 1) * config.checkpoint_every
        self.start_steps, self.start_time, self.eval_seconds = start, time.time(), 0.0
        self.last_logged = -1

    def __call__(self, env_steps: int, decisions: int, train_returns: list[float], final: bool = False) -> None:
        if env_steps >= self.next_eval or (final and env_steps != self.last_logged):
            self.log(env_steps, decisions, train_returns)
            self.next_eval = (env_steps // self.config.eval_every + 1) * self.config.eval_every
        if env_steps >= self.next_checkpoint or final:
            self.save({"env_steps": env_steps, "decisions": decisions})
            self.next_checkpoint = (env_steps // self.config.checkpoint_every + 1) * self.config.checkpoint_every

    def log(self, env_steps: int, decisions: int, train_returns: list[float]) -> None:
        started, self.last_logged = time.time(), env_steps
        returns, success_rate = evaluate_episodes(self.config.env_id, self.actor(), self.config.eval_episodes)
        self.eval_seconds += time.time() - started
        train_seconds = max(time.time() - self.start_time - self.eval_seconds, 1e-9)
        record = {
            "env_steps": env_steps,
            "decisions": decisions,
            "episodic_return_mean": float(returns.mean()),
            "episodic_return_std": float(returns.std()),
            **({} if success_rate is None else {"success_rate": success_rate}),
            "train_return_mean_last10": float(np.mean(train_returns[-10:])) if train_returns else None,
            "env_steps_per_s": (env_steps - self.start_steps) / train_seconds,
            "wall_s": time.time() - self.start_time,
        }
        if self.diagnostics is not None:
            record["train"] = self.diagnostics()
        if self.config.env_id in REFERENCE_RETURNS:
            record["normalized_score"] = normalized_score(self.config.env_id, record["episodic_return_mean"])
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def _trim_metrics(run_dir: Path, env_steps: int) -> int:
    """On resume, drop lines logged after the checkpoint (they will be logged again); returns the last
    logged env_steps (-1 if none) so that step is not logged twice."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return -1
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["env_steps"] <= env_steps]
    path.write_text("".join(line + "\n" for line in lines))
    return json.loads(lines[-1])["env_steps"] if lines else -1


def train(config: TrainConfig, run_dir: str | Path) -> Path:
    """Train (or resume) the run in `run_dir`; returns the folder."""
    config = config.resolved()
    config.validate()
    make_env(config.env_id)  # unknown ids and mismatched policies fail here, before anything is written
    if config.method not in RAW_METHODS:
        load_base_policy(config.env_id, config.policy)
    if config.method != "dsrl_na":
        import stable_baselines3  # noqa: F401  (a missing extra fails here, before the folder is written)
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint"
    saved_config = run_dir / "config.json"
    if saved_config.is_file() and (checkpoint / "state.json").is_file():  # without a checkpoint: nothing to resume
        previous = json.loads(saved_config.read_text())
        if "normalize_obs" not in previous:  # config.json from before 2026-12-01
            # DSRL-SAC then saw raw observations, so it resumes with them; a DSRL-NA checkpoint holds its own statistics.
            previous["normalize_obs"] = config.normalize_obs if config.method == "dsrl_na" else False
            config = replace(config, normalize_obs=previous["normalize_obs"])
        # A resumed run may change its budget, whether it renders and how many episodes evaluate it (evaluation
        # draws no random numbers: training is the same).
        free = ("steps", "video", "eval_episodes")
        if {k: v for k, v in previous.items() if k not in free} != {k: v for k, v in asdict(config).items() if k not in free}:
            raise ValueError(f"{run_dir} holds a run with a different config; pick a new --name or use the same options")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (checkpoint / "state.json").is_file():  # a fresh start: drop what a run stopped before its first save logged
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    saved_config.write_text(json.dumps(asdict(config), indent=2))
    torch.manual_seed(config.seed)
    if config.method == "dsrl_na":
        from .train_na import train_dsrl_na

        actor_for_video = train_dsrl_na(config, run_dir, checkpoint)
    else:
        actor_for_video = _train_sb3(config, run_dir, checkpoint)
    if config.video:
        write_video(config, run_dir, actor_for_video)
    return run_dir


def write_video(config: TrainConfig, run_dir: Path, steered: ChunkActor) -> Path:
    """rollout.gif: left the base policy (w ~ N(0, I)), right the trained agent; same seed."""
    if config.method in RAW_METHODS:
        base = lambda obs: np.asarray(make_env(config.env_id).action_space.sample())[None]  # noqa: E731
        actors = {"random": base, config.method: steered}
    else:
        actors = {"base": base_actor(load_base_policy(config.env_id, config.policy), "gaussian"), config.method: steered}
    path, returns = record_comparison(config.env_id, actors, run_dir / "rollout.gif")
    (run_dir / "rollout.json").write_text(json.dumps(returns))
    return path


def dsrl_sac_env(config: TrainConfig, policy) -> AgentView:
    """The environment DSRL-SAC's SB3 agent trains on (and whose observation() its actor applies when acting)."""
    stats = policy_obs_stats(policy) if config.normalize_obs else None
    noise_env = NoiseActionEnv(make_env(config.env_id), policy, config.noise_bound)
    return AgentView(noise_env, stats, config.gamma, config.reward_shift)


def _train_sb3(config: TrainConfig, run_dir: Path, checkpoint: Path) -> ChunkActor:
    from stable_baselines3.common.callbacks import BaseCallback

    from .baselines import make_raw_model, raw_actor
    from .sb3 import load_sac, make_sac, save_sac, warm_start

    if config.method == "dsrl_sac":
        policy = load_base_policy(config.env_id, config.policy)
        env = dsrl_sac_env(config, policy)
        env_steps = lambda: env.env_steps  # noqa: E731
        train_returns = env.episode_returns
        # DSRL-SAC: updates_per_decision gradient steps per chunk (no SB3 warm-up: ours is w ~ N(0, I)).
        # SB3 discounts per decision by gamma ** H; AgentView discounts per step inside the chunk.
        model = make_sac(env, config.seed, config.hidden, config.layers, 0, gradient_steps=config.updates_per_decision,
                         gamma=config.gamma**policy.horizon, ent_coef=f"auto_{config.init_alpha}")
    else:  # raw actions, one gradient step per environment step after SB3's uniform warm-up
        env, model = make_raw_model(config.method, config.env_id, config.seed, config.hidden, config.layers,
                                    config.warm_start_steps)
        env_steps = lambda: model.num_timesteps  # noqa: E731
        train_returns = []

    def actor() -> ChunkActor:
        if config.method == "dsrl_sac":
            return steered_actor(policy, lambda obs: model.predict(env.observation(obs), deterministic=True)[0])
        return raw_actor(config.method, model)

    progress = Progress(config, run_dir, actor, lambda s: save_sac(model, checkpoint, s), 0)
    warm_decisions = 0  # decisions taken outside model.learn (the N(0, I) warm start), not in num_timesteps
    if (checkpoint / "state.json").is_file():
        state = load_sac(model, checkpoint)
        warm_decisions = state["decisions"] - state["num_timesteps"]
        if config.method == "dsrl_sac":
            env.env_steps = state["env_steps"]
        last_logged = _trim_metrics(run_dir, state["env_steps"])
        progress = Progress(config, run_dir, actor, lambda s: save_sac(model, checkpoint, s), state["env_steps"])
        progress.last_logged = last_logged
        print(f"resumed {run_dir} at {state['env_steps']} environment steps", flush=True)
    elif config.method == "dsrl_sac":
        warm_decisions = warm_start(model, env, config.warm_start_steps, config.seed)

    class Hook(BaseCallback):
        def _on_step(self) -> bool:
            if config.method in RAW_METHODS:
                for info in self.locals.get("infos", []):
                    if "episode" in info:
                        train_returns.append(float(info["episode"]["r"]))
            progress(env_steps(), warm_decisions + model.num_timesteps, train_returns)
            return env_steps() < config.steps

    if env_steps() < config.steps:
        model.learn(total_timesteps=10**9, callback=Hook(), reset_num_timesteps=False)
    progress(env_steps(), warm_decisions + model.num_timesteps, train_returns, final=True)
    return actor()
