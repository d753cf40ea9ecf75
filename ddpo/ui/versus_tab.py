"""Tab 2, Base vs finetuned: the same prompts and seeds through the base model and a checkpoint, with reward deltas."""

from __future__ import annotations

import math

import gradio as gr
import numpy as np

from ddpo.ui import cards, reward_options, scoring
from ddpo.ui.compare_tab import reward_inputs
from ddpo.ui.pickers import checkpoint_choices, model_choices, newest_checkpoint, resolve_checkpoint, resolve_model
from ddpo.ui.settings import AppSettings, UIError
from ddpo.ui.widgets import check_generation, generation_inputs, readable_errors


def delta_rows(base: scoring.Scored, tuned: scoring.Scored, prompts: list[str], seeds: list[int]):
    """(headers, rows, summary markdown): per image and reward, base score, finetuned score and their difference.

    The deltas come first (after image and seed), so a wide table does not push them off-screen."""
    names = [n for n in base.scores if n in tuned.scores]
    headers = ["image", "seed", *(f"{n} delta" for n in names), "prompt"]
    for n in names:
        headers += [f"{n} base", f"{n} finetuned"]
    rows = []
    for i, prompt in enumerate(prompts):
        pairs = [(float(base.scores[n][i]), float(tuned.scores[n][i])) for n in names]
        row = [i, seeds[i], *(_r(t - b) for b, t in pairs), prompt]
        for b, t in pairs:
            row += [_r(b), _r(t)]
        rows.append(row)
    lines = ["| reward | base mean | finetuned mean | mean delta | images improved |", "|---|---|---|---|---|"]
    for n in names:
        b, t = base.scores[n].astype(np.float64), tuned.scores[n].astype(np.float64)
        d = t - b
        lines.append(f"| {n} | {np.nanmean(b):.4f} | {np.nanmean(t):.4f} | {_f(np.nanmean(d))} | "
                     f"{int(np.sum(d > 0))} / {int(np.sum(np.isfinite(d)))} |")
    return headers, rows, "\n".join(lines)


def build(settings: AppSettings, model: str):
    """The tab; returns the checkpoint picker (refreshed when the tab is opened)."""
    with gr.Row():
        with gr.Column(scale=1):
            model_box = gr.Dropdown(model_choices(settings), value=model, label="Base model",
                                    allow_custom_value=True, elem_id="versus-model")
            ckpt = gr.Dropdown(checkpoint_choices(settings.runs_dir), value=newest_checkpoint(settings.runs_dir),
                               label="Finetuned checkpoint (RUN: its newest)", allow_custom_value=True,
                               elem_id="versus-ckpt")
            go = gr.Button("Generate both and score", variant="primary", elem_id="versus-go")
            gen = generation_inputs(settings, model, "versus")
            rewards = reward_inputs(settings, model, "versus")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="versus-summary")
            pairs = gr.HTML("<p style='color:#666'>Each seed's base and finetuned images appear here side by side, "
                            "with every reward's change.</p>", elem_id="versus-pairs")
            table = gr.Dataframe(label="Per image: deltas, then base and finetuned scores", interactive=False,
                                 elem_id="versus-table")
            with gr.Accordion("Galleries (full-size images)", open=False):
                with gr.Row():
                    base_gallery = gr.Gallery(label="Base", columns=2, height="auto", elem_id="versus-base")
                    tuned_gallery = gr.Gallery(label="Finetuned", columns=2, height="auto", elem_id="versus-tuned")

    @readable_errors
    def versus(model_label, ckpt_label, source, prompt, grammar, split, n, seed, steps, guidance,
               names, weights, normalize, options, progress=gr.Progress()):
        from rewards.images import to_pil

        jobs = reward_options.reward_jobs(settings.reward_config, names, options, weights, normalize)
        request = check_generation(settings, source, prompt, grammar, split, n, seed, steps, guidance)
        model_name, lora = resolve_model(settings, model_label), resolve_checkpoint(settings, ckpt_label)
        if lora is None:
            raise UIError("choose a finetuned checkpoint to compare with the base model")
        seeds = [request.seed + i for i in range(len(request.prompts))]
        galleries, scored, small = [], [], []
        for label, which in (("base", None), ("finetuned", lora)):
            progress(0, desc=f"loading the {label} model")
            pipe = scoring.get_pipeline(model_name, which)
            images = scoring.generate(
                pipe, request.prompts, request.seed, request.steps, request.guidance, eta=1.0,
                progress=lambda i, t, label=label: progress((i, t), desc=f"generating ({label})", unit="images"))
            progress(1.0, desc=f"scoring ({label})")
            result = scoring.score_images(images, request.prompts, request.metadata, jobs)
            scored.append(result)
            small.append(to_pil(images))
            galleries.append(list(zip(scoring.to_display(images), scoring.gallery_captions(result, seeds))))
        headers, rows, summary_md = delta_rows(scored[0], scored[1], request.prompts, seeds)
        extra = scoring.notes(scored[0])
        html = cards.pair_rows(small[0], small[1], scored[0].scores, scored[1].scores, seeds, request.prompts)
        return galleries[0], galleries[1], summary_md + ("\n\n" + extra if extra else ""), \
            {"headers": headers, "data": rows}, html

    inputs = [model_box, ckpt, *gen.as_list(), *rewards]
    outputs = [base_gallery, tuned_gallery, summary, table, pairs]
    go.click(versus, inputs, outputs, api_name="base_vs_finetuned", concurrency_id="generation",
             concurrency_limit=settings.generation_concurrency)
    gen.prompt.submit(versus, inputs, outputs, api_name=False, concurrency_id="generation",
                      concurrency_limit=settings.generation_concurrency)
    return ckpt


def _r(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _f(value: float) -> str:
    return f"{value:+.4f}" if math.isfinite(value) else "n/a"
