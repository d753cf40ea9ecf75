"""`ddpo shapes pretrain|eval`: regenerate the shipped Shapes model, or measure a model's accuracy."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ddpo.shapes import PRETRAINED_DIR

STAGES = ["vae", "decoder", "unet", "captioner", "assemble"]


def _parser() -> argparse.ArgumentParser:
    from ddpo.shapes.evaluate import EVAL_ETA, EVAL_GUIDANCE, EVAL_STEPS
    from ddpo.shapes.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(prog="ddpo shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train VAE, text encoder + UNet and captioner; write them into the package")
    pre.add_argument("--work-dir", type=Path, default=Path("runs/shapes_pretrain"), help="intermediate files and logs")
    pre.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="where the pipeline and captioner are written")
    pre.add_argument("--stages", default=",".join(STAGES),
                     help=f"comma-separated subset of {STAGES}; after 'vae', 'decoder' and 'unet' can run as two "
                          "processes, then 'captioner' (it reads the final VAE)")
    pre.add_argument("--pipeline", default="pipeline", help="which work-dir pipeline folder 'assemble' ships")
    for f in fields(PretrainConfig):
        pre.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)

    ev = sub.add_parser("eval", help="accuracy of a pipeline on common and rare pairs (rule-based evaluator)")
    ev.add_argument("--model", default="shapes", help="'shapes' (the shipped pipeline) or a pipeline folder")
    ev.add_argument("--lora", type=Path, default=None, help="optional LoRA checkpoint folder from `ddpo train`")
    ev.add_argument("--per-pair", type=int, default=16, help="images per colour-shape pair (fixed seeds)")
    ev.add_argument("--steps", type=int, default=EVAL_STEPS, help="DDIM steps (default: the shapes_alignment sampler)")
    ev.add_argument("--guidance", type=float, default=EVAL_GUIDANCE, help="classifier-free guidance scale")
    ev.add_argument("--eta", type=float, default=EVAL_ETA, help="DDIM eta (1: the stochastic policy DDPO trains)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--rare-only", action="store_true", help="only the six rare pairs (faster)")
    ev.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the rare pairs here")
    ev.add_argument("--json", type=Path, default=None,
                    help="write the results as JSON here (strict JSON: an accuracy with no pairs to average, "
                         "e.g. common_accuracy with --rare-only, is null)")
    return parser


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.command == "pretrain":
        return _pretrain(args)
    return _eval(args)


def _pretrain(args: argparse.Namespace) -> int:
    from ddpo.shapes import pretrain

    cfg = pretrain.PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(pretrain.PretrainConfig)})
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"ddpo shapes pretrain: unknown stage(s) {unknown}; choose from {STAGES}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if "vae" in stages:
        pretrain.train_vae(cfg, args.work_dir)
    if "decoder" in stages:
        pretrain.train_decoder(cfg, args.work_dir)
    if "unet" in stages:
        pretrain.train_unet(cfg, args.work_dir)
    if "captioner" in stages:
        pretrain.train_captioner(cfg, args.work_dir)
    if "assemble" in stages:
        out = pretrain.assemble(args.work_dir, args.out, cfg, pipeline_name=args.pipeline)
        print(f"wrote {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from ddpo.shapes.evaluate import evaluate_pipeline, load_pipeline
    from ddpo.shapes.world import RARE_PAIRS

    pipe = load_pipeline(args.model, args.lora)
    result = evaluate_pipeline(pipe, per_pair=args.per_pair, steps=args.steps, guidance=args.guidance,
                               eta=args.eta, seed=args.seed, pairs=RARE_PAIRS if args.rare_only else None,
                               grid_path=args.grid)
    result = _nan_to_null(result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_pair"}, indent=1, allow_nan=False))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, allow_nan=False))
    return 0


def _nan_to_null(value):
    """JSON has no NaN: a mean over no pairs (NaN) becomes null, in nested dicts and lists too."""
    import math

    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
