"""`ddpo generate`: images from a base model and an optional DDPO checkpoint, with fixed seeds.

Image i of a call uses seed `seed + i` for its initial noise (and its DDIM noise when eta > 0), so
`--seed 0 -n 4` gives the same four images with any batch size, and base and finetuned models given the
same seeds can be compared side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import warnings
from pathlib import Path


def load_for_inference(model: str, lora: str | None = None, device: str | None = None):
    """The model family of `model` (ddpo/families) with the weights of a `ddpo train` checkpoint (LoRA, or a full
    UNet or transformer) applied, on `device`.

    `lora` is a checkpoint folder, or a run folder (its newest checkpoint). Weights that do not fit `model` raise
    a one-line CheckpointError naming the model the checkpoint was trained on.
    """
    import torch

    from ddpo.families import load_family

    family = load_family(model)
    pipe = family.pipe
    if lora:
        from ddpo.checkpoint import LORA_FILE, CheckpointError, find_checkpoint

        folder = find_checkpoint(Path(lora))
        trained = checkpoint_config(folder)
        trained_on = trained.model.pretrained
        family.set_resolution(trained.model.resolution)  # sample as it was trained
        family.step_kind = trained.sample.flow_step
        advice = (f"it was trained on model.pretrained={trained_on!r}; pass --model {trained_on}"
                  if trained_on != model else f"it was trained on this model ({model!r})")
        if (folder / LORA_FILE).is_file():
            try:
                with _quiet("diffusers", "peft"):  # diffusers logs one line per mismatched tensor before raising
                    pipe.load_lora_weights(str(folder))
            except (RuntimeError, ValueError, KeyError) as err:
                raise CheckpointError(f"the LoRA weights in {folder} do not fit {model!r} "
                                      f"({type(err).__name__}); {advice}") from None
        else:
            trained = type(family.denoiser).from_pretrained(folder / family.denoiser_attr)
            base = {k: v.shape for k, v in family.denoiser.state_dict().items()}
            if {k: v.shape for k, v in trained.state_dict().items()} != base:
                raise CheckpointError(f"the {family.denoiser_attr} in {folder} does not fit the text encoders and VAE "
                                      f"of {model!r}; {advice}")
            family.denoiser = trained
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    return family


def checkpoint_config(folder: Path):
    """The config a verified checkpoint folder was trained with (a bad one is a CheckpointError)."""
    from ddpo.checkpoint import CheckpointError
    from ddpo.config import ConfigError, config_from_file

    try:
        return config_from_file(folder / "config.yaml")
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {folder}: its config.yaml is not valid ({err})") from None


@contextlib.contextmanager
def _quiet(*names: str):
    """Raise the level of the named loggers to CRITICAL while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def generate_images(family, prompts: list[str], seed: int = 0, num_steps: int = 50, guidance_scale: float = 5.0,
                    eta: float = 1.0, negative_prompt: str = ""):
    """One image per prompt, image i seeded by `seed + i`. Returns (images (N, 3, H, W) in [0, 1], CPU)."""
    import torch

    from ddpo.sampler import sample_trajectories

    device = family.device
    negative = family.encode([negative_prompt], device)
    images = []
    for i, prompt in enumerate(prompts):
        trajectories = sample_trajectories(family, family.denoiser, family.encode([prompt], device), negative,
                                           num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                                           generator=torch.Generator().manual_seed(seed + i))
        images.append(trajectories.images)
    return torch.cat(images)


def main(argv: list[str]) -> int:
    shapes = _shapes_sampler()
    parser = argparse.ArgumentParser(prog="ddpo generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="diffusers folder, hub id, or 'shapes' (default: the checkpoint's model, else shapes)")
    parser.add_argument("--lora", help="a ddpo checkpoint folder or run folder (runs/NAME) to apply")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("-n", type=int, default=4, help="images per prompt, >= 1 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (0 .. 2**32-1)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps, >= 1 (default: the checkpoint's; without --lora {shapes[0]} for "
                             f"shapes, as configs/{SHAPES_PRESET}.yaml trains, else {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"CFG scale, >= 1; 1 turns guidance off (default: the checkpoint's; without --lora "
                             f"{shapes[1]:g} for shapes, else {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--eta", type=float, default=1.0,
                        help="stochasticity >= 0 (DDIM eta, or the flow SDE noise level): 0 is deterministic")
    parser.add_argument("--out", default="generated", help="output folder (default ./generated)")
    parser.add_argument("--quiet", action="store_true", help="print only the image paths")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    from ddpo.checkpoint import CheckpointError
    from ddpo.pipeline import ModelLoadError

    try:
        steps, guidance, source = _defaults(args)
        family = load_for_inference(args.model, args.lora)
    except (ModelLoadError, CheckpointError) as err:
        print(f"ddpo generate: {err}", file=sys.stderr)
        return 1
    limit = family.pipe.scheduler.config.num_train_timesteps
    if steps > limit:
        parser.error(f"--steps {steps}: {args.model!r} was trained with {limit} timesteps; use at most {limit}")
    _warn_long_prompts(args.prompt, family.tokenizers()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.quiet:
        print(_settings_line(args, steps, guidance, source, out), flush=True)
    for p_index, prompt in enumerate(args.prompt):
        images = generate_images(family, [prompt] * args.n, seed=args.seed, num_steps=steps, guidance_scale=guidance,
                                 eta=args.eta)
        for i, image in enumerate(images):
            path = out / f"p{p_index:02d}_seed{args.seed + i:04d}.png"
            _to_pil(image).save(path)
            print(path)
    return 0


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse values that would fail (or silently do nothing) after the model loads, as argparse errors (exit 2)."""
    from ddpo.config import SEED_MAX

    if args.n < 1:
        parser.error(f"-n {args.n}: must be >= 1")
    if not 0 <= args.seed <= SEED_MAX:
        parser.error(f"--seed {args.seed}: must be in [0, {SEED_MAX}]")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1):
        parser.error(f"--guidance {args.guidance}: must be a finite number >= 1 (1 turns guidance off)")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        parser.error(f"--eta {args.eta}: must be a finite number >= 0 (0: deterministic DDIM)")


def _warn_long_prompts(prompts: list[str], tokenizer) -> None:
    """Say which prompts the text encoder will cut (it reads `model_max_length` tokens, 77 for CLIP)."""
    from prompts import check_prompt_lengths

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the grammar-oriented warning; this one names the flag
        too_long = check_prompt_lengths(prompts, tokenizer)
    for text, tokens in too_long:
        print(f"ddpo generate: warning: --prompt {text[:60]!r}{'...' if len(text) > 60 else ''} has {tokens} tokens; "
              f"the text encoder reads {tokenizer.model_max_length}, so the rest is cut", file=sys.stderr)


SHAPES_PRESET = "shapes_alignment"  # the Shapes model is sampled as this preset trains it (10 steps, guidance 2)
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 5.0  # other models without a checkpoint: Stable Diffusion's usual values


def _shapes_sampler() -> tuple[int, float]:
    from ddpo.config import load_config

    sample = load_config(SHAPES_PRESET).sample
    return sample.num_steps, sample.guidance_scale


def _defaults(args) -> tuple[int, float, dict[str, str]]:
    """Model, steps and guidance: the flags, else those the checkpoint was trained with, else shapes' (or SD's 50
    and 5). Sets `args.model` (and `args.checkpoint`) when not given. Returns (steps, guidance, where each came
    from)."""
    steps, guidance, origin = DEFAULT_STEPS, DEFAULT_GUIDANCE, "the default for models other than shapes"
    args.checkpoint = None
    if args.lora:
        from ddpo.checkpoint import find_checkpoint

        args.checkpoint = find_checkpoint(Path(args.lora))
        config = checkpoint_config(args.checkpoint)
        steps, guidance, origin = config.sample.num_steps, config.sample.guidance_scale, "the checkpoint's"
        args.model = args.model or config.model.pretrained
    elif (args.model or "shapes") == "shapes":
        (steps, guidance), origin = _shapes_sampler(), f"shapes' default, from configs/{SHAPES_PRESET}.yaml"
    args.model = args.model or "shapes"
    source = {"steps": "--steps" if args.steps else origin,
              "guidance": "--guidance" if args.guidance is not None else origin}
    return (args.steps or steps, args.guidance if args.guidance is not None else guidance, source)


def _settings_line(args, steps: int, guidance: float, source: dict[str, str], out: Path) -> str:
    """What this call uses, so that two calls can be compared (and repeated) exactly."""
    lora = f", LoRA {args.checkpoint}" if args.checkpoint is not None else " (no --lora: the base model)"
    if source["steps"] == source["guidance"]:
        sampler = f"{steps} steps, guidance {guidance:g} ({source['steps']})"
    else:
        sampler = f"{steps} steps ({source['steps']}), guidance {guidance:g} ({source['guidance']})"
    last = args.seed + args.n - 1
    seeds = f"seed {args.seed}" if args.n == 1 else f"seeds {args.seed}..{last}"
    return f"ddpo generate: model {args.model}{lora}; {sampler}, eta {args.eta:g}; {seeds} per prompt -> {out}/"


def _to_pil(image):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
