"""`ddpo steer`: demos, bc, train, eval, list."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _setup() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # small MLPs: one thread is faster than two on shared cores


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo steer", description="Steer frozen diffusion control policies (DSRL).")
    commands = parser.add_subparsers(dest="command", required=True)

    demos = commands.add_parser("demos", help="collect degraded demonstrations from the scripted expert")
    demos.add_argument("env")
    demos.add_argument("--out", default=None, help="output .npz (default: runs/demos/ENV.npz)")
    demos.add_argument("--seed", type=int, default=0)

    bc = commands.add_parser("bc", help="behaviour-clone a diffusion policy on demonstrations")
    bc.add_argument("env")
    bc.add_argument("--demos", default=None, help=".npz from `ddpo steer demos` (default: collect now)")
    bc.add_argument("--out", default=None, help="policy folder (default: runs/policies/ENV)")
    bc.add_argument("--steps", type=int, default=None, help="gradient steps (default: the recipe's)")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--episodes", type=int, default=20, help="evaluation episodes for the report at the end")

    train = commands.add_parser("train", help="train dsrl_sac, dsrl_na, sac_scratch, sac_her or rlpd; resumes an existing run")
    train.add_argument("--env", required=True)
    train.add_argument("--method", required=True, choices=["dsrl_sac", "dsrl_na", "sac_scratch", "sac_her", "rlpd"],
                       help="sac_her: SAC + hindsight relabelling (Fetch tasks); rlpd: SAC, half of each batch from demos")
    train.add_argument("--steps", type=int, default=30_000, help="environment steps, warm start included")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--policy", default=None, help="base policy folder (default: the shipped one)")
    train.add_argument("--noise-bound", type=float, default=1.5, help="b of the latent action box (-b, b)")
    train.add_argument("--warm-start-steps", type=int, default=1000)
    train.add_argument("--eval-every", type=int, default=2500)
    train.add_argument("--eval-episodes", type=int, default=None,
                       help="episodes per evaluation, on fixed seeds (default: 20 on Fetch tasks, 10 elsewhere)")
    train.add_argument("--checkpoint-every", type=int, default=5000)
    train.add_argument("--updates-per-decision", type=int, default=1)
    train.add_argument("--gamma", type=float, default=None,
                       help="DSRL discount per environment step (default: the env's; Fetch 0.98, others 0.99 per 4-step chunk)")
    train.add_argument("--init-alpha", type=float, default=None,
                       help="DSRL initial temperature of the noise actor's regulariser (default: the env's; Fetch 0.1 "
                            "on a KL to N(0, I), others 1.0 on entropy)")
    train.add_argument("--offline-demos", action="store_true", help="dsrl_na: add degraded demos to the replay buffer")
    train.add_argument("--no-video", action="store_true")
    train.add_argument("--name", default=None, help="run folder name (default: ENV_METHOD_sSEED)")
    train.add_argument("--runs-dir", default="runs")

    evaluate = commands.add_parser("eval", help="evaluate a run folder against its base policy")
    evaluate.add_argument("run")
    evaluate.add_argument("--episodes", type=int, default=None, help="default: as many as the run evaluated with")
    evaluate.add_argument("--no-video", action="store_true")

    listing = commands.add_parser("list", help="list shipped base policies and run folders")
    listing.add_argument("--runs-dir", default="runs")
    return parser


def _demos(args) -> int:
    from .base import make_demos

    out = Path(args.out or f"runs/demos/{args.env}.npz")
    demos = make_demos(args.env, seed=args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    demos.save(out)
    success = "" if demos.episode_successes is None else f", success {demos.episode_successes.mean():.0%}"
    print(f"{len(demos.obs)} chunks from {len(demos.episode_returns)} episodes, "
          f"mean return {demos.episode_returns.mean():.2f}{success} -> {out}")
    return 0


def _bc(args) -> int:
    from .api import compare_base
    from .base import make_demos, train_base_policy
    from .experts import Demos

    demos = Demos.load(args.demos) if args.demos else make_demos(args.env, seed=args.seed)
    policy = train_base_policy(args.env, demos, seed=args.seed, steps=args.steps, log_every=1000)
    out = policy.save_pretrained(args.out or f"runs/policies/{args.env}")
    print(f"saved {out}")
    print(json.dumps(compare_base(args.env, str(out), episodes=args.episodes), indent=2))
    return 0


def _train(args) -> int:
    from ddpo.config import RUN_NAME, RUN_NAME_RULE

    from .train import TrainConfig, train

    if args.name is not None and not RUN_NAME.fullmatch(args.name):
        raise ValueError(f"--name {args.name!r}: {RUN_NAME_RULE}; the run folder is --runs-dir/NAME "
                         "(set --runs-dir to choose where)")

    config = TrainConfig(
        env_id=args.env, method=args.method, steps=args.steps, seed=args.seed, policy=args.policy,
        noise_bound=args.noise_bound, warm_start_steps=args.warm_start_steps, eval_every=args.eval_every,
        eval_episodes=args.eval_episodes, checkpoint_every=args.checkpoint_every,
        updates_per_decision=args.updates_per_decision, offline_demos=args.offline_demos, video=not args.no_video,
        gamma=args.gamma, init_alpha=args.init_alpha,
    )
    run_dir = Path(args.runs_dir) / (args.name or f"{args.env}_{args.method}_s{args.seed}")
    print(f"run folder: {train(config, run_dir)}")
    return 0


def _eval(args) -> int:
    from .api import evaluate_run

    print(json.dumps(evaluate_run(args.run, episodes=args.episodes, video=not args.no_video), indent=2))
    return 0


def _list(args) -> int:
    from .api import list_base_policies, list_runs

    print(json.dumps({"base_policies": list_base_policies(), "runs": list_runs(args.runs_dir)}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for flag in ("episodes", "eval_episodes", "steps"):  # argparse-style errors (exit 2) before anything loads
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    _setup()
    handlers = {"demos": _demos, "bc": _bc, "train": _train, "eval": _eval, "list": _list}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ddpo steer {args.command}: error: {error}", file=sys.stderr)
        return 2
