"""Tab 3, Train: start and stop `ddpo train` from a preset; watch its progress, curves, sample grid and log.

The right side follows the watched run every 2 s (and at once when another run is picked); what did not change
since the last tick is not sent again (gr.skip), so an idle page costs a directory listing per tick.
"""

from __future__ import annotations

import html
import json

import gradio as gr

from ddpo.ui import curves
from ddpo.ui.pickers import list_runs, model_choices, resolve_model, resolve_run
from ddpo.ui.settings import AppSettings, UIError, check_float, check_int
from ddpo.ui.training import TrainingManager, cannot_run_here, check_overrides, latest_sample, log_tail, \
    metrics_table, progress_of, read_metrics, run_status, runs_table
from ddpo.ui.widgets import grammar_choices, readable_errors, reward_choices

MAX_EPOCHS, MAX_BATCH, MIN_LR, MAX_LR = 100_000, 64, 1e-8, 1.0  # the bounds of the inputs below
RUN_HEADERS = ["run", "epochs logged", "last reward_mean", "checkpoints", "modified"]
LOG_LINES = 200
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


def preset_note(settings: AppSettings, preset: str | None, values: list, extra: str) -> str:
    """"" when the preset with these fields can run here, else a warning saying what to change (before Start)."""
    from ddpo.config import ConfigError, list_presets, load_config

    if preset not in list_presets():
        return ""
    try:
        overrides = field_overrides(settings, values) + check_overrides((extra or "").splitlines())
        problem = cannot_run_here(load_config(preset, overrides))
    except (UIError, ConfigError) as err:
        problem = str(err)
    return f"⚠️ {problem}" if problem else ""


def progress_html(run_dir, running: bool) -> str:
    """A progress bar of epochs done / planned (moving without a value while the model loads)."""
    done, total, _ = progress_of(run_dir)
    if not total:
        return ""
    bar = "<progress style='width:100%;height:14px'></progress>" if running and done == 0 else \
        f"<progress style='width:100%;height:14px' max='{total}' value='{done}'></progress>"
    return f"<div id='train-progress-bar' title='{done}/{total} epochs'>{bar}</div>"


def log_html(text: str) -> str:
    """The log in a box that starts scrolled to its newest line (column-reverse keeps the bottom in view)."""
    return ("<div class='ddpo-log' style='display:flex;flex-direction:column-reverse;height:240px;overflow:auto;"
            "border:1px solid #ccc;border-radius:6px;background:#111;color:#ddd;padding:6px'><pre style='margin:0;"
            "font-size:12px;white-space:pre-wrap;word-break:break-word;background:transparent;color:inherit'>"
            f"{html.escape(text)}</pre></div>")


def build(settings: AppSettings, manager: TrainingManager) -> None:
    from ddpo.config import ALGORITHMS, list_presets

    presets = list_presets()
    preset0 = "shapes_alignment" if "shapes_alignment" in presets else (presets[0] if presets else None)
    values = preset_values(preset0)
    lim = settings.limits
    with gr.Row():
        with gr.Column(scale=1):
            preset = gr.Dropdown(presets, value=preset0, label="Preset", elem_id="train-preset")
            note = gr.Markdown(preset_note(settings, preset0, values, ""), elem_id="train-preset-note")
            run_name = gr.Textbox("", label="Run name (empty: a timestamp; Enter starts)", max_length=80,
                                  elem_id="train-name")
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
        with gr.Column(scale=2):
            status = gr.Markdown(manager.status(), elem_id="train-status")
            bar = gr.HTML("", elem_id="train-progress")
            with gr.Row():
                watch = gr.Dropdown([r.name for r in list_runs(settings.runs_dir)], label="Watch run", scale=2,
                                    allow_custom_value=True, elem_id="train-watch")
                overlay = gr.Dropdown([r.name for r in list_runs(settings.runs_dir)], multiselect=True, scale=3,
                                      label="Overlay other runs", elem_id="train-overlay")
                smoothing = gr.Slider(0, 0.95, value=0, step=0.05, label="Smoothing", scale=1,
                                      elem_id="train-smoothing")
            plot = gr.Plot(label="Curves per epoch", show_label=False, elem_id="train-curves", format="png")
            with gr.Row():
                grid = gr.Image(label="Latest sample grid (click ⛶ for full size)", type="pil", interactive=False,
                                height=420, elem_id="train-grid")
                with gr.Column():
                    gr.Markdown("**Log** (newest line at the bottom)")
                    log = gr.HTML(log_html(""), elem_id="train-log")
            with gr.Accordion("Metrics per epoch", open=False):
                table = gr.Dataframe(label="metrics.jsonl", interactive=False, elem_id="train-metrics")
            runs = gr.Dataframe(runs_table(settings.runs_dir), headers=RUN_HEADERS, interactive=False,
                                label="Runs (click one to watch it)", elem_id="train-runs")
    seen = gr.State({})

    @readable_errors
    def on_start(preset_name, name, *rest):
        *field_values, extra_text = rest
        overrides = field_overrides(settings, list(field_values)) + check_overrides((extra_text or "").splitlines())
        started = manager.start(preset_name, name, overrides)
        return manager.status(), gr.Dropdown(choices=[r.name for r in list_runs(settings.runs_dir)], value=started)

    @readable_errors
    def on_stop():
        return manager.stop()

    def view(run: str | None, others: list | None, smooth: float, last: dict | None):
        """(status, progress bar, curves, grid, log, metrics table, runs table, watch, overlay, state); an output
        that did not change since `last` is gr.skip(). last=None redraws everything."""
        last, now = dict(last or {}), {}
        names = [r.name for r in list_runs(settings.runs_dir)]
        run_dir = resolve_run(settings, run) if run else None
        watched = [run_dir] + [resolve_run(settings, o) for o in (others or []) if o != run] if run_dir else []
        mine = run_dir is not None and run == manager.run_name
        line = manager.status()
        if run_dir is not None and not mine:
            line += "  \n" + run_status(run_dir, None, running=False)
        running = mine and manager.running()
        now["runs"] = [names, runs_table(settings.runs_dir)]
        now["curves"] = [[str(p), _stamp(p / "metrics.jsonl")] for p in watched] + [float(smooth or 0)]
        grid_path = latest_sample(run_dir) if run_dir else None
        now["grid"] = [str(grid_path), _stamp(grid_path)] if grid_path else None

        def changed(key):
            return last is None or key not in last or last.get(key) != now.get(key)

        figure = tbl = gr.skip()
        if changed("curves"):  # metrics are read and drawn only when a watched file changed
            rows = {p.name: read_metrics(p) for p in watched}
            figure = curves.curves_figure(rows, float(smooth or 0), empty="pick a run to watch, or start one")
            headers, data = metrics_table(rows.get(run_dir.name, []) if run_dir else [])
            tbl = {"headers": headers, "data": data or [[None] * len(headers)]}
        image = _load(grid_path) if changed("grid") else gr.skip()
        run_tbl = {"headers": RUN_HEADERS, "data": now["runs"][1] or [[None] * 5]} if changed("runs") else gr.skip()
        pickers = (gr.Dropdown(choices=names), gr.Dropdown(choices=names)) if last.get("runs", [None])[0] != names \
            else (gr.skip(), gr.skip())
        text = log_html(log_tail(run_dir, LOG_LINES)) if run_dir else log_html("")
        return (line, progress_html(run_dir, running) if run_dir else "", figure, image, text, tbl, run_tbl,
                *pickers, now)

    @readable_errors
    def tick(run, others, smooth, last):
        names = {r.name for r in list_runs(settings.runs_dir)}
        # a name typed into the box that is not a run (yet): no error popping up every 2 s, the status says it
        return view(run if run in names else None, [o for o in others or [] if o in names], smooth, last)

    @readable_errors
    def redraw(run, others, smooth):
        return view(run, others, smooth, None)

    def pick_from_table(evt: gr.SelectData):
        row = evt.row_value if getattr(evt, "row_value", None) else None
        return row[0] if row else gr.skip()

    preset.change(readable_errors(preset_values), preset, fields, api_name=False)
    for trigger in [preset, *fields, extra]:
        trigger.change(lambda p, *v: preset_note(settings, p, list(v[:-1]), v[-1]), [preset, *fields, extra], note,
                       api_name=False, show_progress="hidden", queue=False)
    start_inputs = [preset, run_name, *fields, extra]
    start.click(on_start, start_inputs, [status, watch], api_name="train_start")
    run_name.submit(on_start, start_inputs, [status, watch], api_name=False)
    stop.click(on_stop, None, status, api_name="train_stop")
    outputs = [status, bar, plot, grid, log, table, runs, watch, overlay, seen]
    gr.Timer(2.0).tick(tick, [watch, overlay, smoothing, seen], outputs, api_name=False, show_progress="hidden",
                       queue=False)
    watch.change(redraw, [watch, overlay, smoothing], outputs, api_name="train_status", show_progress="hidden")
    overlay.change(redraw, [watch, overlay, smoothing], outputs, api_name=False, show_progress="hidden")
    smoothing.release(redraw, [watch, overlay, smoothing], outputs, api_name=False, show_progress="hidden")
    runs.select(pick_from_table, None, watch, api_name=False)
    return watch


def _stamp(path) -> list | None:
    """What changes when a file is written: (size, mtime in ns)."""
    try:
        st = path.stat()
    except (OSError, AttributeError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _load(path):
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as f:
        return f.convert("RGB")
