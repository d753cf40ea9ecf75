"""The only paths the browser can reach: models in the model folders, runs and checkpoints in the runs folder.

Pickers offer labels ("shapes", "runs-name/epoch_0003"); the server maps a label back to a path only if it is one
of the labels it would offer now, so a crafted request cannot name any other file.
"""

from __future__ import annotations

import re
from pathlib import Path

from ddpo.config import RUN_NAME
from ddpo.ui.settings import AppSettings, UIError

# The model families' tiny random pipelines (ddpo/families) and the shipped Shapes models (when they verify).
BUILTIN_MODELS = ("shapes", "tiny-random", "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NO_CHECKPOINT = "(none: base model)"


def shapes_available() -> tuple[bool, str]:
    """(True, "") if the shipped Shapes pipeline verifies against its manifest, else (False, why not)."""
    try:
        from ddpo.shapes import pipeline_path

        pipeline_path()
        return True, ""
    except Exception as err:  # missing weights, corrupt file, module not there yet: all mean "not usable"
        return False, f"{type(err).__name__}: {err}"


def default_model(settings: AppSettings) -> tuple[str, str]:
    """(model label, notice for the user or "")."""
    if settings.default_model:
        return settings.default_model, ""
    ok, why = shapes_available()
    if ok:
        return "shapes", ""
    return "tiny-random", (f"The shipped Shapes model is not available ({why}), so the app starts on "
                           "'tiny-random', a random model that draws noise. Pick another model to see real images.")


def _model_folders(settings: AppSettings) -> list[Path]:
    folders = []
    for root in settings.model_dirs:
        if (root / "model_index.json").is_file():
            folders.append(root)
        elif root.is_dir():
            folders += sorted(p for p in root.iterdir() if (p / "model_index.json").is_file())
    return folders


def model_choices(settings: AppSettings) -> list[str]:
    return [*BUILTIN_MODELS, *_shipped_flow_model(), *(str(p) for p in _model_folders(settings))]


def _shipped_flow_model() -> list[str]:
    """["shapes-flow"] if the shipped Shapes flow model verifies against its manifest, else []."""
    try:
        from ddpo.shapes import flow_pipeline_path

        flow_pipeline_path()
        return ["shapes-flow"]
    except Exception:  # not shipped yet, missing or corrupt: not offered
        return []


def resolve_model(settings: AppSettings, label: str | None) -> str:
    """The `model` argument of `load_for_inference` for a picker label, or a UIError."""
    label = (label or "").strip()
    if label in model_choices(settings):
        return label
    if settings.allow_hub and HUB_ID.fullmatch(label) and ".." not in label and not Path(label).exists():
        return label
    hub = " or a hub id (org/name)" if settings.allow_hub else ""
    raise UIError(f"model {label!r} is not one of the offered models{hub}; local folders must be under a "
                  "--model-dir given when the app started")


def list_runs(runs_dir: Path) -> list[Path]:
    """`ddpo train` run folders (with a config.yaml, or the app's training log), newest first.

    Steering runs (config.json) are listed by the Steering tab instead."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)
            and any((p / f).is_file() for f in ("config.yaml", "app_train.log"))]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def checkpoint_choices(runs_dir: Path) -> list[str]:
    """NO_CHECKPOINT, then per run: "RUN" (its newest checkpoint) and "RUN/epoch_NNNN" for each checkpoint."""
    choices = [NO_CHECKPOINT]
    for run in list_runs(runs_dir):
        folder = run / "checkpoints"
        epochs = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("epoch_")) \
            if folder.is_dir() else []
        if epochs:
            choices += [run.name] + [f"{run.name}/{e}" for e in reversed(epochs)]
    return choices


def resolve_checkpoint(settings: AppSettings, label: str | None) -> str | None:
    """The `lora` argument of `load_for_inference` (a folder inside the runs folder) or None for the base model."""
    if not label or label == NO_CHECKPOINT:
        return None
    if label not in checkpoint_choices(settings.runs_dir):
        raise UIError(f"checkpoint {label!r} is not in the runs folder {settings.runs_dir}; "
                      "pick one from the list")
    run, _, epoch = label.partition("/")
    return str(settings.runs_dir / run / "checkpoints" / epoch) if epoch else str(settings.runs_dir / run)


def resolve_run(settings: AppSettings, name: str | None) -> Path:
    """A run folder inside the runs folder, by name."""
    name = (name or "").strip()
    runs = {p.name: p for p in list_runs(settings.runs_dir)}
    if name not in runs:
        raise UIError(f"no run named {name!r} in {settings.runs_dir}")
    return runs[name]


def newest_checkpoint(runs_dir: Path) -> str:
    """The label of the newest run's newest checkpoint (what a person most likely wants to compare), else
    NO_CHECKPOINT."""
    choices = checkpoint_choices(runs_dir)
    return choices[1] if len(choices) > 1 else NO_CHECKPOINT
