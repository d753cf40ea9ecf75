"""`ddpo shapes pretrain|eval`: regenerate the shipped Shapes model, or measure a model's accuracy."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ddpo.shapes import PRETRAINED_DIR

STAGES = ["vae", "decoder", "unet", "captioner", "assemble"]
FLOW_STAGE = "flow"  # the flow model (ddpo/shapes/flow.py): trained and shipped by one stage, not in the default list


def _parser() -> argparse.ArgumentParser:
    from ddpo.shapes.evaluate import EVAL_ETA, EVAL_GUIDANCE, EVAL_STEPS
    from ddpo.shapes.flow import FLOW_EVAL_ETA, FLOW_EVAL_GUIDANCE, FLOW_EVAL_STEPS, FlowPretrainConfig
    from ddpo.shapes.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(prog="ddpo shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train VAE, text encoder + UNet and captioner; write them into the package")
    pre.add_argument("--work-dir", type=Path, default=Path("runs/shapes_pretrain"), help="intermediate files and logs")
    pre.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="where the pipeline and captioner are written")
    pre.add_argument("--stages", default=",".join(STAGES),
                     help=f"comma-separated subset of {STAGES + [FLOW_STAGE]}; after 'vae', 'decoder' and 'unet' can "
                          "run as two processes, then 'captioner' (it reads the final VAE); 'flow' (not in the "
                          "default) trains the flow model and ships it into --out")
    pre.add_argument("--flow", action="store_true",
                     help="the flow model (shapes-flow) only: the same as --stages flow")
    pre.add_argument("--flow-vae", type=Path, default=None,
                     help="the VAE the flow model is trained on and ships (default: OUT/pipeline/vae if there, else "
                          "the package's, i.e. the shipped shapes pipeline's)")
    pre.add_argument("--pipeline", default="pipeline", help="which work-dir pipeline folder 'assemble' ships")
    # Unset options stay out of the namespace (SUPPRESS), so each config keeps its own default where the two share a
    # name with different values (rare_fraction: the flow model's data has fewer rare images; FlowPretrainConfig).
    flow_defaults = {f.name: f.default for f in fields(FlowPretrainConfig)}
    for f in fields(PretrainConfig):
        flow = flow_defaults.pop(f.name, None)
        also = f" (--flow: {flow})" if flow is not None and flow != f.default else ""
        pre.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=argparse.SUPPRESS,
                         help=f"default {f.default}{also}")
    for name, default in flow_defaults.items():  # the flow model's own settings
        pre.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=argparse.SUPPRESS,
                         help=f"--flow: default {default}")

    ev = sub.add_parser("eval", help="accuracy of a pipeline on common and rare pairs (rule-based evaluator)")
    ev.add_argument("--model", default="shapes",
                    help="'shapes' (the shipped UNet pipeline), 'shapes-flow' (the shipped flow model) or a pipeline "
                         "folder")
    ev.add_argument("--lora", type=Path, default=None, help="optional LoRA checkpoint folder from `ddpo train`")
    ev.add_argument("--per-pair", type=int, default=16, help="images per colour-shape pair (fixed seeds)")
    ev.add_argument("--steps", type=int, default=None,
                    help=f"sampling steps (default: the sampler the model's preset trains: {EVAL_STEPS} for a UNet "
                         f"model, shapes_alignment; {FLOW_EVAL_STEPS} for a flow model, shapes_flow_alignment)")
    ev.add_argument("--guidance", type=float, default=None,
                    help=f"classifier-free guidance scale (default {EVAL_GUIDANCE:g} for a UNet model, "
                         f"{FLOW_EVAL_GUIDANCE:g} for a flow model)")
    ev.add_argument("--eta", type=float, default=None,
                    help=f"the policy's noise: DDIM eta for a UNet model (default {EVAL_ETA:g}, the stochastic policy "
                         f"DDPO trains), the SDE noise level for a flow model (default {FLOW_EVAL_ETA:g}, the policy "
                         "GRPO trains); 0 is the deterministic sampler (DDIM, or the flow ODE)")
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

    cfg = pretrain.PretrainConfig(**_given(args, pretrain.PretrainConfig))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.flow:
        stages = [FLOW_STAGE]
    unknown = [s for s in stages if s not in STAGES + [FLOW_STAGE]]
    if unknown:
        raise SystemExit(f"ddpo shapes pretrain: unknown stage(s) {unknown}; choose from {STAGES + [FLOW_STAGE]}")
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
    if FLOW_STAGE in stages:
        print(f"wrote {_pretrain_flow(args)}")
    return 0


def _given(args: argparse.Namespace, config_class) -> dict:
    """The options given on the command line that `config_class` has; the others keep the class's defaults."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}


def _pretrain_flow(args: argparse.Namespace) -> Path:
    from ddpo.shapes import flow

    cfg = flow.FlowPretrainConfig(**_given(args, flow.FlowPretrainConfig))
    vae = args.flow_vae
    if vae is None and (args.out / "pipeline" / "vae").is_dir():
        vae = args.out / "pipeline" / "vae"
    flow.train_flow(cfg, args.work_dir, vae_folder=vae)
    return flow.assemble_flow(args.work_dir, args.out, cfg)


def _eval(args: argparse.Namespace) -> int:
    import json

    from ddpo.shapes.evaluate import default_eval_sampler, evaluate_pipeline, load_pipeline
    from ddpo.shapes.world import RARE_PAIRS

    pipe = load_pipeline(args.model, args.lora)
    defaults = default_eval_sampler(pipe)
    steps, guidance, eta = (default if given is None else given
                            for given, default in zip((args.steps, args.guidance, args.eta), defaults))
    result = evaluate_pipeline(pipe, per_pair=args.per_pair, steps=steps, guidance=guidance,
                               eta=eta, seed=args.seed, pairs=RARE_PAIRS if args.rare_only else None,
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
