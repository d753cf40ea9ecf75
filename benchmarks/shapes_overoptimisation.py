"""Over-optimisation in view: one run's training reward and the Shapes evaluator's accuracy on one figure.

The run must have evaluated itself with the evaluator as judge (`prompts.eval_every`, `prompts.eval_split=all`,
`reward.eval_name=shapes_accuracy`; the default preset does). The training reward (mean per epoch) can keep rising
while the evaluator's accuracy on the rare or the common pairs falls: that is where the reward is being gamed.

    python benchmarks/shapes_overoptimisation.py runs/<run> --out benchmarks/results/shapes_overoptimisation.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curves(metrics: Path) -> dict[str, list]:
    """{'epoch', 'reward'} per epoch and {'eval_epoch', 'rare', 'common', 'eval_reward'} per evaluation (0 = before)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows or "eval_score_heldout_before" not in rows[0]:
        raise SystemExit(f"{metrics}: no judged evaluation in it; train with prompts.eval_every=K "
                         "prompts.eval_split=all reward.eval_name=shapes_accuracy (the default preset does)")
    evals = [(0, rows[0]["eval_score_heldout_before"], rows[0]["eval_score_train_before"],
              rows[0]["eval_reward_before"])]
    evals += [(r["epoch"], r["eval_score_heldout"], r["eval_score_train"], r["eval_reward_mean"])
              for r in rows if "eval_score_heldout" in r]
    return {"epoch": [r["epoch"] for r in rows], "reward": [r["reward_mean"] for r in rows],
            "eval_epoch": [e[0] for e in evals], "rare": [e[1] for e in evals], "common": [e[2] for e in evals],
            "eval_reward": [e[3] for e in evals]}


def plot(runs: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    twin = ax.twinx()
    for i, (label, c) in enumerate(runs.items()):
        suffix = f" ({label})" if len(runs) > 1 else ""
        ax.plot(c["eval_epoch"], [100 * v for v in c["rare"]], "o-", color=f"C{2 * i}", label="rare pairs" + suffix)
        ax.plot(c["eval_epoch"], [100 * v for v in c["common"]], "s-", color=f"C{2 * i + 1}",
                label="common pairs" + suffix)
        window = 10  # the per-epoch reward is noisy (32 samples): its running mean over 10 epochs
        smooth = [sum(c["reward"][max(0, k - window + 1):k + 1]) / len(c["reward"][max(0, k - window + 1):k + 1])
                  for k in range(len(c["reward"]))]
        twin.plot(c["epoch"], smooth, "--", color=f"C{2 * i}", alpha=0.7, lw=1.2, label="training reward" + suffix)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy by the evaluator, % (deterministic sampler)")
    twin.set_ylabel("training reward (dashed; running mean of 10 epochs)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=7)
    ax.set_title("Training reward against the independent evaluator, from each run's own evaluations", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes_overoptimisation.png"))
    args = parser.parse_args()
    runs = {run.name: curves(run / "metrics.jsonl") for run in args.runs}
    plot(runs, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    for name, c in runs.items():
        print(name, "epoch, rare, common:", [(e, round(100 * r, 1), round(100 * m, 1))
                                             for e, r, m in zip(c["eval_epoch"], c["rare"], c["common"])])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
