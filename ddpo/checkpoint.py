"""Checkpoints: `runs/<name>/checkpoints/epoch_NNNN/`, written atomically, verified on load.

A checkpoint folder holds
- `pytorch_lora_weights.safetensors` (LoRA; loadable by diffusers' `pipe.load_lora_weights(folder)`) or `unet/`
  or `transformer/` (full finetuning; the family's diffusers model folder),
- `optimizer.pt` (the optimizer's state, loaded with `weights_only=True`),
- `trainer_state.json` (`epochs_done`, per-prompt stat-tracker buffers, RNG states),
- `config.yaml` (the resolved config), and
- `manifest.json` (sha256 of every file above), written last: a folder without a valid manifest is refused, and
  so is one whose manifest leaves out a file the checkpoint needs or that holds files the manifest does not list.

It is written to a temporary folder and renamed into place, so a crash mid-save never leaves a partial
checkpoint where `--resume` looks.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpo.config import Config, ConfigError, config_from_file, save_config
from ddpo.manifest import sha256_file

LORA_FILE = "pytorch_lora_weights.safetensors"
REQUIRED_FILES = ("config.yaml", "optimizer.pt", "trainer_state.json")  # besides the weights
DENOISER_DIRS = ("unet", "transformer")  # a fully finetuned model's folder, by family (ddpo/families)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Settings that decide the shape of the saved weights: a checkpoint only fits a run that agrees on them.
_WEIGHT_KEYS = [("model", "pretrained"), ("model", "use_lora"), ("model", "lora_rank"), ("model", "lora_alpha"),
                ("model", "lora_target_modules")]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the run's config."""


def checkpoint_dir(run_dir: Path, epochs_done: int) -> Path:
    """The folder of the checkpoint taken after `epochs_done` epochs: epoch_0001 after the first."""
    return run_dir / "checkpoints" / f"epoch_{epochs_done:04d}"


def epochs_done(state: dict) -> int:
    """Epochs a checkpoint's trainer state has completed. States written before epochs were numbered from 1
    hold only the 0-based index of the last epoch in `epoch`."""
    return int(state["epochs_done"]) if "epochs_done" in state else int(state["epoch"]) + 1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (temporary folders are not listed)."""
    folder = run_dir / "checkpoints"
    return sorted(p for p in folder.glob("epoch_[0-9][0-9][0-9][0-9]") if p.is_dir()) if folder.is_dir() else []


def rng_state() -> dict[str, Any]:
    return {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def write_checkpoint(run_dir: Path, epochs_done: int, *, weights_writer, optimizer_state: dict, trainer_state: dict,
                     config: Config, keep_last: int) -> Path:
    """Write the checkpoint after `epochs_done` epochs atomically; keep the newest `keep_last`. Main process only.

    `weights_writer(folder)` saves the model weights (LoRA file, or unet/ or transformer/ folder) into `folder`.
    """
    final = checkpoint_dir(run_dir, epochs_done)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights_writer(tmp)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    save_config(config, tmp / "config.yaml")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if final.exists():  # a previous attempt at this epoch (e.g. a resumed run): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _what_to_do(folder: Path) -> str:
    return f"Resume from an earlier checkpoint by passing its folder to --resume, or delete {folder}."


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError unless the manifest lists every file the checkpoint needs (and nothing else is in
    the folder), every listed file is present with its sha256, and the trainer state parses."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} has no manifest.json: it is incomplete or not a ddpo checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt ({err}). {_what_to_do(folder)}") from None
    _check_manifest(folder, manifest)
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
        if sha256_file(path) != digest:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its sha256 in manifest.json. "
                                  f"{_what_to_do(folder)}")
    read_trainer_state(folder)  # small: a bad one fails here, before any model loads


def _check_manifest(folder: Path, manifest: object) -> None:
    """The manifest is {relative file name: sha256} covering the weights, the optimizer, the trainer state and the
    config, and every file in the folder: a file it does not hash could otherwise be loaded unchecked."""
    if not isinstance(manifest, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) and not Path(k).is_absolute()
            and ".." not in Path(k).parts for k, v in manifest.items()):
        raise CheckpointError(f"{folder / 'manifest.json'} is not a mapping of file names to sha256 digests: the "
                              f"checkpoint cannot be verified. {_what_to_do(folder)}")
    model_dir = next((d for d in DENOISER_DIRS if any(name.startswith(f"{d}/") for name in manifest)), None)
    model_files = [name for name in manifest if model_dir and name.startswith(f"{model_dir}/")]
    weights = [LORA_FILE] if LORA_FILE in manifest or not model_files else [f"{model_dir}/config.json"]
    if model_files and not any(name.endswith(".safetensors") for name in model_files):
        weights.append(f"{model_dir}/*.safetensors")
    missing = [name for name in (*weights, *REQUIRED_FILES) if name not in manifest]
    if missing:
        raise CheckpointError(f"checkpoint {folder}: manifest.json does not list {', '.join(missing)}, which a "
                              f"checkpoint needs; it is incomplete or was edited. {_what_to_do(folder)}")
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    unlisted = sorted(on_disk - set(manifest))
    if unlisted:
        raise CheckpointError(f"checkpoint {folder} holds {', '.join(unlisted[:3])}, which manifest.json does not "
                              "list (files are only loaded once verified); remove them or use an untouched checkpoint")


def find_checkpoint(path: Path) -> Path:
    """`path` is a run folder (its newest checkpoint is taken) or a checkpoint folder. Verified before returning."""
    if (path / "manifest.json").exists() or (path / "trainer_state.json").exists():
        folder = path
    else:
        checkpoints = list_checkpoints(path)
        if not checkpoints:
            raise CheckpointError(f"no checkpoint in {path / 'checkpoints'}; pass a run folder that has saved at "
                                  "least one epoch, or a checkpoint folder")
        folder = checkpoints[-1]
    verify_checkpoint(folder)
    return folder


def check_compatible(folder: Path, config: Config) -> None:
    """Refuse a checkpoint whose weights do not fit `config` (another model or LoRA shape)."""
    try:
        saved = config_from_file(folder / "config.yaml").to_dict()
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {folder}: its config.yaml is not valid ({err}). {_what_to_do(folder)}") from None
    current = config.to_dict()
    for section, key in _WEIGHT_KEYS:
        if saved[section][key] != current[section][key]:
            raise CheckpointError(f"checkpoint {folder} was trained with {section}.{key}={saved[section][key]!r} but "
                                  f"this run has {section}.{key}={current[section][key]!r}; resume with the same value")


def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json: a mapping with at least `epoch` (int >= 0), `rng` and, since epochs are numbered from 1,
    `epochs_done` (int >= 1)."""
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}). {_what_to_do(folder)}") from None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    done = state.get("epochs_done", 1) if isinstance(state, dict) else None  # absent in states from before 1..N
    if not (_is_int(epoch) and epoch >= 0 and _is_int(done) and done >= 1 and isinstance(state.get("rng"), dict)):
        raise CheckpointError(f"{path} is not a ddpo trainer state (it needs an `epoch` >= 0 and `rng`). "
                              f"{_what_to_do(folder)}")
    return state


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_optimizer_state(folder: Path) -> dict:
    path = folder / "optimizer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:  # what torch raises for a bad file
        raise CheckpointError(f"{path} is not an optimizer state saved by ddpo ({type(err).__name__}). "
                              f"{_what_to_do(folder)}") from None
