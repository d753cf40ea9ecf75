"""The `ddpo` command line: one sub-command per stage of the data flow.

Each sub-command's own module parses its arguments, and is imported only when that command runs,
so `ddpo --help` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ddpo.train_cli:main", "finetune a diffusion model with DDPO (default: the offline Shapes world)"),
    "generate": ("ddpo.generate:main", "generate images from a base model and an optional LoRA checkpoint"),
    "score": ("rewards.cli:score_main", "score images with one or more reward functions"),
    "serve-reward": ("rewards.cli:serve_main", "serve a reward function over HTTP (JSON + PNG, no pickle)"),
    "prompts": ("prompts.cli:main", "list, sample and check prompt grammars"),
    "shapes": ("ddpo.shapes.cli:main", "the Shapes world: pretrain, evaluate"),
    "steer": ("ddpo.steering.cli:main", "steer frozen diffusion control policies with latent-noise RL (DSRL)"),
    "app": ("app:main", "open the Gradio UI on 127.0.0.1:7860"),
}


# Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them.
EXTRAS: dict[str, str] = {
    "gymnasium": "steering", "stable_baselines3": "steering", "mujoco": "steering", "imageio": "steering",
    "gradio": "app", "gradio_client": "app", "wandb": "wandb", "bitsandbytes": "bnb", "xformers": "xformers",
    "ImageReward": "rewards-extra", "hpsv2": "rewards-extra",
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ddpo <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `ddpo <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            # `ddpo` alone runs nothing heavy: the default job is `ddpo train`.
            print(_usage())
            return 0
        print(_usage())
        return 0
    if argv[0] == "--version":
        from ddpo import __version__

        print(f"ddpo {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ddpo: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(rest)
    except ModuleNotFoundError as err:
        extra = EXTRAS.get((err.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"ddpo {name}: this needs the {extra!r} extra ({err.name} is not installed); install it with\n"
              f'  pip install -c constraints.txt -e ".[{extra}]"', file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
