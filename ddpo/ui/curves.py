"""Training and steering curves as matplotlib figures (shown by gr.Plot as a PNG).

Why not gr.LinePlot: in Gradio 6.31 a LinePlot with `color=` that first receives an empty DataFrame never draws
its line (the axes and tooltips appear, the path's stroke stays `none`), and the Train tab has nothing to show
until a run is chosen. A rendered figure always draws, and a band (mean ± std), several runs overlaid and
smoothing are a few lines each. Figures are built with `matplotlib.figure.Figure` (no pyplot state), so
concurrent requests do not share a current figure. This module does not import gradio.
"""

from __future__ import annotations

import math
from typing import Any

# (panel title, metrics.jsonl key, key of its std for a band or None)
TRAIN_PANELS = (("reward (mean ± std)", "reward_mean", "reward_std"),
                ("eval reward (held-out prompts)", "eval_reward_mean", "eval_reward_std"),
                ("eval score, judge (held-out prompts)", "eval_score_heldout", None),
                ("eval score, judge (training prompts)", "eval_score_train", None),
                ("loss", "loss", None), ("approx_kl", "approx_kl", None), ("clipfrac", "clipfrac", None),
                ("KL to the pretrained model", "kl_ref", None), ("samples/s", "samples_per_s", None))
STEER_PANELS = (("evaluation return (mean ± std)", "episodic_return_mean", "episodic_return_std"),
                ("training return (last 10 episodes)", "train_return_mean_last10", None),
                ("env steps/s", "env_steps_per_s", None))
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def finite(value: Any) -> float | None:
    """A metrics value as a float, or None for null, "nan"/"inf" strings, NaN, infinities and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(rows: list[dict], key: str, x_key: str = "epoch", x_offset: int = 0) -> tuple[list[float], list[float]]:
    """(x, y) of the rows where `key` is a finite number. Rows come from `training.read_metrics`, whose `epoch` is
    1..N as the log line "epoch k/N" numbers it."""
    xs, ys = [], []
    for row in rows:
        x, y = finite(row.get(x_key)), finite(row.get(key))
        if x is not None and y is not None:
            xs.append(x + x_offset)
            ys.append(y)
    return xs, ys


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average (weight 0: unchanged, 0.99: very smooth)."""
    if weight <= 0:
        return list(values)
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def _panels_with_data(runs: dict[str, list[dict]], panels, x_key: str) -> list[tuple]:
    return [p for p in panels if any(series(rows, p[1], x_key)[0] for rows in runs.values())]


def curves_figure(runs: dict[str, list[dict]], smoothing: float = 0.0, steering: bool = False, empty: str = ""):
    """One panel per metric that any run has, every run overlaid in its own colour.

    runs: run name -> metrics rows (as `training.read_metrics` returns them). With smoothing > 0 the raw values
    are drawn faintly under the smoothed line. x is the epoch (1..N, integer ticks) or, for steering runs, the
    environment step."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x_key, offset = ("env_steps", 0) if steering else ("epoch", 0)
    panels = _panels_with_data(runs, STEER_PANELS if steering else TRAIN_PANELS, x_key)
    if not panels:
        fig = Figure(figsize=(10, 1.6), dpi=90)
        fig.text(0.5, 0.5, empty or "no metrics yet", ha="center", va="center", fontsize=12, color="#555")
        return fig
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(11, 2.7 * rows_n), dpi=90, layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, (title, key, std_key) in zip(axes, panels):
        for i, (name, rows) in enumerate(runs.items()):
            color = COLORS[i % len(COLORS)]
            xs, ys = series(rows, key, x_key, offset)
            if not xs:
                continue
            if std_key:
                band = [(finite(r.get(x_key)), finite(r.get(key)), finite(r.get(std_key))) for r in rows]
                band = [(x + offset, y, s) for x, y, s in band if None not in (x, y, s)]
                if band:
                    ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                    color=color, alpha=0.15, linewidth=0)
            if smoothing > 0:
                ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
            ax.plot(xs, smooth(ys, smoothing), color=color, linewidth=2, marker="o" if len(xs) < 30 else None,
                    markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if not steering:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("env step" if steering else "epoch", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if len(runs) > 1 or smoothing > 0:
        axes[0].legend(fontsize=8, loc="best")
    return fig


def returns_figure(seed: int, base: list[float], steered: list[float] | None):
    """Per-episode returns, base against steered, one pair of bars per episode seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.8), dpi=90, layout="constrained")
    ax = fig.subplots()
    xs = list(range(len(base)))
    width = 0.4 if steered is not None else 0.6
    ax.bar([x - (width / 2 if steered is not None else 0) for x in xs], base, width, color=COLORS[0], label="base")
    if steered is not None:
        ax.bar([x + width / 2 for x in xs], steered, width, color=COLORS[1], label="steered")
    ax.set_xticks(xs, [str(seed + x) for x in xs], fontsize=8)
    ax.set_xlabel("episode seed", fontsize=9)
    ax.set_ylabel("return", fontsize=9)
    ax.set_title("return per episode", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
