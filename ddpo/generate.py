"""`ddpo generate`: images from a base model and an optional DDPO checkpoint, with fixed seeds.

Image i of a call uses seed `seed + i` for its initial noise (and its DDIM noise when eta > 0), so
`--seed 0 -n 4` gives the same four images with any batch size, and base and finetuned models given the
same seeds can be compared side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_for_inference(model: str, lora: str | None = None, device: str | None = None):
    """The pipeline of `model` with the weights of a `ddpo train` checkpoint (LoRA or full UNet) applied.

    `lora` is a checkpoint folder, or a run folder (its newest checkpoint).
    """
    import torch

    from ddpo.pipeline import load_pipeline

    pipe = load_pipeline(model)
    if lora:
        from ddpo.checkpoint import LORA_FILE, find_checkpoint

        folder = find_checkpoint(Path(lora))
        if (folder / LORA_FILE).is_file():
            pipe.load_lora_weights(str(folder))
        else:
            from diffusers import UNet2DConditionModel

            pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def generate_images(pipe, prompts: list[str], seed: int = 0, num_steps: int = 50, guidance_scale: float = 5.0,
                    eta: float = 1.0, negative_prompt: str = ""):
    """One image per prompt, image i seeded by `seed + i`. Returns (images (N, 3, H, W) in [0, 1], CPU)."""
    import torch

    from ddpo.sampler import encode_prompts, sample_trajectories

    device = pipe.unet.device
    negative = encode_prompts(pipe, [negative_prompt], device)
    images = []
    for i, prompt in enumerate(prompts):
        trajectories = sample_trajectories(pipe, pipe.unet, encode_prompts(pipe, [prompt], device), negative,
                                           num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                                           generator=torch.Generator().manual_seed(seed + i))
        images.append(trajectories.images)
    return torch.cat(images)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ddpo generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="diffusers folder, hub id, or 'shapes' (default)")
    parser.add_argument("--lora", help="a ddpo checkpoint folder or run folder (runs/NAME) to apply")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's, else 50)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the checkpoint's, else 5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta: 1 as in training, 0 deterministic")
    parser.add_argument("--out", default="generated", help="output folder (default ./generated)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("-n must be >= 1")
    steps, guidance = _defaults(args)
    from ddpo.checkpoint import CheckpointError
    from ddpo.pipeline import ModelLoadError

    try:
        pipe = load_for_inference(args.model, args.lora)
    except (ModelLoadError, CheckpointError) as err:
        print(f"ddpo generate: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p_index, prompt in enumerate(args.prompt):
        images = generate_images(pipe, [prompt] * args.n, seed=args.seed, num_steps=steps, guidance_scale=guidance,
                                 eta=args.eta)
        for i, image in enumerate(images):
            path = out / f"p{p_index:02d}_seed{args.seed + i:04d}.png"
            _to_pil(image).save(path)
            print(path)
    return 0


def _defaults(args) -> tuple[int, float]:
    """Steps and guidance: the flags, else those the checkpoint was trained with, else SD's 50 and 5."""
    steps, guidance = 50, 5.0
    if args.lora:
        from ddpo.checkpoint import find_checkpoint
        from ddpo.config import config_from_file

        config = config_from_file(find_checkpoint(Path(args.lora)) / "config.yaml")
        steps, guidance = config.sample.num_steps, config.sample.guidance_scale
    elif args.model == "shapes":
        from ddpo.config import load_config

        sample = load_config("shapes_alignment").sample
        steps, guidance = sample.num_steps, sample.guidance_scale
    return (args.steps or steps, args.guidance if args.guidance is not None else guidance)


def _to_pil(image):
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
