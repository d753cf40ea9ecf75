"""Tab 5, Steering: a frozen diffusion policy against its DSRL-steered version, on the same episode seeds.

Calls `ddpo.steering.api` (the functions behind `ddpo steer eval`); shows a clear notice when it is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path

import gradio as gr

from ddpo.ui.settings import AppSettings, UIError, check_int
from ddpo.ui.widgets import readable_errors

SHIPPED = "shipped"
BASE_ONLY = "(none: base policy only)"


def steering_available() -> bool:
    try:
        return importlib.util.find_spec("ddpo.steering.api") is not None
    except ImportError:
        return False


def environments() -> list[str]:
    from ddpo.steering.api import list_base_policies

    return [p["env_id"] for p in list_base_policies()]


def steering_runs(settings: AppSettings, env_id: str | None) -> dict[str, str]:
    """Steering run name -> folder, for the runs in the runs folder trained on `env_id`."""
    from ddpo.steering.api import list_runs

    return {r["name"]: r["path"] for r in list_runs(settings.runs_dir) if r["env_id"] == env_id}


def returns_table(seed: int, base: list[float], steered: list[float] | None) -> tuple[dict, str]:
    rows = [[i, seed + i, round(b, 3), None if steered is None else round(steered[i], 3)] for i, b in enumerate(base)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    std = lambda xs: math.sqrt(mean([(x - mean(xs)) ** 2 for x in xs]))  # noqa: E731
    summary = f"**Base** return {mean(base):.2f} ± {std(base):.2f}"
    if steered is not None:
        summary += f"  ·  **Steered** return {mean(steered):.2f} ± {std(steered):.2f}  ·  " \
                   f"steered better on {sum(s > b for s, b in zip(steered, base))} / {len(base)} episodes"
    return {"headers": ["episode", "seed", "base return", "steered return"], "data": rows}, summary


def refresh_runs(settings: AppSettings, env_id: str | None, current: str | None):
    """The steering-run picker with the runs there are now, keeping the choice when it is still there."""
    choices = [BASE_ONLY, *steering_runs(settings, env_id)] if env_id else [BASE_ONLY]
    return gr.Dropdown(choices=choices, value=current if current in choices else BASE_ONLY)


def run_curve(settings: AppSettings, env_id: str | None, run_name: str | None):
    """The evaluation-return curve of a steering run (metrics.jsonl, one line per evaluation)."""
    from ddpo.ui.curves import curves_figure
    from ddpo.ui.training import read_metrics

    path = steering_runs(settings, env_id).get(run_name or "")
    rows = {run_name: read_metrics(Path(path))} if path else {}
    return curves_figure(rows, steering=True, empty="pick a steering run to see its evaluation curve")


def default_environment(settings: AppSettings, envs: list[str]) -> str | None:
    """The environment of the newest steering run in the runs folder, else Pendulum-v1 (seconds per episode on a
    CPU), else the first one."""
    from ddpo.steering.api import list_runs

    runs = sorted((r for r in list_runs(settings.runs_dir) if r["env_id"] in envs),
                  key=lambda r: Path(r["path"]).stat().st_mtime, reverse=True)
    if runs:
        return runs[0]["env_id"]
    return "Pendulum-v1" if "Pendulum-v1" in envs else (envs[0] if envs else None)


def build(settings: AppSettings):
    """The tab; returns (environment picker, steering-run picker), or None when steering is not installed."""
    if not steering_available():
        gr.Markdown("**Steering is not available in this build**: the steering API (`ddpo.steering.api`) is not "
                    "installed. Install the `steering` extra (`pip install -e .[steering]`).",
                    elem_id="steer-unavailable")
        return None
    lim = settings.limits
    envs = environments()
    env0 = default_environment(settings, envs)
    with gr.Row():
        with gr.Column(scale=1):
            env = gr.Dropdown(envs, value=env0, label="Environment", elem_id="steer-env")
            policy = gr.Dropdown([SHIPPED], value=SHIPPED, label="Base policy (the shipped diffusion policy)")
            run = gr.Dropdown([BASE_ONLY, *steering_runs(settings, env0)], value=BASE_ONLY,
                              allow_custom_value=True, label="Steering checkpoint (a `ddpo steer train` run)",
                              elem_id="steer-run")
            go = gr.Button("Run episodes", variant="primary", elem_id="steer-go")
            with gr.Row():
                episodes = gr.Slider(1, lim.max_episodes, value=min(5, lim.max_episodes), step=1, label="Episodes")
                seed = gr.Number(0, label="Seed (episode i uses seed + i)", precision=0, minimum=0,
                                 maximum=lim.max_seed)
            render = gr.Checkbox(True, label="Render the first episode")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="steer-summary")
            chart = gr.Plot(label="Return per episode", show_label=False, elem_id="steer-chart", format="png")
            video = gr.Image(label="First episode", type="filepath", interactive=False, height=360,
                             elem_id="steer-video")
            table = gr.Dataframe(label="Returns", interactive=False)
            curve = gr.Plot(run_curve(settings, env0, None), show_label=False,
                            elem_id="steer-curve", format="png")

    @readable_errors
    def on_run(env_id, policy_label, run_name, n, seed_value, do_render, progress=gr.Progress()):
        from ddpo.steering.api import run_episodes
        from ddpo.ui.curves import returns_figure

        if env_id not in environments():
            raise UIError(f"environment {env_id!r} has no shipped base policy; "
                          f"choose one of {', '.join(environments())}")
        if policy_label != SHIPPED:
            raise UIError(f"base policy {policy_label!r} is not offered; use {SHIPPED!r}")
        n = check_int("episodes", n, 1, lim.max_episodes)
        seed_value = check_int("seed", seed_value, 0, lim.max_seed)
        runs = steering_runs(settings, env_id)
        if run_name not in (BASE_ONLY, *runs):
            raise UIError(f"steering run {run_name!r} is not a {env_id} run in {settings.runs_dir}")
        progress(0, desc="running episodes")
        from gradio.utils import get_upload_folder

        folder = Path(get_upload_folder()) / "steering"
        folder.mkdir(parents=True, exist_ok=True)
        base, steered, gif = run_episodes(env_id, None, runs.get(run_name), n=n, seed=seed_value,
                                          render=bool(do_render), video_dir=tempfile.mkdtemp(dir=folder))
        rows, text = returns_table(seed_value, base, steered)
        label = "First episode: base (left) | steered (right)" if steered is not None else \
            "First episode: base policy"
        return text, rows, gr.Image(value=gif, label=label), returns_figure(seed_value, base, steered)

    env.change(lambda e: refresh_runs(settings, e, None), env, run, api_name=False)
    run.change(lambda e, r: run_curve(settings, e, r), [env, run], curve, api_name=False, show_progress="hidden")
    go.click(on_run, [env, policy, run, episodes, seed, render], [summary, table, video, chart], api_name="steer",
             concurrency_id="generation", concurrency_limit=settings.generation_concurrency)
    return env, run
