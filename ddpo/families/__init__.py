"""Model families behind one policy interface (ddpo/families/base.py), picked from a pipeline's model_index.json.

| family | pipeline class             | denoiser                | scheduler (policy)                        |
|--------|----------------------------|-------------------------|-------------------------------------------|
| `sd`   | StableDiffusionPipeline    | UNet2DConditionModel    | DDIM with eta > 0                         |
| `sdxl` | StableDiffusionXLPipeline  | UNet2DConditionModel    | DDIM with eta > 0                         |
| `sd3`  | StableDiffusion3Pipeline   | SD3Transformer2DModel   | flow matching, Flow-GRPO SDE              |
| `flux` | FluxPipeline               | FluxTransformer2DModel  | flow matching, Flow-GRPO SDE              |

`load_family(name)` takes a local folder, a hub id, "shapes" or "shapes-flow" (shipped with ddpo) or a tiny random pipeline built in
code ("tiny-random" for sd, "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux"), for tests and smoke runs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from ddpo.families.base import Cond, Family
from ddpo.families.flow import FluxFamily, SD3Family
from ddpo.families.sd import SDFamily, SDXLFamily

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (SDFamily, SDXLFamily, SD3Family, FluxFamily)}
TINY = {"tiny-random": "sd", "tiny-random-sdxl": "sdxl", "tiny-random-sd3": "sd3", "tiny-random-flux": "flux"}
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

__all__ = ["Cond", "Family", "FAMILIES", "ModelLoadError", "family_class", "load_family", "read_model_index"]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to pass a local folder."""


def family_class(name: str, revision: str | None = None) -> type[Family]:
    """The family of model `name`, from its model_index.json alone (no weights are read)."""
    if name in TINY:
        return FAMILIES[TINY[name]]
    class_name = read_model_index(name, revision).get("_class_name")
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = ", ".join(f"{c} ({f.name})" for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ModelLoadError(f"{name!r} is a {class_name} (its model_index.json); ddpo trains {known}. "
                         "See docs/models.md for how to add a family.")


def read_model_index(name: str, revision: str | None = None) -> dict[str, Any]:
    """The parsed model_index.json of a local folder, "shapes", or a hub id (from the cache when offline)."""
    path = Path(resolve(name))
    if path.is_dir():
        return json.loads((path / "model_index.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "model_index.json", revision=revision)).read_text())
    except Exception as err:  # offline, not cached, no such repo: all say the same thing to the user
        raise ModelLoadError(_load_hint(name, err)) from err


def load_family(name: str, revision: str | None = None) -> Family:
    """The pipeline `name` as its family, with its tokenizers checked and progress bars off."""
    if not sys.stderr.isatty():  # see ddpo/__init__.py: no loading bars in a redirected log
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    cls = family_class(name, revision)
    if name in TINY:
        from ddpo import tiny

        builder = {"sd": tiny.build_tiny_pipeline, "sdxl": tiny.build_tiny_sdxl_pipeline,
                   "sd3": tiny.build_tiny_sd3_pipeline, "flux": tiny.build_tiny_flux_pipeline}[cls.name]
        family = cls(builder(seed=0))
    else:
        try:
            family = cls.load(resolve(name), revision)
        except (OSError, ValueError, EnvironmentError) as err:
            raise ModelLoadError(_load_hint(name, err)) from err
    for tokenizer in family.tokenizers():
        if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
            raise ModelLoadError(f"a tokenizer of {name!r} is empty: its tokenizer folder is missing or unreadable "
                                 "(with HF_HUB_OFFLINE=1, transformers returns an empty tokenizer instead of failing)")
    for module in family.frozen_modules():  # never trained: no dropout (T5 has some), as from_pretrained leaves them
        module.eval()
    family.pipe.set_progress_bar_config(disable=True)
    return family


def resolve(name: str) -> str:
    """"shapes", "shapes-flow" -> the shipped folders; a local path is checked for model_index.json; anything else is a hub id."""
    if name in ("shapes", "shapes-flow"):
        from ddpo.shapes import flow_pipeline_path, pipeline_path

        try:
            return str(pipeline_path() if name == "shapes" else flow_pipeline_path())
        except FileNotFoundError as err:  # missing or corrupt shipped weights: the message says how to rebuild
            raise ModelLoadError(str(err)) from None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder: it has no model_index.json "
                                 "(save one with `pipe.save_pretrained(folder)`)")
        return str(path)
    return name


def _load_hint(name: str, err: Exception) -> str:
    return (f"could not load the model {name!r}: {type(err).__name__}: {err}\n"
            f"If this is a hub id and this machine is offline (HF_HUB_OFFLINE=1) or the model is not cached, "
            f"download it where there is internet, e.g. `huggingface-cli download {name} --local-dir ./models/sd`, "
            f"copy the folder here and pass model.pretrained=./models/sd (any local diffusers folder with a "
            f"model_index.json works). For an offline model that ships with ddpo, use model.pretrained=shapes.")
