"""Images with their scores as HTML: a card per image (Compare), a base | finetuned row per seed (Base vs finetuned).

Gallery captions are one cut line ("#0 seed 0 | jpeg_compre..."), and two galleries scroll on their own, losing
which base image goes with which finetuned one. Here every score is a line of its own under its image, and a pair
stays on one row. Images are embedded as data URIs (small models' 16-64 px images are scaled up by the browser with
`image-rendering: pixelated`, so they stay crisp and cost a few hundred bytes). Every text is HTML-escaped.
This module does not import gradio.
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

IMG_STYLE = "width:{w}px;height:{w}px;object-fit:contain;image-rendering:pixelated;border-radius:4px;background:#eee"


def data_uri(image) -> str:
    """A PIL image as a PNG (small images) or JPEG (large ones) data URI."""
    buf = io.BytesIO()
    small = max(image.size) <= 128
    image.convert("RGB").save(buf, format="PNG" if small else "JPEG", quality=90)
    return f"data:image/{'png' if small else 'jpeg'};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _num(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


def _delta(value: float) -> str:
    if not math.isfinite(value):
        return "<span style='color:#888'>n/a</span>"
    color = "#1a7f37" if value > 0 else ("#cf222e" if value < 0 else "#666")
    return f"<b style='color:{color}'>{value:+.4f}</b>"


def score_cards(images: list, scores: dict[str, np.ndarray], seeds: list, prompts: list[str], width: int = 180) -> str:
    """One card per image: the image, "#i · seed s", then one line per reward with its score."""
    cards = []
    for i, image in enumerate(images):
        lines = "".join(f"<div><span style='color:#555'>{html.escape(name)}</span> "
                        f"<b>{_num(float(values[i]))}</b></div>" for name, values in scores.items())
        cards.append(
            f"<div class='ddpo-card' style='width:{width}px;font-size:12px;line-height:1.35'>"
            f"<img src='{data_uri(image)}' style='{IMG_STYLE.format(w=width)}' alt='image {i}'>"
            f"<div><b>#{i}</b> · seed {html.escape(str(seeds[i]))}</div>"
            f"<div style='color:#555;overflow-wrap:anywhere'>{html.escape(prompts[i])}</div>{lines}</div>")
    return f"<div id='score-cards' style='display:flex;flex-wrap:wrap;gap:14px'>{''.join(cards)}</div>"


def pair_rows(base_images: list, tuned_images: list, base: dict[str, np.ndarray], tuned: dict[str, np.ndarray],
              seeds: list[int], prompts: list[str], width: int = 200) -> str:
    """One row per seed: prompt and seed, base image | finetuned image, and per reward base → finetuned (delta)."""
    names = [n for n in base if n in tuned]
    rows = []
    for i, (b_img, t_img) in enumerate(zip(base_images, tuned_images)):
        deltas = "".join(
            f"<div style='margin:2px 0'><span style='color:#555'>{html.escape(n)}</span><br>"
            f"{_num(float(base[n][i]))} → {_num(float(tuned[n][i]))} "
            f"{_delta(float(tuned[n][i]) - float(base[n][i]))}</div>" for n in names)
        rows.append(
            f"<div class='ddpo-pair' style='display:flex;gap:12px;align-items:flex-start;padding:8px 0;"
            f"border-bottom:1px solid #ddd;font-size:13px'>"
            f"<figure style='margin:0'><img src='{data_uri(b_img)}' style='{IMG_STYLE.format(w=width)}' "
            f"alt='base, seed {seeds[i]}'><figcaption>base</figcaption></figure>"
            f"<figure style='margin:0'><img src='{data_uri(t_img)}' style='{IMG_STYLE.format(w=width)}' "
            f"alt='finetuned, seed {seeds[i]}'><figcaption>finetuned</figcaption></figure>"
            f"<div style='min-width:180px'><div><b>#{i}</b> · seed {seeds[i]}</div>"
            f"<div style='color:#555;margin-bottom:4px;overflow-wrap:anywhere'>{html.escape(prompts[i])}</div>"
            f"{deltas}</div></div>")
    return f"<div id='versus-pair-rows'>{''.join(rows)}</div>"
