"""Tab 1, Compare rewards: generate (or upload) images and score them with several rewards side by side."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ddpo.ui import cards, reward_options, scoring
from ddpo.ui.pickers import NO_CHECKPOINT, checkpoint_choices, model_choices, resolve_checkpoint, resolve_model
from ddpo.ui.settings import AppSettings, UIError
from ddpo.ui.widgets import check_generation, generation_inputs, readable_errors, reward_choices

UPLOAD_MAX_SIDE = 2048
CAPTION_HEADERS = ["image", "reward", "caption", "reference"]


def default_rewards(settings: AppSettings, model: str) -> list[str]:
    choices = reward_choices(settings)
    wanted = ["jpeg_compressibility", "vlm_bertscore"] if model == "shapes" else ["jpeg_compressibility",
                                                                                   "jpeg_incompressibility"]
    return [r for r in wanted if r in choices]


def reward_inputs(settings: AppSettings, model: str, prefix: str) -> list:
    """[rewards, weights, normalize, reward options] components; `reward_options.reward_jobs` checks their values."""
    from ddpo.ui.availability import availability_note, unavailable_rewards

    names = reward_choices(settings)
    missing = unavailable_rewards(names, settings.reward_config)
    choices = [(f"{n} (not available here)" if n in missing else n, n) for n in names]
    rewards = gr.CheckboxGroup(choices, value=default_rewards(settings, model), label="Rewards",
                               elem_id=f"{prefix}-rewards")
    if missing:
        gr.Markdown(availability_note(missing), elem_id=f"{prefix}-rewards-missing")
    with gr.Accordion("Composed reward and reward options", open=False):
        weights = gr.Textbox("", label="Composed reward: 'name: weight' pairs (empty: none)",
                             placeholder="jpeg_compressibility: 1.0, vlm_bertscore: 2.0", elem_id=f"{prefix}-weights")
        normalize = gr.Radio(["none", "batch"], value="none", label="Normalise each term (batch z-score)")
        options = gr.Code(reward_options.default_options(settings.reward_config), language="json",
                          label="Reward options (JSON: name -> options; see docs/app.md for what may be set)")
    return [rewards, weights, normalize, options]


def results(scored: scoring.Scored, images, prompts: list[str], seeds: list) -> tuple:
    """Gallery, scores table, agreement table, captions table, notes, score cards: the outputs of both actions."""
    from rewards.images import to_pil

    small = images if isinstance(images, list) else to_pil(images)
    gallery = list(zip(scoring.to_display(images), scoring.gallery_captions(scored, seeds)))
    headers, rows = scoring.score_rows(scored, prompts, seeds)
    agree_headers, agree_rows = scoring.agreement_rows(scored.scores)
    agreement_note = "" if len(prompts) >= 3 else "\n\nRank agreement needs at least 3 images."
    return (gallery, {"headers": headers, "data": rows}, {"headers": agree_headers, "data": agree_rows},
            {"headers": CAPTION_HEADERS, "data": scoring.caption_rows(scored) or [[""] * len(CAPTION_HEADERS)]},
            (scoring.notes(scored) + agreement_note).strip(), cards.score_cards(small, scored.scores, seeds, prompts))


def load_uploads(files: list | None, max_images: int) -> list:
    from rewards.images import open_image

    if not files:
        raise UIError("upload at least one image (PNG, JPEG, WebP)")
    if len(files) > max_images:
        raise UIError(f"{len(files)} images uploaded; the limit is {max_images} per request")
    images = []
    for f in files:
        path = Path(f if isinstance(f, str) else f.name)
        try:  # the decoder of ddpo score and the reward server: PNG/JPEG/WebP only, size checked before decoding
            images.append(open_image(path, path.name, max_side=UPLOAD_MAX_SIDE))
        except ValueError as err:
            raise UIError(str(err)) from None
        except OSError as err:
            raise UIError(f"{path.name} is not a readable image ({err})") from None
    return images


def build(settings: AppSettings, model: str):
    """The tab; returns the checkpoint picker (refreshed when the tab is opened)."""
    lim = settings.limits
    with gr.Row():
        with gr.Column(scale=1):
            model_box = gr.Dropdown(model_choices(settings), value=model, label="Model",
                                    allow_custom_value=True, elem_id="compare-model")
            ckpt = gr.Dropdown(checkpoint_choices(settings.runs_dir), value=NO_CHECKPOINT, label="LoRA checkpoint",
                               allow_custom_value=True, elem_id="compare-ckpt")
            go = gr.Button("Generate and score", variant="primary", elem_id="compare-go")
            gen = generation_inputs(settings, model, "compare")
            rewards = reward_inputs(settings, model, "compare")
            with gr.Accordion("Score your own images", open=False):
                uploads = gr.File(file_count="multiple", file_types=["image"],
                                  label=f"Images (at most {lim.max_images})")
                upload_prompt = gr.Textbox("", label="Prompt the images were made for", elem_id="upload-prompt")
                score_go = gr.Button("Score uploaded images", elem_id="upload-go")
        with gr.Column(scale=2):
            score_cards = gr.HTML("<p style='color:#666'>Images appear here with every reward's score under "
                                  "each.</p>", elem_id="compare-cards")
            notes = gr.Markdown(elem_id="compare-notes")
            table = gr.Dataframe(label="Scores (image x reward)", interactive=False, elem_id="compare-scores")
            agreement = gr.Dataframe(label="Rank agreement between rewards (Spearman)", interactive=False)
            captions = gr.Dataframe(label="What the VLM said", interactive=False, wrap=True,
                                    column_widths=["9%", "18%", "38%", "35%"], elem_id="compare-captions")
            with gr.Accordion("Gallery (full-size images)", open=False):
                gallery = gr.Gallery(label="Images and scores", columns=4, height="auto", object_fit="contain",
                                     elem_id="compare-gallery")
    outputs = [gallery, table, agreement, captions, notes, score_cards]

    @readable_errors
    def compare(model_label, ckpt_label, source, prompt, grammar, split, n, seed, steps, guidance,
                names, weights, normalize, options, progress=gr.Progress()):
        jobs = reward_options.reward_jobs(settings.reward_config, names, options, weights, normalize)
        request = check_generation(settings, source, prompt, grammar, split, n, seed, steps, guidance)
        model_name, lora = resolve_model(settings, model_label), resolve_checkpoint(settings, ckpt_label)
        progress(0, desc="loading the model")
        pipe = scoring.get_pipeline(model_name, lora)
        images = scoring.generate(pipe, request.prompts, request.seed, request.steps, request.guidance, eta=1.0,
                                  progress=lambda i, total: progress((i, total), desc="generating", unit="images"))
        progress(1.0, desc="scoring")
        scored = scoring.score_images(images, request.prompts, request.metadata, jobs)
        seeds = [request.seed + i for i in range(len(request.prompts))]
        return results(scored, images, request.prompts, seeds)

    @readable_errors
    def score_uploads(files, prompt, names, weights, normalize, options):
        jobs = reward_options.reward_jobs(settings.reward_config, names, options, weights, normalize)
        images = load_uploads(files, lim.max_images)
        prompt = (prompt or "").strip()[:lim.max_prompt_chars]
        prompts = [prompt] * len(images)
        scored = scoring.score_images(images, prompts, [{} for _ in images], jobs)
        return results(scored, images, prompts, ["upload"] * len(images))

    go.click(compare, [model_box, ckpt, *gen.as_list(), *rewards], outputs, api_name="compare",
             concurrency_id="generation", concurrency_limit=settings.generation_concurrency)
    score_go.click(score_uploads, [uploads, upload_prompt, *rewards], outputs, api_name="score_uploads",
                   concurrency_id="generation", concurrency_limit=settings.generation_concurrency)
    gen.prompt.submit(compare, [model_box, ckpt, *gen.as_list(), *rewards], outputs, api_name=False,
                      concurrency_id="generation", concurrency_limit=settings.generation_concurrency)
    upload_prompt.submit(score_uploads, [uploads, upload_prompt, *rewards], outputs, api_name=False,
                         concurrency_id="generation", concurrency_limit=settings.generation_concurrency)
    return ckpt
