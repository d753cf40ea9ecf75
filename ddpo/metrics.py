"""Run outputs a person reads: `metrics.jsonl` (one JSON object per epoch), captioned sample grids, one line per epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# Keys every metrics.jsonl row has (outside tools read them).
REQUIRED_KEYS = ("epoch", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac",
                 "samples_per_s", "sample_s", "reward_s", "train_s")


# JSON has no NaN or infinity. They are written as these strings, so that a NaN loss is not mistaken for the
# `null` of "not applicable" (approx_kl of RWR, reward_mean of an epoch whose rewards were all skipped).
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _clean(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with the strings of non-finite values back as floats."""
    return {k: NONFINITE[v] if isinstance(v, str) and v in NONFINITE else v for k, v in row.items()}


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one row; a resumed run first drops rows of epochs it is about to redo (see `truncate_metrics`)."""
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise KeyError(f"metrics row lacks {missing}")
    with open(path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep only the rows of epochs 1..epochs_done (a resumed run redoes the epochs after its checkpoint).

    Rows are numbered 1..N; a file written before that numbering (its first row is epoch 0) is renumbered."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    shift = 1 if rows and rows[0].get("epoch") == 0 else 0
    kept = [{**row, "epoch": row["epoch"] + shift} for row in rows if row["epoch"] + shift <= epochs_done]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, with "nan", "inf" and "-inf" read back as floats."""
    return [_decode(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def epoch_line(row: dict[str, Any], num_epochs: int) -> str:
    def fmt(key: str, spec: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else format(value, spec)

    line = (f"epoch {row['epoch']}/{num_epochs}  reward {fmt('reward_mean', '.4f')} ± {fmt('reward_std', '.4f')}"
            f"  loss {fmt('loss', '.3g')}  kl {fmt('approx_kl', '.2e')}  clipfrac {fmt('clipfrac', '.3f')}"
            + (f"  {row['optimizer_steps']} optimizer steps" if "optimizer_steps" in row else "")
            + (f"  grad norm {row['grad_norm']:.3g}" if row.get("grad_norm") is not None else "")
            + f"  {fmt('samples_per_s', '.2f')} samples/s (sample {row['sample_s']:.1f}s, reward wait "
            f"{row['reward_s']:.1f}s, train {row['train_s']:.1f}s)")
    if row.get("kl_ref") is not None:
        line += f"  kl to pretrained {row['kl_ref']:.2e}"
    if row.get("nonfinite_steps"):
        line += f"  {row['nonfinite_steps']} non-finite step(s) skipped"
    if row.get("fp16_skipped_steps"):
        line += f"  {row['fp16_skipped_steps']} step(s) skipped by the fp16 loss scaler"
    for key, label in (("eval_reward", "eval reward"), ("eval_score", "eval score")):
        if row.get(f"{key}_mean") is None:
            continue
        line += f"  {label} {row[f'{key}_mean']:.4f}"
        if row.get(f"{key}_heldout") is not None:
            line += f" (held-out {row[f'{key}_heldout']:.4f}, train {row[f'{key}_train']:.4f})"
    return line


def run_folder_line(run_dir: Path, config, resumed: bool = False, tensorboard: bool | None = None) -> str:
    """Where a run writes, printed when it starts and ends: the folder and what to look at in it."""
    log = config.logging
    what = [f"metrics.jsonl (a row per epoch)"]
    if log.sample_grid:
        what.append("samples/epoch_NNNN.png (a grid per epoch)")
    every = "every epoch" if log.save_every == 1 else f"every {log.save_every} epochs"
    what.append(f"checkpoints/epoch_NNNN/ ({every}, newest {log.keep_last} kept)")
    writing = log.tensorboard if tensorboard is None else tensorboard  # False when the package is missing
    if writing:
        board = f"TensorBoard: tensorboard --logdir {run_dir}"
    elif log.tensorboard:
        board = "TensorBoard: none (tensorboard is not installed)"
    else:
        board = "TensorBoard: off (logging.tensorboard=true turns it on)"
    return f"run folder {run_dir}{' (resumed)' if resumed else ''}: " + ", ".join(what) + f"; {board}"


def save_grid(images: np.ndarray, captions: list[str], path: Path, columns: int = 4) -> None:
    """images: (N, H, W, 3) uint8; each tile gets its caption underneath (wrapped)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    n, height, width, _ = images.shape
    tile = max(width, 128)
    font = ImageFont.load_default()
    chars = max(tile // 6, 10)
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions]
    text_h = 12 * max(len(w) for w in wrapped) + 4
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        grid.paste(Image.fromarray(images[i]).resize((tile, tile), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x + 2, y + tile + 2 + 12 * j), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
