"""Transfer to unseen prompts (the DDPO paper's "unseen animals and activities"), in the Shapes world.

Each run trains a Shapes alignment preset on the `shapes_transfer` grammar: its held-out split is three of the six
rare colour-shape pairs (red, yellow and green squares), the other three (blue, purple and white squares) are
excluded from every split, so training never sees them. `ddpo shapes eval --per-pair 16` then measures the trained
rare pairs, the unseen rare pairs and the common pairs, at the training sampler and at a deterministic one (eta 0,
20 steps), against the base model on the same evaluation, at each evaluation seed given (96 rare images a seed and
sampler; one seed's can be 10 points off, docs/shapes.md), and reports the mean over them. One training run is one
command:

    ddpo train shapes_alignment prompts.grammar=shapes_transfer

    python benchmarks/shapes_transfer.py                          # the UNet, 3 training x 3 evaluation seeds
    python benchmarks/shapes_transfer.py --model shapes-flow --preset shapes_flow_alignment --append [overrides]
                                                                  # the flow model (docs/shapes.md: its commands)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TRAINED = ["red square", "yellow square", "green square"]
UNSEEN = ["blue square", "purple square", "white square"]
RARE = TRAINED + UNSEEN
RESULTS = Path(__file__).parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SAMPLERS = {"training": [], "deterministic": ["--eta", "0", "--steps", "20"]}


def groups(result: dict) -> dict[str, float]:
    """The evaluator's per-pair accuracies -> trained rare, unseen rare and common pairs (equal weight per pair)."""
    per_pair = result["per_pair"]
    common = [p for p in per_pair if p not in RARE]
    return {name: float(np.mean([per_pair[p] for p in pairs]))
            for name, pairs in (("trained", TRAINED), ("unseen", UNSEEN), ("common", common))}


def evaluate(model: str, lora: Path | None, out: Path, sampler: str, seed: int) -> dict[str, float]:
    if not out.is_file():
        cmd = [sys.executable, "-m", "ddpo.cli", "shapes", "eval", "--model", model, "--per-pair", "16", "--seed",
               str(seed), "--json", str(out), *SAMPLERS[sampler], *(["--lora", str(lora)] if lora else [])]
        subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True)
    return groups(json.loads(out.read_text()))


def over_seeds(each: dict[int, dict[str, float]]) -> dict:
    """{eval seed: groups} -> the mean of each group over the evaluation seeds, with the seeds' own numbers kept."""
    mean = {name: float(np.mean([g[name] for g in each.values()])) for name in ("trained", "unseen", "common")}
    return {**mean, "eval_seeds": list(each), "per_eval_seed": each}


def train(preset: str, seed: int, args: argparse.Namespace) -> dict[int, Path]:
    """One training run (skipped if its last checkpoint is there) -> {epoch: checkpoint} for args.eval_epochs."""
    run_dir = args.out / f"{preset}_transfer_s{seed}"
    last = run_dir / "checkpoints" / f"epoch_{args.epochs:04d}"
    if not last.is_dir():
        cmd = [sys.executable, "-m", "ddpo.cli", "train", preset, "prompts.grammar=shapes_transfer", f"seed={seed}",
               f"logging.output_dir={args.out}", f"logging.run_name={run_dir.name}", "logging.progress=false",
               f"train.num_epochs={args.epochs}", "prompts.eval_every=0", "reward.eval_name=",
               f"logging.keep_last={args.epochs}", *args.overrides]
        with open(args.out / f"{run_dir.name}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, check=True)
    checkpoints = {e: run_dir / "checkpoints" / f"epoch_{e:04d}" for e in args.eval_epochs}
    missing = [str(c) for c in checkpoints.values() if not c.is_dir()]
    if missing:
        raise SystemExit(f"no checkpoint {', '.join(missing)}: pick --eval-epochs among the run's saved epochs "
                         "(logging.save_every) or pass logging.save_every=N")
    return checkpoints


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="shapes or shapes-flow (the base model to evaluate)")
    parser.add_argument("--preset", default="shapes_alignment")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's train.num_epochs")
    parser.add_argument("--eval-epochs", type=int, nargs="+", default=None,
                        help="the checkpoints to evaluate (default: the last); each must be a saved epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="`ddpo shapes eval --seed` of every evaluation; the tables report their mean")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="keep the other models' rows in the results JSON")
    parser.add_argument("--name", default="shapes_transfer", help="the results file: benchmarks/results/NAME.json")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_shapes_transfer"))
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = parser.parse_args()
    if args.epochs is None:
        from ddpo.config import load_config

        args.epochs = load_config(args.preset, list(args.overrides)).train.num_epochs
    args.eval_epochs = args.eval_epochs or [args.epochs]
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        checkpoints = dict(zip(args.seeds, pool.map(lambda s: train(args.preset, s, args), args.seeds)))
        runs = [(None, None, None)] + [(s, e, c) for s in args.seeds for e, c in checkpoints[s].items()]
        jobs = {}
        for sampler in SAMPLERS:
            for seed, epoch, ckpt in runs:
                for e in args.eval_seeds:
                    name = f"{args.model}_base" if seed is None else f"{args.preset}_transfer_s{seed}_epoch{epoch}"
                    out = args.out / f"{name}_{sampler}_e{e}.json"
                    jobs[sampler, seed, epoch, e] = pool.submit(evaluate, args.model, ckpt, out, sampler, e)
    rows = [{"model": args.model, "preset": args.preset, "seed": seed, "epochs": epoch, "sampler": sampler,
             **over_seeds({e: jobs[sampler, seed, epoch, e].result() for e in args.eval_seeds})}
            for sampler in SAMPLERS for seed, epoch, _ in runs]
    result_file = RESULTS / f"{args.name}.json"
    old = json.loads(result_file.read_text()) if args.append and result_file.is_file() else []
    rows = [r for r in old if r["model"] != args.model] + rows
    RESULTS.mkdir(exist_ok=True)
    result_file.write_text(json.dumps(rows, indent=1))
    print("| model | sampler | run | epoch | trained rare pairs | unseen rare pairs | common pairs | eval. seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        who = "base" if r["seed"] is None else f"seed {r['seed']}"
        print(f"| {r['model']} | {r['sampler']} | {who} | {r.get('epochs') or '-'} | {100 * r['trained']:.1f} | "
              f"{100 * r['unseen']:.1f} | {100 * r['common']:.1f} | {r.get('eval_seeds', [0])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
