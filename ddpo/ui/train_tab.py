"""Tab 3, Train: start and stop `ddpo train` from a preset, watch its reward curve, sample grid and log."""

from __future__ import annotations

import json

import gradio as gr

from ddpo.ui.pickers import list_runs, model_choices, resolve_model, resolve_run
from ddpo.ui.settings import AppSettings, UIError, check_float, check_int
from ddpo.ui.training import TrainingManager, check_overrides, curve_frame, latest_sample, log_tail, read_metrics, \
    runs_table
from ddpo.ui.widgets import grammar_choices, readable_errors, reward_choices

MAX_EPOCHS, MAX_BATCH, MIN_LR, MAX_LR = 100_000, 64, 1e-8, 1.0  # the bounds of the inputs below
RUN_HEADERS = ["run", "epochs logged", "last reward_mean", "checkpoints", "modified"]
FIELDS = ("model.pretrained", "reward.name", "prompts.grammar", "train.algorithm", "train.num_epochs",
          "train.learning_rate", "sample.num_steps", "sample.batch_size")


def preset_values(preset: str | None) -> list:
    """The main fields of a preset, in FIELDS order (a shipped preset only: `load_config` also reads YAML files)."""
    from ddpo.config import list_presets, load_config

    if not preset:
        return [gr.update() for _ in FIELDS]
    if preset not in list_presets():
        raise UIError(f"preset {preset!r} is not one of {', '.join(list_presets())}")
    c = load_config(preset)
    return [c.model.pretrained, c.reward.name, c.prompts.grammar, c.train.algorithm, c.train.num_epochs,
            c.train.learning_rate, c.sample.num_steps, c.sample.batch_size]


def field_overrides(settings: AppSettings, values: list) -> list[str]:
    """key=value overrides for the main fields, each checked against what the pickers offer and the inputs' bounds.

    The reward's kwargs are the preset's, merged with the operator's --reward-config for that reward (never the
    browser's: a reward or captioner may name code, a URL or a key)."""
    model, reward, grammar, algorithm, epochs, lr, steps, batch = values
    from ddpo.config import ALGORITHMS

    resolve_model(settings, model)
    if reward not in reward_choices(settings):
        raise UIError(f"reward {reward!r} is not one of {', '.join(reward_choices(settings))}")
    if grammar not in grammar_choices():
        raise UIError(f"grammar {grammar!r} is not a built-in grammar")
    if algorithm not in ALGORITHMS:
        raise UIError(f"algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    numbers = [f"train.num_epochs={check_int('epochs', epochs, 1, MAX_EPOCHS)}",
               f"train.learning_rate={check_float('learning rate', lr, MIN_LR, MAX_LR)}",
               f"sample.num_steps={check_int('denoising steps', steps, 1, settings.limits.max_steps)}",
               f"sample.batch_size={check_int('sample batch size', batch, 1, MAX_BATCH)}"]
    operator = settings.reward_config.get(reward)
    return [f"model.pretrained={model}", f"reward.name={reward}", f"prompts.grammar={grammar}",
            f"train.algorithm={algorithm}", *numbers, *([f"reward.kwargs={json.dumps(operator)}"] if operator else [])]


def build(settings: AppSettings, manager: TrainingManager) -> None:
    from ddpo.config import ALGORITHMS, list_presets

    presets = list_presets()
    preset0 = "shapes_alignment" if "shapes_alignment" in presets else (presets[0] if presets else None)
    values = preset_values(preset0)
    lim = settings.limits
    with gr.Row():
        with gr.Column(scale=1):
            preset = gr.Dropdown(presets, value=preset0, label="Preset", elem_id="train-preset")
            run_name = gr.Textbox("", label="Run name (empty: a timestamp)", max_length=80, elem_id="train-name")
            fields = [
                gr.Dropdown(model_choices(settings), value=values[0], label="Model",
                            allow_custom_value=True),
                gr.Dropdown(reward_choices(settings), value=values[1], label="Reward"),
                gr.Dropdown(grammar_choices(), value=values[2], label="Prompt grammar"),
                gr.Dropdown(list(ALGORITHMS), value=values[3], label="Algorithm"),
                gr.Number(values[4], label="Epochs", precision=0, minimum=1, maximum=MAX_EPOCHS),
                gr.Number(values[5], label="Learning rate", minimum=MIN_LR, maximum=MAX_LR),
                gr.Slider(1, lim.max_steps, value=values[6], step=1, label="Denoising steps"),
                gr.Slider(1, MAX_BATCH, value=values[7], step=1, label="Sample batch size"),
            ]
            extra = gr.Textbox("", lines=3, label="More overrides (key=value per line)",
                               placeholder="train.clip_range=1e-4\nsample.num_batches_per_epoch=4",
                               elem_id="train-extra")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            status = gr.Markdown(manager.status(), elem_id="train-status")
        with gr.Column(scale=2):
            with gr.Row():
                watch = gr.Dropdown([r.name for r in list_runs(settings.runs_dir)], label="Watch run", scale=4,
                                    allow_custom_value=True,                                    elem_id="train-watch")
                refresh = gr.Button("Refresh", scale=1, size="sm")
            curve = gr.LinePlot(x="epoch", y="value", color="metric", label="Reward", height=260, elem_id="train-curve")
            grid = gr.Image(label="Latest sample grid", type="pil", interactive=False, height=320)
            log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, interactive=False, autoscroll=True)
            runs = gr.Dataframe(runs_table(settings.runs_dir), headers=RUN_HEADERS, label="Runs", interactive=False)

    @readable_errors
    def on_start(preset_name, name, *rest):
        *field_values, extra_text = rest
        overrides = field_overrides(settings, list(field_values)) + check_overrides((extra_text or "").splitlines())
        started = manager.start(preset_name, name, overrides)
        return manager.status(), gr.Dropdown(choices=[r.name for r in list_runs(settings.runs_dir)], value=started)

    @readable_errors
    def on_stop():
        return manager.stop()

    @readable_errors
    def poll(run: str | None):
        """Status, the watched run's curve, latest grid and log, and the runs table (every 2 s, and via the API)."""
        table = runs_table(settings.runs_dir)
        if not run:
            return manager.status(), curve_frame([]), None, "", table
        run_dir = resolve_run(settings, run)
        grid_path = latest_sample(run_dir)
        image = None
        if grid_path is not None:
            from PIL import Image

            with Image.open(grid_path) as f:
                image = f.convert("RGB")
        return manager.status(), curve_frame(read_metrics(run_dir)), image, log_tail(run_dir), table

    preset.change(readable_errors(preset_values), preset, fields, api_name=False)
    start.click(on_start, [preset, run_name, *fields, extra], [status, watch], api_name="train_start")
    stop.click(on_stop, None, status, api_name="train_stop")
    outputs = [status, curve, grid, log, runs]
    gr.Timer(2.0).tick(poll, watch, outputs, api_name=False, show_progress="hidden", queue=False)
    refresh.click(lambda: gr.Dropdown(choices=[r.name for r in list_runs(settings.runs_dir)]), None, watch,
                  api_name=False)
    watch.change(poll, watch, outputs, api_name="train_status")
