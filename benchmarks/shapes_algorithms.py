"""The DDPO paper's algorithm comparison in miniature, on the Shapes world's models, at equal reward queries.

Every variant trains from a shipped Shapes model with its alignment preset (`shapes` -> configs/shapes_alignment.yaml,
`shapes-flow` -> configs/shapes_flow_alignment.yaml) changed only as VARIANTS says, for the same epochs, samples per
epoch (so the same reward queries) and seeds. Policy-gradient variants take 2 optimizer steps per epoch (so the PPO
ratio moves off 1 and the clip acts) except `ddpo_sf`, which is on-policy and takes 1.

Each run evaluates itself every `--eval-every` epochs with the Shapes evaluator as its judge
(`reward.eval_name=shapes_accuracy`, all 168 prompts once, deterministic sampler): rare- and common-pair accuracy
against reward queries, from one run. At the end `ddpo shapes eval --per-pair 16` measures the final checkpoint at
the training sampler and at a deterministic one (eta 0, 20 steps). Writes
    benchmarks/results/shapes_algorithms.json   per run: reward per epoch, judge curves, final accuracies, wall time
    benchmarks/results/shapes_algorithms.md     table: mean ± std over seeds
    benchmarks/results/shapes_algorithms.png    rare and common accuracy (judge) against reward queries

    python benchmarks/shapes_algorithms.py                            # the UNet variants x 3 seeds, 2 at a time
    python benchmarks/shapes_algorithms.py --model shapes-flow --append
    python benchmarks/shapes_algorithms.py --epochs 10 --seeds 0 --variants ddpo_is   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TWO_STEPS = ["train.gradient_accumulation_steps=1"]  # 32 samples per epoch in 2 optimizer steps of 16
VARIANTS: dict[str, dict[str, list[str]]] = {
    "shapes": {
        "ddpo_is": ["train.algorithm=ddpo_is", *TWO_STEPS],
        "ddpo_sf": ["train.algorithm=ddpo_sf", "train.gradient_accumulation_steps=2"],  # on-policy: 1 step
        "rwr": ["train.algorithm=rwr", *TWO_STEPS],
        "rwr_sparse": ["train.algorithm=rwr_sparse", *TWO_STEPS],
        "ddpo_is_kl": ["train.algorithm=ddpo_is", *TWO_STEPS, "train.kl_coef=0.001"],
        "ddpo_is_groups": ["train.algorithm=ddpo_is", *TWO_STEPS, "sample.images_per_prompt=4"],
        "nft": ["train.algorithm=nft", *TWO_STEPS],
    },
    "shapes-flow": {
        "grpo_fast": [],  # the preset: Flow-GRPO with its SDE window
        "grpo": ["sample.sde_window=0"],  # every step stochastic and trained
        "nft": ["train.algorithm=nft"],
    },
}
PRESET = {"shapes": "shapes_alignment", "shapes-flow": "shapes_flow_alignment"}
RESULTS = Path(__file__).parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
GAIN = 0.15  # "reward queries to +15 points": the first evaluation whose rare accuracy (judge) is this far above


def _evaluate(model: str, lora: Path | None, out: Path, deterministic: bool) -> dict:
    extra = ["--eta", "0", "--steps", "20"] if deterministic else []
    if not out.is_file():
        cmd = [sys.executable, "-m", "ddpo.cli", "shapes", "eval", "--model", model, "--per-pair", "16", "--json",
               str(out), *extra, *(["--lora", str(lora)] if lora else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    result = json.loads(out.read_text())
    return {"rare": result["rare_accuracy"], "common": result["common_accuracy"]}


def run_one(model: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Train in a fresh process with one torch thread; judge curves from its metrics, then the final evaluations."""
    name = f"{model}_{variant}_s{seed}"
    run_dir = args.out / name
    cmd = [sys.executable, "-m", "ddpo.cli", "train", PRESET[model], *VARIANTS[model][variant], f"seed={seed}",
           f"train.num_epochs={args.epochs}", f"logging.output_dir={args.out}", f"logging.run_name={name}",
           "logging.progress=false", "logging.sample_grid=false", f"logging.save_every={args.epochs}",
           f"prompts.eval_every={args.eval_every}", "prompts.eval_split=all", "prompts.eval_num_prompts=168",
           "reward.eval_name=shapes_accuracy", *args.overrides]
    start = time.time()
    if not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < args.epochs:
        with open(args.out / f"{name}.log", "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {args.out / f'{name}.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [(0, rows[0]["eval_score_heldout_before"], rows[0]["eval_score_train_before"])] + [
        (r["epoch"], r["eval_score_heldout"], r["eval_score_train"]) for r in rows if "eval_score_heldout" in r]
    final = {sampler: _evaluate(model, run_dir, args.out / f"{name}_{sampler}.json", sampler == "deterministic")
             for sampler in ("training", "deterministic")}
    return {"model": model, "variant": variant, "seed": seed, "epochs": args.epochs,
            "train_wall_s": round(sum(r["epoch_s"] for r in rows), 1), "wall_s": round(time.time() - start, 1),
            "samples_per_epoch": rows[0]["num_samples"], "epoch_s": [r["epoch_s"] for r in rows],
            "reward_mean": [r["reward_mean"] for r in rows], "judge": evals, "final": final}


def to_gain(run: dict) -> tuple[float | None, float | None]:
    """(reward queries, training seconds) until the judge's rare accuracy first rose GAIN above its start."""
    start = run["judge"][0][1]
    for epoch, rare, _ in run["judge"][1:]:
        if rare - start >= GAIN - 1e-9:
            return epoch * run["samples_per_epoch"], sum(run["epoch_s"][:epoch])
    return None, None


def _ms(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    return f"{scale * np.mean(values):{fmt}} ± {scale * np.std(values):{fmt}}"


def table(runs: list[dict], base: dict) -> list[str]:
    lines = ["| model | variant | seeds | reward queries | reward, first -> last 3 epochs | rare (train sampler) | "
             "common (train sampler) | rare (eta 0, 20 steps) | common (eta 0, 20 steps) | queries to +15 rare (judge) | "
             "train s |", "|" + "---|" * 11]
    for model in VARIANTS:
        b = base.get(model)
        if b:
            lines.append(f"| {model} | base model | | 0 | | {100 * b['training']['rare']:.1f} | "
                         f"{100 * b['training']['common']:.1f} | {100 * b['deterministic']['rare']:.1f} | "
                         f"{100 * b['deterministic']['common']:.1f} | | |")
        for variant in VARIANTS[model]:
            mine = [r for r in runs if r["model"] == model and r["variant"] == variant]
            if not mine:
                continue
            first = [r["reward_mean"][0] for r in mine]
            last = [np.mean(r["reward_mean"][-3:]) for r in mine]
            reached = [to_gain(r)[0] for r in mine]
            hits = [q for q in reached if q is not None]
            when = f"{int(np.median(hits))} ({len(hits)}/{len(mine)} seeds)" if hits else f"not reached (0/{len(mine)})"
            f = {s: {k: [r["final"][s][k] for r in mine] for k in ("rare", "common")} for s in ("training", "deterministic")}
            lines.append(
                f"| {model} | {variant} | {len(mine)} | {mine[0]['samples_per_epoch'] * mine[0]['epochs']} | "
                f"{np.mean(first):.3f} -> {np.mean(last):.3f} | {_ms(f['training']['rare'])} | "
                f"{_ms(f['training']['common'])} | {_ms(f['deterministic']['rare'])} | "
                f"{_ms(f['deterministic']['common'])} | {when} | {np.mean([r['train_wall_s'] for r in mine]):.0f} |")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in VARIANTS if any(r["model"] == m for r in runs)]
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for variant in VARIANTS[model]:
            mine = [r for r in runs if r["model"] == model and r["variant"] == variant]
            if not mine:
                continue
            curves = np.array([[point[1:] for point in r["judge"]] for r in mine])  # (seeds, evals, 2)
            queries = np.array([point[0] for point in mine[0]["judge"]]) * mine[0]["samples_per_epoch"]
            for col in range(2):
                mean, std = curves[:, :, col].mean(0), curves[:, :, col].std(0)
                line, = axes[row, col].plot(queries, 100 * mean, label=variant)
                axes[row, col].fill_between(queries, 100 * (mean - std), 100 * (mean + std), alpha=0.15,
                                            color=line.get_color())
        for col, pairs in enumerate(("rare", "common")):
            axes[row, col].set_title(f"{model}: {pairs} pairs (evaluator, deterministic sampler)")
            axes[row, col].set_xlabel("reward queries")
            axes[row, col].set_ylabel("accuracy %")
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", default=None, help="default: all of the model's")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--append", action="store_true", help="keep the other runs already in the results JSON")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_shapes_algorithms"))
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = parser.parse_args()
    variants = args.variants or list(VARIANTS[args.model])
    unknown = sorted(set(variants) - set(VARIANTS[args.model]))
    if unknown:
        parser.error(f"unknown variant(s) {unknown} for --model {args.model}; choose from {list(VARIANTS[args.model])}")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.model, v, s) for s in args.seeds for v in variants]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args), jobs))
    result_file = RESULTS / "shapes_algorithms.json"
    old = json.loads(result_file.read_text()) if args.append and result_file.is_file() else {}
    base = old.get("base", {})
    base[args.model] = {s: _evaluate(args.model, None, args.out / f"{args.model}_base_{s}.json", s == "deterministic")
                        for s in ("training", "deterministic")}
    done = {(r["model"], r["variant"], r["seed"]) for r in runs}
    runs = [r for r in old.get("runs", []) if "model" in r and (r["model"], r["variant"], r["seed"]) not in done] + runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps({"base": base, "epochs": args.epochs, "runs": runs}, indent=1))
    lines = table(runs, base)
    (RESULTS / "shapes_algorithms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(runs, RESULTS / "shapes_algorithms.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
