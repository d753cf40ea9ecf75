"""The Shapes world: a tiny pretrained text-to-image model and captioner shipped inside the package.

    from ddpo.shapes import pipeline_path, captioner_path
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())   # 64x64 images, 8x8x4 latents

`ddpo shapes pretrain` regenerates the shipped files; `ddpo shapes eval` measures accuracy with the
rule-based evaluator (ddpo.shapes.evaluator), which is independent of the captioner used as reward.
This module imports no heavy library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddpo.manifest import sha256_file

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
MANIFEST = "MANIFEST.json"

_REGENERATE = "regenerate them with `ddpo shapes pretrain` (about an hour on 2 CPU cores)"


class ShapesWeightsError(FileNotFoundError):
    """The shipped Shapes weights are missing or do not match their manifest."""


def write_manifest(root: Path, **extra: Any) -> Path:
    """Write root/MANIFEST.json: the sha256 of every file under `root` (except the manifest itself)."""
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps({"files": files, **extra}, indent=1) + "\n")
    return root / MANIFEST


def verify(root: Path = PRETRAINED_DIR, subfolder: str | None = None) -> None:
    """Raise ShapesWeightsError naming the first missing or corrupt file (under `subfolder`, if given)."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ShapesWeightsError(f"Shapes weights manifest {manifest_path} is missing; {_REGENERATE}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise ShapesWeightsError(f"Shapes weights manifest {manifest_path} is unreadable ({err}); {_REGENERATE}")
    for rel, digest in files.items():
        if subfolder is not None and not rel.startswith(subfolder + "/"):
            continue
        path = root / rel
        if not path.is_file():
            raise ShapesWeightsError(f"Shapes weights file {path} is missing; {_REGENERATE}")
        if sha256_file(path) != digest:
            raise ShapesWeightsError(f"Shapes weights file {path} is corrupt (sha256 mismatch); {_REGENERATE}")


def pipeline_path(root: Path = PRETRAINED_DIR) -> Path:
    """The shipped StableDiffusionPipeline folder (`model.pretrained: shapes`), verified against the manifest."""
    verify(root, "pipeline")
    return root / "pipeline"


def flow_pipeline_path(root: Path = PRETRAINED_DIR) -> Path:
    """The shipped StableDiffusion3Pipeline folder (`model.pretrained: shapes-flow`), verified against the manifest."""
    verify(root, "flow_pipeline")
    return root / "flow_pipeline"


def captioner_path(root: Path = PRETRAINED_DIR) -> Path:
    """The shipped captioner folder (config.json + model.safetensors), verified against the manifest."""
    verify(root, "captioner")
    return root / "captioner"
