"""DSRL benchmark at equal environment steps. Two suites:

- dense (default): base, dsrl_sac, dsrl_na, sac_scratch on Pendulum-v1 and Reacher-v5 (returns);
- manipulation: base, dsrl_sac, dsrl_na, dsrl_na_demos (demos in its replay), sac_her, rlpd on FetchPush-v4 and
  FetchPickAndPlace-v4 (sparse reward; success rate on fixed evaluation seeds).

Resumable and incremental: each (env, method, seed) trains in runs/bench_steering/<key>/ (resumable checkpoints)
and, once finished, its metrics are copied to benchmarks/results/steering/<key>.jsonl; finished keys are skipped.
Jobs run seed-major, so a cut-off benchmark still covers every method for the first seeds. Result files named
<method>_before_s<seed>.jsonl are earlier runs of <method> under its previous defaults, kept for comparison
(report them with --methods ... dsrl_na_before); they are not re-run.

    nice -n 10 python benchmarks/steering.py run --seeds 0 1 2 --steps 30000   (start it twice for two workers)
    python benchmarks/steering.py report      # table (markdown) and curves (PNG) from whatever has finished
    python benchmarks/steering.py run --suite manipulation --seeds 0 --steps 50000 --eval-every 5000 --eval-episodes 20
    python benchmarks/steering.py report --suite manipulation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "steering"
SUITES = {
    "dense": (("Pendulum-v1", "Reacher-v5"), ("base", "dsrl_sac", "dsrl_na", "sac_scratch")),
    "manipulation": (("FetchPush-v4", "FetchPickAndPlace-v4"), ("base", "dsrl_na", "sac_her", "rlpd", "dsrl_sac", "dsrl_na_demos")),
}
ENVS, METHODS = SUITES["dense"]
# Variants: TrainConfig overrides of a method. utd4: DSRL with 4 updates per decision = SAC-from-scratch's update
# count (optional, dense suite); dsrl_na_demos: DSRL-NA with the degraded demonstrations in its replay buffer.
VARIANTS = {"dsrl_sac_utd4": ("dsrl_sac", {"updates_per_decision": 4}),
            "dsrl_na_utd4": ("dsrl_na", {"updates_per_decision": 4}),
            "dsrl_na_demos": ("dsrl_na", {"offline_demos": True})}


def claim(key: str) -> bool:
    """Atomically claim a job for this process (a .claim file holding its pid); stale claims are taken over."""
    path = RESULTS / f"{key}.claim"
    if path.is_file():
        try:
            os.kill(int(path.read_text()), 0)
            return False  # another live worker has it
        except (ProcessLookupError, ValueError):
            path.unlink(missing_ok=True)
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    return True


def run_job(env_id: str, method: str, seed: int, steps: int, eval_every: int, eval_episodes: int, runs_dir: Path) -> None:
    key = f"{env_id}_{method}_s{seed}"
    result = RESULTS / f"{key}.jsonl"
    if result.is_file() or not claim(key):
        return
    try:
        _run_job(key, env_id, method, seed, steps, eval_every, eval_episodes, runs_dir)
    finally:
        (RESULTS / f"{key}.claim").unlink(missing_ok=True)


def _run_job(key: str, env_id: str, method: str, seed: int, steps: int, eval_every: int, eval_episodes: int, runs_dir: Path) -> None:
    result = RESULTS / f"{key}.jsonl"
    print(f"=== {key}", flush=True)
    if method == "base":
        # The frozen policy has no training: one evaluation, repeated at the budget's ends for the curves.
        from ddpo.steering.api import compare_base

        summary = compare_base(env_id, episodes=eval_episodes, noise_seed=seed)
        gaussian = summary["base_gaussian"]
        lines = [{"env_steps": s, "episodic_return_mean": gaussian["return_mean"],
                  "episodic_return_std": gaussian["return_std"], "base_zero": summary["base_zero"],
                  "expert": summary["expert"], **({"success_rate": gaussian["success_rate"]} if "success_rate" in gaussian else {})}
                 for s in (0, steps)]
        result.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return
    from ddpo.steering.train import TrainConfig, train

    method, overrides = VARIANTS.get(method, (method, {}))
    config = TrainConfig(env_id=env_id, method=method, steps=steps, seed=seed, eval_every=eval_every,
                         eval_episodes=eval_episodes, checkpoint_every=eval_every * 2, video=(seed == 0), **overrides)
    run_dir = train(config, runs_dir / key)
    shutil.copy(run_dir / "metrics.jsonl", result)
    if (run_dir / "rollout.gif").is_file():
        shutil.copy(run_dir / "rollout.gif", RESULTS / f"{key}.gif")


def load_results() -> dict[tuple[str, str], list[list[dict]]]:
    table: dict[tuple[str, str], list[list[dict]]] = {}
    for path in sorted(RESULTS.glob("*.jsonl")):
        env_id, rest = path.stem.split("_", 1)  # "Pendulum-v1_dsrl_sac_s0": env ids have no "_"
        method = rest.rsplit("_", 1)[0]
        table.setdefault((env_id, method), []).append([json.loads(line) for line in path.read_text().splitlines()])
    return table


def report() -> str:
    from ddpo.steering.envs import normalized_score

    table = load_results()
    rows = ["| env | method | seeds | env steps | return at half budget | final return (mean ± s.e.) | normalised score "
            "| gap closed vs base | steps to close 50 % of the gap | train env steps/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for env_id in ENVS:
        base_runs = table.get((env_id, "base"), [])
        base = np.mean([run[-1]["episodic_return_mean"] for run in base_runs]) if base_runs else None
        expert = base_runs[0][-1]["expert"]["return_mean"] if base_runs else None
        for method in METHODS + tuple(VARIANTS):
            runs = table.get((env_id, method), [])
            if not runs:
                continue
            finals = np.array([run[-1]["episodic_return_mean"] for run in runs])
            steps = sorted({run[-1]["env_steps"] for run in runs})
            se = finals.std(ddof=1) / np.sqrt(len(finals)) if len(finals) > 1 else float("nan")
            gap = (finals.mean() - base) / (expert - base) if base is not None else float("nan")
            half = np.mean([np.interp(run[-1]["env_steps"] / 2, [l["env_steps"] for l in run],
                                      [l["episodic_return_mean"] for l in run]) for run in runs])
            halfway = None if base is None else base + 0.5 * (expert - base)
            reached = [next((l["env_steps"] for l in run if l["episodic_return_mean"] >= halfway), None) for run in runs]
            reach = "-" if method == "base" or halfway is None else (
                " / ".join("never" if r is None else str(r) for r in reached))
            speeds = [run[-1]["env_steps_per_s"] for run in runs if "env_steps_per_s" in run[-1]]
            speed = f"{np.mean(speeds):.0f}" if speeds else "-"
            rows.append(f"| {env_id} | {method} | {len(runs)} | {'/'.join(map(str, steps))} | {half:.1f} | {finals.mean():.1f} ± {se:.1f} "
                        f"| {normalized_score(env_id, finals.mean()):.2f} | {gap:.2f} | {reach} | {speed} |")
        if base_runs:
            zero = base_runs[0][-1]["base_zero"]["return_mean"]
            rows.append(f"| {env_id} | base (w = 0) | 1 | - | - | {zero:.1f} | {normalized_score(env_id, zero):.2f} | "
                        f"{(zero - base) / (expert - base):.2f} | - | - |")
            rows.append(f"| {env_id} | scripted expert | 1 | - | - | {expert:.1f} | {normalized_score(env_id, expert):.2f} | 1.00 | - | - |")
    return "\n".join(rows)


def report_success(envs: tuple[str, ...], methods: tuple[str, ...]) -> str:
    """Sparse-reward suite: success rate on the fixed evaluation seeds, against the base policy (w ~ N(0, I))."""
    table = load_results()
    rows = ["| env | method | seeds | env steps | success at half budget | final success (mean ± s.e.) | vs base (points) "
            "| last 5 evaluations (mean) | best success seen | wall-clock per run (s) | train env steps/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for env_id in envs:
        base_runs = table.get((env_id, "base"), [])
        base = np.mean([run[-1]["success_rate"] for run in base_runs]) if base_runs else None
        for method in methods:
            runs = table.get((env_id, method), [])
            if not runs:
                continue
            finals = np.array([run[-1]["success_rate"] for run in runs])
            steps = sorted({run[-1]["env_steps"] for run in runs})
            se = finals.std(ddof=1) / np.sqrt(len(finals)) if len(finals) > 1 else float("nan")
            half = np.mean([np.interp(run[-1]["env_steps"] / 2, [l["env_steps"] for l in run],
                                      [l["success_rate"] for l in run]) for run in runs])
            best = np.mean([max(l["success_rate"] for l in run) for run in runs])
            # One evaluation on 20 episodes has a standard error near 0.1; the last five are a steadier reading.
            last5 = np.mean([np.mean([l["success_rate"] for l in run[-5:]]) for run in runs])
            delta = "-" if base is None or method == "base" else f"{100 * (finals.mean() - base):+.0f}"
            walls = [run[-1]["wall_s"] for run in runs if "wall_s" in run[-1]]
            speeds = [run[-1]["env_steps_per_s"] for run in runs if "env_steps_per_s" in run[-1]]
            wall = f"{np.mean(walls):.0f}" if walls else "-"
            speed = f"{np.mean(speeds):.0f}" if speeds else "-"
            rows.append(f"| {env_id} | {method} | {len(runs)} | {'/'.join(map(str, steps))} | {half:.2f} | "
                        f"{finals.mean():.2f} ± {se:.2f} | {delta} | {last5:.2f} | {best:.2f} | {wall} | {speed} |")
        if base_runs:
            last = base_runs[0][-1]
            for name, key in (("base (w = 0)", "base_zero"), ("scripted expert", "expert")):
                rows.append(f"| {env_id} | {name} | 1 | - | - | {last[key]['success_rate']:.2f} | - | - | - | - | - |")
    return "\n".join(rows)


def plot(path: Path, envs: tuple[str, ...] = ENVS, methods: tuple[str, ...] = METHODS + tuple(VARIANTS),
         metric: str = "episodic_return_mean") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = load_results()
    figure, axes = plt.subplots(1, len(envs), figsize=(7.5 * len(envs), 4))
    for axis, env_id in zip(np.atleast_1d(axes), envs):
        for method in methods:
            runs = table.get((env_id, method), [])
            if not runs:
                continue
            grid = np.unique(np.concatenate([[line["env_steps"] for line in run] for run in runs]))
            curves = np.array([np.interp(grid, [l["env_steps"] for l in run], [l[metric] for l in run]) for run in runs])
            mean = curves.mean(0)
            se = curves.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
            axis.plot(grid, mean, label=f"{method} (n={len(runs)})")
            axis.fill_between(grid, mean - se, mean + se, alpha=0.2)
        axis.set_title(env_id)
        axis.set_xlabel("environment steps")
        axis.set_ylabel("evaluation " + ("success rate" if metric == "success_rate" else "return"))
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: curves stay visible
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--suite", choices=list(SUITES), default="dense")
    parser.add_argument("--envs", nargs="+", default=None, help="default: the suite's")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the suite's")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--runs-dir", default="runs/bench_steering")
    args = parser.parse_args(argv)
    args.envs = args.envs or list(SUITES[args.suite][0])
    args.methods = args.methods or list(SUITES[args.suite][1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.command == "report" and args.suite == "manipulation":
        envs, methods = tuple(args.envs), tuple(args.methods)
        text = report_success(envs, methods)
        (RESULTS.parent / "steering_manipulation.md").write_text(text + "\n")
        plot(RESULTS.parent / "steering_manipulation_curves.png", envs, methods, metric="success_rate")
        print(text)
        return 0
    if args.command == "report":
        text = report()
        (RESULTS.parent / "steering.md").write_text(text + "\n")
        plot(RESULTS.parent / "steering_curves.png")
        print(text)
        return 0
    import torch

    torch.set_num_threads(1)
    jobs = [(env_id, method, seed) for seed in args.seeds for env_id in args.envs for method in args.methods]
    for env_id, method, seed in jobs:  # start several processes to run jobs in parallel: each claims its own
        run_job(env_id, method, seed, args.steps, args.eval_every, args.eval_episodes, Path(args.runs_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
