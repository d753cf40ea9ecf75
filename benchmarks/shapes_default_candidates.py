"""Candidate defaults for `ddpo train` (shapes_alignment): rare AND common accuracy, per training seed and epoch.

The default's documented gain on the rare pairs costs the common ones (docs/shapes.md), and it takes one optimizer
step per epoch (so `ddpo_is` is REINFORCE there). Each candidate is a list of overrides of shapes_alignment; every
run keeps its checkpoints at `--eval-epochs` and each of them is judged by `ddpo shapes eval --per-pair 16` (all 24
pairs: rare and common) on every evaluation seed, at the training sampler and, with `--deterministic`, also at
eta 0 and 20 steps. A run whose folder already holds its last checkpoint is not trained again (so runs started by
hand under the same names are evaluated, not redone).

    python benchmarks/shapes_default_candidates.py --candidates two_steps two_steps_kl --seeds 0 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CANDIDATES: dict[str, list[str]] = {
    "default": [],  # one optimizer step per epoch (32 samples accumulated into one step)
    "two_steps": ["train.gradient_accumulation_steps=1"],  # 2 steps of 16 samples: importance sampling acts
    "two_steps_kl": ["train.gradient_accumulation_steps=1", "train.kl_coef=0.01"],  # + KL to the pretrained model
    "two_steps_all_prompts": ["train.gradient_accumulation_steps=1", "prompts.split=all"],  # rare 1/4 of prompts
    # half of each batch's prompts rare, half common (prompts.split=mix): the reward holds the common pairs
    "mix": ["train.gradient_accumulation_steps=1", "prompts.split=mix"],
    "mix_lr1e-3": ["train.gradient_accumulation_steps=1", "prompts.split=mix", "train.learning_rate=1e-3"],
    # relative to the current default (mix, 2 steps, lr 1e-3):
    "mix75": ["prompts.mix_heldout=0.75"],  # three quarters of every batch rare
    "batch64": ["sample.num_batches_per_epoch=4", "train.gradient_accumulation_steps=2"],  # 2 steps of 32 samples
    "kl_long": ["train.kl_coef=0.002"],  # with --epochs 300: the KL penalty, trained longer
    "batch_std": ["train.group_std=batch"],  # each prompt's mean, the epoch's std: easy prompts' noise stays small
}
RESULTS = Path(__file__).parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def train_one(name: str, seed: int, epochs: int, keep: int, out: Path) -> Path:
    from ddpo.checkpoint import epochs_done, list_checkpoints, read_trainer_state

    run_dir = out / f"{name}_s{seed}"
    done = [epochs_done(read_trainer_state(c)) for c in list_checkpoints(run_dir)]
    if epochs in done:
        return run_dir
    cmd = [sys.executable, "-m", "ddpo.cli", "train", "shapes_alignment", *CANDIDATES[name], f"seed={seed}",
           f"train.num_epochs={epochs}", f"logging.output_dir={out}", f"logging.run_name={run_dir.name}",
           f"logging.keep_last={keep}", "logging.progress=false"]
    with open(out / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, check=True)
    return run_dir


def evaluate(lora: Path | None, seed: int, deterministic: bool, out_json: Path) -> dict:
    extra = ["--eta", "0", "--steps", "20"] if deterministic else []
    cmd = [sys.executable, "-m", "ddpo.cli", "shapes", "eval", "--per-pair", "16", "--seed", str(seed),
           "--json", str(out_json), *extra, *(["--lora", str(lora)] if lora else [])]
    if not out_json.is_file():
        subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True)
    result = json.loads(out_json.read_text())
    return {"rare": result["rare_accuracy"], "common": result["common_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=["two_steps"], choices=list(CANDIDATES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--eval-epochs", type=int, nargs="+", default=[100, 150, 200])
    parser.add_argument("--deterministic", action="store_true", help="also evaluate at eta 0, 20 steps")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_shapes_default"))
    parser.add_argument("--evaluate-only", action="store_true", help="judge the checkpoints already in --out")
    args = parser.parse_args()
    from ddpo.checkpoint import epochs_done, list_checkpoints, read_trainer_state

    args.out.mkdir(parents=True, exist_ok=True)
    keep = args.epochs // 10  # save_every is 10 in the preset: keep them all
    jobs = [(c, s) for c in args.candidates for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        run_dirs = [args.out / f"{c}_s{s}" for c, s in jobs] if args.evaluate_only else list(
            pool.map(lambda job: train_one(*job, args.epochs, keep, args.out), jobs))
    samplers = [False, True] if args.deterministic else [False]
    evals = [(None, "base", 0, seed, det) for seed in args.eval_seeds for det in samplers]
    for (name, seed), run_dir in zip(jobs, run_dirs):
        by_epoch = {epochs_done(read_trainer_state(c)): c for c in list_checkpoints(run_dir)}
        evals += [(by_epoch[e], name, seed, s, det) for e in args.eval_epochs if e in by_epoch
                  for s in args.eval_seeds for det in samplers]

    def one(job):
        lora, name, seed, eval_seed, det = job
        epoch = epochs_done(read_trainer_state(lora)) if lora else 0
        path = args.out / f"{name}_s{seed}_e{epoch}_eval{eval_seed}{'_det' if det else ''}.json"
        return {"candidate": name, "seed": seed, "epoch": epoch, "eval_seed": eval_seed,
                "sampler": "eta0_20steps" if det else "training", **evaluate(lora, eval_seed, det, path)}

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(one, evals))
    RESULTS.mkdir(exist_ok=True)
    result_file = RESULTS / "shapes_default_candidates.json"
    key = ("candidate", "seed", "epoch", "eval_seed", "sampler")  # earlier rows stay unless measured again here
    merged = {tuple(r[k] for k in key): r for r in (json.loads(result_file.read_text()) if result_file.is_file() else [])}
    merged.update({tuple(r[k] for k in key): r for r in rows})
    result_file.write_text(json.dumps(list(merged.values()), indent=1))
    for r in rows:
        print(f"{r['candidate']:24s} seed {r['seed']} epoch {r['epoch']:3d} eval seed {r['eval_seed']} "
              f"{r['sampler']:12s} rare {100 * r['rare']:5.1f}%  common {100 * r['common']:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
