"""The Gradio app (`python app.py`, `ddpo app`): the UI calls the same functions as the CLI and holds no algorithm.

    from ddpo.ui import build_app
    from ddpo.ui.settings import AppSettings
    demo = build_app(AppSettings(runs_dir=Path("runs")))
    demo.launch(server_name="127.0.0.1")

Modules: settings (limits), pickers (what the browser may name), scoring (generation and rewards), training
(the `ddpo train` child process), one module per tab, widgets (shared inputs and error display).
"""

from __future__ import annotations

from ddpo.ui.settings import AppSettings

TITLE = "ddpo: reward finetuning for diffusion models"


def build_app(settings: AppSettings):
    """The gr.Blocks of the five tabs, queued with the generation concurrency limit. Does not launch."""
    import gradio as gr

    from ddpo.ui import compare_tab, prompts_tab, steer_tab, train_tab, versus_tab
    from ddpo.ui.pickers import default_model
    from ddpo.ui.training import TrainingManager

    model, notice = default_model(settings)
    manager = TrainingManager(settings)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}")
        if notice:
            gr.Markdown(f"> {notice}", elem_id="model-notice")
        with gr.Tab("Compare rewards", id="compare"):
            compare_tab.build(settings, model)
        with gr.Tab("Base vs finetuned", id="versus"):
            versus_tab.build(settings, model)
        with gr.Tab("Train", id="train"):
            train_tab.build(settings, manager)
        with gr.Tab("Prompts", id="prompts"):
            prompts_tab.build(settings)
        with gr.Tab("Steering", id="steering"):
            steer_tab.build(settings)
    demo.queue(max_size=32, default_concurrency_limit=4)
    demo.training = manager  # so the launcher (and tests) can stop a run when the app closes
    return demo
