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
        with gr.Tab("Compare rewards", id="compare") as compare:
            compare_ckpt = compare_tab.build(settings, model)
        with gr.Tab("Base vs finetuned", id="versus") as versus:
            versus_ckpt = versus_tab.build(settings, model)
        with gr.Tab("Train", id="train") as train:
            watch = train_tab.build(settings, manager)
        with gr.Tab("Prompts", id="prompts"):
            prompts_tab.build(settings)
        with gr.Tab("Steering", id="steering") as steering:
            steer_run = steer_tab.build(settings)
        _follow_runs(settings, manager, demo, compare, versus, train, steering, compare_ckpt, versus_ckpt, watch,
                     steer_run)
    demo.queue(max_size=32, default_concurrency_limit=4)
    demo.training = manager  # so the launcher (and tests) can stop a run when the app closes
    return demo


def _follow_runs(settings, manager, demo, compare, versus, train, steering, compare_ckpt, versus_ckpt, watch,
                 steer_run) -> None:
    """Pickers list the runs and checkpoints there are now: on page load, when their tab is opened, and when
    the picker gets focus, so a run started after the page loaded is there without a Refresh button."""
    import gradio as gr

    from ddpo.ui.pickers import NO_CHECKPOINT, checkpoint_choices, list_runs, newest_checkpoint

    def checkpoints(current, prefer_newest):
        choices = checkpoint_choices(settings.runs_dir)
        keep = current in choices and not (prefer_newest and current == NO_CHECKPOINT)
        return gr.Dropdown(choices=choices, value=current if keep else
                           (newest_checkpoint(settings.runs_dir) if prefer_newest else NO_CHECKPOINT))

    def runs(current):
        names = [r.name for r in list_runs(settings.runs_dir)]
        if current in names:
            return gr.Dropdown(choices=names)
        value = manager.run_name if manager.run_name in names else (names[0] if names else None)
        return gr.Dropdown(choices=names, value=value)

    quiet = {"api_name": False, "queue": False, "show_progress": "hidden"}
    on_compare = lambda current: checkpoints(current, False)  # noqa: E731
    on_versus = lambda current: checkpoints(current, True)  # noqa: E731
    for trigger in (demo.load, compare.select, compare_ckpt.focus):
        trigger(on_compare, compare_ckpt, compare_ckpt, **quiet)
    for trigger in (demo.load, versus.select, versus_ckpt.focus):
        trigger(on_versus, versus_ckpt, versus_ckpt, **quiet)
    for trigger in (demo.load, train.select, watch.focus):
        trigger(runs, watch, watch, **quiet)
    if steer_run is not None:
        from ddpo.ui.steer_tab import refresh_runs

        steer_env, steer_dropdown = steer_run
        for trigger in (demo.load, steering.select, steer_dropdown.focus):
            trigger(lambda env, current: refresh_runs(settings, env, current), [steer_env, steer_dropdown],
                    steer_dropdown, **quiet)
