"""The DDPO paper's algorithm comparison in miniature, on both Shapes models, at equal reward queries.

Every variant trains from a shipped Shapes model with its alignment preset (`shapes` -> configs/shapes_alignment.yaml,
`shapes-flow` -> configs/shapes_flow_alignment.yaml) changed only as VARIANTS says, for the same epochs of 64
samples (so the same reward queries) and seeds, at the preset's learning rate or at each of `--lrs` (a tuning grid).
Policy-gradient variants take 2 optimizer steps per epoch (so the PPO ratio moves off 1 and the clip acts) except
`ddpo_sf`, which is on-policy and takes 1.

Each run evaluates itself every `--eval-every` epochs with the Shapes evaluator as its judge
(`reward.eval_name=shapes_accuracy`, all 168 prompts `--judge-images` times, deterministic sampler): rare- and
common-pair accuracy against reward queries and training seconds, from one run. One image per prompt gives 42 rare
images (a standard error of about 7.7 points at 45%), too coarse to see a gain of 15; `--judge-images 4` gives 168
(3.8 points) for about 4x the evaluation time (26 s against 6 s on the UNet, one thread). At the end
`ddpo shapes eval --per-pair 16` measures the final checkpoint at the training sampler and at a deterministic one
(eta 0, 20 steps), at each of `--eval-seeds` (mean over them; one evaluation seed's 96 rare images can be 10 points
off: the UNet's base reads 26.0 / 37.5 / 35.4 rare at evaluation seeds 0 / 1 / 2 at eta 0). Writes
    benchmarks/results/shapes_algorithms.json   per run: reward per epoch, judge curves, final accuracies, wall time
    benchmarks/results/shapes_algorithms.md     table: mean ± std over seeds, per (model, variant, learning rate)
    benchmarks/results/shapes_algorithms.png    rare and common accuracy (judge) against reward queries

The measured comparison (docs/shapes.md, The paper's comparison in miniature, has the exact commands): learning
rates tuned on seed 0 (`--seeds 0 --lrs A B C`), then seeds 1-2 at each variant's choice (`--seeds 1 2 --lrs tuned`),
every invocation with `--epochs 40 --append`. Those tables were evaluated at evaluation seed 0 only (the default
then): add `--eval-seeds 0` to the commands below (all but the last) to reproduce them; the default is now 0 1 2.
    python benchmarks/shapes_algorithms.py --model shapes-flow --seeds 0 --lrs 3e-4 1e-3 3e-3 --epochs 40 --append \
        --variants ddpo_is ddpo_sf grpo grpo_fast
    python benchmarks/shapes_algorithms.py --model shapes-flow --seeds 1 2 --lrs tuned --epochs 40 --append
    python benchmarks/shapes_algorithms.py --epochs 10 --seeds 0 --variants ddpo_is   # a quick look
A longer budget at the tuned learning rates goes to its own results files (`--name`, here
benchmarks/results/shapes_algorithms_long.*), the tuning still read from shapes_algorithms.json:
    python benchmarks/shapes_algorithms.py --model shapes --variants ddpo_is ddpo_sf --lrs tuned --epochs 100 \
        --name shapes_algorithms_long
The same runs with a finer judge and three evaluation seeds (an evaluation changes no training: the same runs, to
the CPU's float rounding):
    python benchmarks/shapes_algorithms.py --model shapes --variants ddpo_is ddpo_sf --lrs tuned --epochs 100 \
        --judge-images 4 --eval-seeds 0 1 2 --name shapes_algorithms_long_judge4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ddpo.config import config_from_file

# Every variant draws 64 samples per epoch (so the same reward queries per epoch) and, except the on-policy
# `ddpo_sf` (one step of 64), takes 2 optimizer steps of 32 per epoch, so the PPO ratio moves off 1 and the clip acts.
# The UNet preset already does, and the flow preset since it became this comparison's `grpo` row; FLOW_64 and the
# other flow overrides are spelled out so that each variant reads whole (and was run against the previous preset, 16
# samples in one step with Flow-GRPO-Fast's window).
FLOW_64 = ["sample.num_batches_per_epoch=4", "train.gradient_accumulation_steps=2"]
ONE_STEP = ["train.gradient_accumulation_steps=4"]  # `ddpo_sf`: the whole epoch in one optimizer step
# The UNet default's advantages on the flow model: one image per prompt, per-prompt reward tracking (32 kept, 8 needed)
PER_PROMPT = ["sample.images_per_prompt=1", "train.per_prompt_stat_tracking=true", "train.stat_buffer_size=32",
              "train.stat_min_count=8"]
EVERY_STEP = ["sample.sde_window=0", "train.timesteps_per_call=5"]  # all 10 steps stochastic and trained, 5 a call
VARIANTS: dict[str, dict[str, list[str]]] = {
    "shapes": {
        "ddpo_is": ["train.algorithm=ddpo_is"],
        "ddpo_sf": ["train.algorithm=ddpo_sf", *ONE_STEP],
        "rwr": ["train.algorithm=rwr"],
        "rwr_sparse": ["train.algorithm=rwr_sparse"],
        "ddpo_is_kl": ["train.algorithm=ddpo_is", "train.kl_coef=0.001"],
        "ddpo_is_groups": ["train.algorithm=ddpo_is", "sample.images_per_prompt=4"],
        "nft": ["train.algorithm=nft"],
    },
    "shapes-flow": {
        "ddpo_is": ["train.algorithm=ddpo_is", *FLOW_64, *PER_PROMPT, *EVERY_STEP],
        "ddpo_sf": ["train.algorithm=ddpo_sf", *FLOW_64, *ONE_STEP, *PER_PROMPT, *EVERY_STEP],
        "rwr": ["train.algorithm=rwr", *FLOW_64, *PER_PROMPT, *EVERY_STEP],
        "grpo": [*FLOW_64, *EVERY_STEP],  # Flow-GRPO, groups of 4 images of a prompt, every step: = the preset
        "grpo_fast": [*FLOW_64, "sample.sde_window=3", "train.timesteps_per_call=3"],  # Flow-GRPO-Fast: a window of 3
        "nft": ["train.algorithm=nft", *FLOW_64, *PER_PROMPT, *EVERY_STEP],
    },
}
PRESET = {"shapes": "shapes_alignment", "shapes-flow": "shapes_flow_alignment"}
RESULTS = Path(__file__).parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
GAIN = 0.15  # "reward queries to +15 points": the first evaluation whose rare accuracy (judge) is this far above


def _evaluate(model: str, lora: Path | None, out: Path, deterministic: bool, seeds: list[int]) -> dict:
    """`ddpo shapes eval --per-pair 16` at each evaluation seed (`out` for seed 0, `out` + `_e{seed}` for others):
    the mean over seeds, and each seed's, of rare and common accuracy."""
    extra = ["--eta", "0", "--steps", "20"] if deterministic else []
    each = []
    for seed in seeds:
        path = out if seed == 0 else out.with_name(f"{out.stem}_e{seed}{out.suffix}")
        if not path.is_file():
            cmd = [sys.executable, "-m", "ddpo.cli", "shapes", "eval", "--model", model, "--per-pair", "16",
                   "--seed", str(seed), "--json", str(path), *extra, *(["--lora", str(lora)] if lora else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        result = json.loads(path.read_text())
        each.append({"rare": result["rare_accuracy"], "common": result["common_accuracy"]})
    return {"rare": float(np.mean([e["rare"] for e in each])), "common": float(np.mean([e["common"] for e in each])),
            "eval_seeds": seeds, "per_eval_seed": each}


def run_one(model: str, variant: str, lr: float | None, seed: int, args: argparse.Namespace) -> dict:
    """Train in a fresh process with one torch thread; judge curves from its metrics, then the final evaluations.

    `lr` None keeps the preset's learning rate."""
    name = (f"{model}_{variant}" + (f"_lr{lr:g}" if lr is not None else "") + f"_s{seed}"
            + (f"_j{args.judge_images}" if args.judge_images > 1 else ""))
    run_dir = args.out / name
    lr_override = [f"train.learning_rate={lr}"] if lr is not None else []
    cmd = [sys.executable, "-m", "ddpo.cli", "train", PRESET[model], *VARIANTS[model][variant], *lr_override,
           f"seed={seed}", f"train.num_epochs={args.epochs}", f"logging.output_dir={args.out}", f"logging.run_name={name}",
           "logging.progress=false", "logging.sample_grid=false", f"logging.save_every={args.epochs}",
           f"prompts.eval_every={args.eval_every}", "prompts.eval_split=all", "prompts.eval_num_prompts=168",
           f"prompts.eval_images_per_prompt={args.judge_images}", "reward.eval_name=shapes_accuracy", *args.overrides]
    start = time.time()
    if not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < args.epochs:
        with open(args.out / f"{name}.log", "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {args.out / f'{name}.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [(0, rows[0]["eval_score_heldout_before"], rows[0]["eval_score_train_before"])] + [
        (r["epoch"], r["eval_score_heldout"], r["eval_score_train"]) for r in rows if "eval_score_heldout" in r]
    final = {sampler: _evaluate(model, run_dir, args.out / f"{name}_{sampler}.json", sampler == "deterministic",
                                args.eval_seeds) for sampler in ("training", "deterministic")}
    return {"model": model, "variant": variant, "lr": config_from_file(run_dir / "config.yaml").train.learning_rate,
            "seed": seed, "epochs": args.epochs, "judge_images": args.judge_images,
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


def judge_at(run: dict, seconds: float) -> tuple[float, float]:
    """The judge's (rare, common) at its last evaluation within `seconds` of training: equal wall-clock budgets."""
    within = [point for point in run["judge"] if sum(run["epoch_s"][:point[0]]) <= seconds + 1e-9]
    return within[-1][1], within[-1][2]


def tuned_lr(runs: list[dict], base: dict, model: str, variant: str) -> float:
    """The learning rate chosen on seed 0: the highest rare accuracy at the training sampler among those keeping
    common pairs within 3 points of the base (ties: rare at the deterministic sampler); if none does, the one that
    keeps common pairs best."""
    tried = [r for r in runs if (r["model"], r["variant"], r["seed"]) == (model, variant, 0)]
    if not tried:
        raise SystemExit(f"no seed-0 run of {model} {variant} to choose a learning rate from: run --seeds 0 --lrs ...")
    final = lambda r, s, k: r["final"][s][k]  # noqa: E731
    keeps = [r for r in tried if final(r, "training", "common") >= base[model]["training"]["common"] - 0.03 - 1e-9]
    if not keeps:
        return max(tried, key=lambda r: final(r, "training", "common"))["lr"]
    return max(keeps, key=lambda r: (final(r, "training", "rare"), final(r, "deterministic", "rare")))["lr"]


def _ms(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    return f"{scale * np.mean(values):{fmt}} ± {scale * np.std(values):{fmt}}"


def groups(runs: list[dict], model: str) -> list[tuple[str, list[dict]]]:
    """The model's runs by (variant, learning rate), in VARIANTS order then by learning rate."""
    keys = sorted({(r["variant"], r["lr"]) for r in runs if r["model"] == model},
                  key=lambda k: (list(VARIANTS[model]).index(k[0]), k[1]))
    return [(f"{v} (lr {lr:g})", [r for r in runs if r["model"] == model and (r["variant"], r["lr"]) == (v, lr)])
            for v, lr in keys]


def _when(values: list[float | None], fmt: str) -> str:
    hits = [v for v in values if v is not None]
    return f"{np.median(hits):{fmt}} ({len(hits)}/{len(values)})" if hits else f"not reached (0/{len(values)})"


def tuning(runs: list[dict]) -> list[str]:
    """Seed 0 at every learning rate tried: the learning rate of each variant was chosen on this table."""
    epochs = " / ".join(str(point[0]) for point in runs[0]["judge"][1:]) if runs else ""
    lines = ["| model | variant | rare / common (train sampler) | rare / common (eta 0, 20 steps) | judge rare, epochs "
             f"{epochs} |", "|---|---|---|---|---|"]
    for model in VARIANTS:
        for label, mine in groups([r for r in runs if r["seed"] == 0], model):
            f = mine[0]["final"]
            lines.append(f"| {model} | {label} | {100 * f['training']['rare']:.1f} / {100 * f['training']['common']:.1f}"
                         f" | {100 * f['deterministic']['rare']:.1f} / {100 * f['deterministic']['common']:.1f} | "
                         + " / ".join(f"{100 * point[1]:.1f}" for point in mine[0]["judge"][1:]) + " |")
    return lines


def measured(runs: list[dict]) -> list[dict]:
    """The runs of every (model, variant, lr) run on more than one seed (the tuned ones), or all runs if none was."""
    count = Counter((r["model"], r["variant"], r["lr"]) for r in runs)
    return [r for r in runs if count[r["model"], r["variant"], r["lr"]] > 1] or runs


def table(runs: list[dict], base: dict) -> list[str]:
    """Mean ± std over seeds per (model, variant, lr) of `runs`; the equal wall-clock column judges every run of a
    model at the training time of its fastest variant (mean over seeds)."""
    lines = ["| model | variant | seeds | reward queries | reward, first -> last 3 epochs | rare (train sampler) | "
             "common (train sampler) | rare (eta 0, 20 steps) | common (eta 0, 20 steps) | queries to +15 rare (judge) "
             "| train s to +15 | judge rare / common at equal time | train s |", "|" + "---|" * 13]
    for model in VARIANTS:
        b, rows = base.get(model), groups(runs, model)
        if not rows:
            continue
        if b:
            lines.append(f"| {model} | base model | | 0 | | {100 * b['training']['rare']:.1f} | "
                         f"{100 * b['training']['common']:.1f} | {100 * b['deterministic']['rare']:.1f} | "
                         f"{100 * b['deterministic']['common']:.1f} | | | | |")
        budget = min(np.mean([r["train_wall_s"] for r in mine]) for _, mine in rows)
        for label, mine in rows:
            first = [r["reward_mean"][0] for r in mine]
            last = [np.mean(r["reward_mean"][-3:]) for r in mine]
            reached = [to_gain(r) for r in mine]
            at = np.array([judge_at(r, budget) for r in mine])
            f = {s: {k: [r["final"][s][k] for r in mine] for k in ("rare", "common")} for s in ("training", "deterministic")}
            lines.append(
                f"| {model} | {label} | {len(mine)} | {mine[0]['samples_per_epoch'] * mine[0]['epochs']} | "
                f"{np.mean(first):.3f} -> {np.mean(last):.3f} | {_ms(f['training']['rare'])} | "
                f"{_ms(f['training']['common'])} | {_ms(f['deterministic']['rare'])} | "
                f"{_ms(f['deterministic']['common'])} | {_when([q for q, _ in reached], '.0f')} | "
                f"{_when([t for _, t in reached], '.0f')} | {100 * at[:, 0].mean():.1f} / {100 * at[:, 1].mean():.1f} "
                f"({budget:.0f} s) | {np.mean([r['train_wall_s'] for r in mine]):.0f} |")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    """Judge accuracy against reward queries, one line per (variant, lr) of `runs`, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in VARIANTS if any(r["model"] == m for r in runs)]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for label, mine in groups(runs, model):
            curves = np.array([[point[1:] for point in r["judge"]] for r in mine])  # (seeds, evals, 2)
            queries = np.array([point[0] for point in mine[0]["judge"]]) * mine[0]["samples_per_epoch"]
            for col in range(2):
                mean, std = curves[:, :, col].mean(0), curves[:, :, col].std(0)
                line, = axes[row, col].plot(queries, 100 * mean, label=f"{label}, {len(mine)} seeds")
                axes[row, col].fill_between(queries, 100 * (mean - std), 100 * (mean + std), alpha=0.15,
                                            color=line.get_color())
        for col, pairs in enumerate(("rare", "common")):
            axes[row, col].set_title(f"{model}: {pairs} pairs (evaluator, deterministic sampler)")
            axes[row, col].set_xlabel("reward queries")
            axes[row, col].set_ylabel("accuracy %")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", default=None, help="default: all of the model's")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--judge-images", type=int, default=1,
                        help="images of each of the 168 prompts per judged evaluation (prompts.eval_images_per_prompt)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="evaluation seeds of the final `ddpo shapes eval` (96 rare images each); the tables give "
                             "the mean over them (one seed's can be 10 points off; the tables of 2026-12-01 used 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", default=[None], type=lambda v: v if v == "tuned" else float(v),
                        help="learning rates to run each variant at (default: the preset's): a tuning grid, or "
                             "`tuned`: each variant's choice among its seed-0 runs in the results (tuned_lr)")
    parser.add_argument("--append", action="store_true", help="keep the other runs already in the results JSON")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_shapes_algorithms"))
    parser.add_argument("--name", default="shapes_algorithms",
                        help="results file stem in benchmarks/results (e.g. shapes_algorithms_long for a longer "
                             "budget); `--lrs tuned` always reads the tuning in shapes_algorithms.json")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = parser.parse_args()
    variants = args.variants or list(VARIANTS[args.model])
    unknown = sorted(set(variants) - set(VARIANTS[args.model]))
    if unknown:
        parser.error(f"unknown variant(s) {unknown} for --model {args.model}; choose from {list(VARIANTS[args.model])}")
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / f"{args.name}.json"
    if "tuned" in args.lrs:
        if args.lrs != ["tuned"]:
            parser.error("--lrs tuned stands alone")
        tuning_file = RESULTS / "shapes_algorithms.json"
        grid = json.loads(tuning_file.read_text()) if tuning_file.is_file() else {}
        choice = {v: tuned_lr(grid.get("runs", []), grid.get("base", {}), args.model, v) for v in variants}
        print(f"tuned learning rates: {choice}")
        jobs = [(args.model, v, choice[v], s) for s in args.seeds for v in variants]
    else:
        jobs = [(args.model, v, lr, s) for s in args.seeds for lr in args.lrs for v in variants]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args), jobs))
    old = json.loads(result_file.read_text()) if args.append and result_file.is_file() else {}  # as it is now
    base = old.get("base", {})
    base[args.model] = {s: _evaluate(args.model, None, args.out / f"{args.model}_base_{s}.json", s == "deterministic",
                                     args.eval_seeds) for s in ("training", "deterministic")}
    key = lambda r: (r["model"], r["variant"], r.get("lr"), r["seed"])  # noqa: E731
    done = {key(r) for r in runs}
    runs = [r for r in old.get("runs", []) if "lr" in r and key(r) not in done] + runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps({"base": base, "epochs": args.epochs, "runs": runs}, indent=1))
    lines = table(measured(runs), base) + ["", "Training seed 0, every learning rate run:", ""] + tuning(runs)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(measured(runs), RESULTS / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
