"""What the app may touch and how much work one request may ask for.

The browser can only pick from lists built from these settings: models from `model_dirs` (plus the shipped
"shapes" model, "tiny-random" and hub ids), checkpoints and runs from `runs_dir`, rewards and their options from
`reward_options` (merged over the operator's `reward_config`). Every numeric input is checked against `Limits` on
the server, because a gradio_client call skips the sliders' bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class UIError(ValueError):
    """Bad input from the browser; the message is shown to the user as is."""


@dataclass(frozen=True)
class Limits:
    max_images: int = 16  # images per request (generation or upload)
    max_steps: int = 100  # denoising steps
    max_guidance: float = 20.0
    max_seed: int = 2**31 - 1
    max_prompt_chars: int = 500
    max_prompts_shown: int = 500  # rows in the Prompts tab
    max_episodes: int = 20  # steering episodes per request
    max_upload_mb: int = 10


@dataclass
class AppSettings:
    runs_dir: Path = Path("runs")
    model_dirs: list[Path] = field(default_factory=list)
    default_model: str | None = None  # None: "shapes" when its weights verify, else "tiny-random"
    allow_hub: bool = True  # accept hub ids ("org/name") typed into the model box
    limits: Limits = field(default_factory=Limits)
    generation_concurrency: int = 1  # generation/scoring requests that run at once; the rest queue
    train_python: str | None = None  # interpreter for `ddpo train` (default: this one)
    # The operator's --reward-config: reward name -> kwargs merged into every request for that reward (URLs, keys'
    # environment variables, own captioners; trusted, because the operator wrote it). See reward_options.
    reward_config: dict[str, dict] = field(default_factory=dict)


def check_int(name: str, value: float | int | None, low: int, high: int) -> int:
    """An integer input within [low, high], else a UIError naming the input and its range."""
    if value is None or float(value) != int(value):
        raise UIError(f"{name} must be a whole number between {low} and {high}, got {value!r}")
    if not low <= int(value) <= high:
        raise UIError(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


def check_float(name: str, value: float | None, low: float, high: float) -> float:
    if value is None or not low <= float(value) <= high:
        raise UIError(f"{name} must be between {low} and {high}, got {value!r}")
    return float(value)
