"""The paper's algorithm comparison in miniature: ddpo_is, ddpo_sf, rwr, rwr_sparse on the Shapes world.

Every algorithm trains from the shipped Shapes model with the default alignment config (configs/shapes_alignment.yaml,
with the greedy-caption reward and learning rate the table was measured with: MEASURED_WITH below),
the same number of epochs and samples per epoch (so the same number of reward queries) and the same seeds. Writes
    benchmarks/results/shapes_algorithms.json   per run: reward per epoch, final rare/common accuracy (evaluator)
    benchmarks/results/shapes_algorithms.md     table: mean +- std over seeds
    benchmarks/results/shapes_algorithms.png    reward against number of reward queries

    python benchmarks/shapes_algorithms.py                       # 4 algorithms x 3 seeds, 2 runs at a time
    python benchmarks/shapes_algorithms.py --epochs 10 --seeds 0 # a quick look
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

ALGORITHMS = ["ddpo_is", "ddpo_sf", "rwr", "rwr_sparse"]
# Extra rows: same reward queries, different use of them. With one optimizer step per epoch (the default config),
# ddpo_is and ddpo_sf take the same gradient (every ratio is 1); importance sampling pays off only with more steps.
VARIANTS: dict[str, list[str]] = {a: [f"train.algorithm={a}"] for a in ALGORITHMS}
VARIANTS["ddpo_is_2inner"] = ["train.algorithm=ddpo_is", "train.num_inner_epochs=2"]
# The table in benchmarks/results was measured with greedy captions at lr 1e-3, the default before the expected
# reward (docs/shapes.md); these keep the script reproducing it. Pass `reward.kwargs.expected=true
# train.learning_rate=7e-4` as overrides to compare the algorithms under today's default (not yet measured).
MEASURED_WITH = ["reward.kwargs.expected=false", "train.learning_rate=1e-3"]
RESULTS = Path(__file__).parent / "results"


def run_one(algorithm: str, seed: int, epochs: int, out_dir: Path, extra: list[str]) -> dict:
    """Train in a fresh process with one torch thread, then measure held-out accuracy with the evaluator."""
    name = f"{algorithm}_s{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ddpo.cli", "train", "shapes_alignment", *VARIANTS[algorithm],
           f"seed={seed}", f"train.num_epochs={epochs}", f"logging.output_dir={out_dir}", f"logging.run_name={name}",
           "logging.progress=false", "logging.sample_grid=false", f"logging.save_every={epochs}",
           "prompts.eval_every=0", *MEASURED_WITH, *extra]
    start = time.time()
    log = out_dir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines() if line]
    acc = subprocess.run([sys.executable, "-m", "ddpo.cli", "shapes", "eval", "--lora", str(out_dir / name),
                          "--rare-only", "--per-pair", "16", "--json", str(out_dir / f"{name}_eval.json")],
                         capture_output=True, text=True, env=env)
    if acc.returncode != 0:
        raise RuntimeError(f"evaluation of {name} failed: {acc.stderr[-2000:]}")
    evaluation = json.loads((out_dir / f"{name}_eval.json").read_text())
    return {"algorithm": algorithm, "seed": seed, "epochs": epochs, "wall_s": round(time.time() - start, 1),
            "samples_per_epoch": rows[0]["num_samples"], "reward_mean": [r["reward_mean"] for r in rows],
            "rare_accuracy": evaluation["rare_accuracy"]}


def write_outputs(runs: list[dict], base_rare: float | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shapes_algorithms.json").write_text(json.dumps({"base_rare_accuracy": base_rare, "runs": runs}, indent=1))
    lines = ["| algorithm | seeds | reward queries | reward, first epoch | reward, last 3 epochs | rare accuracy (evaluator) |",
             "|---|---|---|---|---|---|"]
    for algorithm in VARIANTS:
        mine = [r for r in runs if r["algorithm"] == algorithm]
        if not mine:
            continue
        first = [r["reward_mean"][0] for r in mine]
        last = [np.mean(r["reward_mean"][-3:]) for r in mine]
        acc = [r["rare_accuracy"] for r in mine]
        queries = mine[0]["samples_per_epoch"] * mine[0]["epochs"]
        lines.append(f"| {algorithm} | {len(mine)} | {queries} | {np.mean(first):.4f} ± {np.std(first):.4f} | "
                     f"{np.mean(last):.4f} ± {np.std(last):.4f} | {100 * np.mean(acc):.1f}% ± {100 * np.std(acc):.1f} |")
    if base_rare is not None:
        lines.append(f"\nBase model rare accuracy (same evaluation): {100 * base_rare:.1f}%.")
    (RESULTS / "shapes_algorithms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algorithm in VARIANTS:
        mine = [r for r in runs if r["algorithm"] == algorithm]
        if not mine:
            continue
        curves = np.array([r["reward_mean"] for r in mine])
        queries = np.arange(1, curves.shape[1] + 1) * mine[0]["samples_per_epoch"]
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(queries, mean, label=algorithm)
        ax.fill_between(queries, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("reward queries")
    ax.set_ylabel("mean reward per epoch (BERTScore recall)")
    ax.set_title(f"Shapes alignment, {len(set(r['seed'] for r in runs))} seeds (mean ± std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "shapes_algorithms.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=list(VARIANTS))
    parser.add_argument("--append", action="store_true", help="add these runs to the existing results JSON")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_shapes_algorithms"))
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(a, s) for s in args.seeds for a in args.algorithms]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args.epochs, args.out, args.overrides), jobs))
    base = subprocess.run([sys.executable, "-m", "ddpo.cli", "shapes", "eval", "--rare-only", "--per-pair", "16",
                           "--json", str(args.out / "base_eval.json")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    base_rare = json.loads((args.out / "base_eval.json").read_text())["rare_accuracy"] if base.returncode == 0 else None
    if args.append and (RESULTS / "shapes_algorithms.json").is_file():
        runs = json.loads((RESULTS / "shapes_algorithms.json").read_text())["runs"] + runs
    write_outputs(runs, base_rare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
