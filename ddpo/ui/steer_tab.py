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


def build(settings: AppSettings) -> None:
    if not steering_available():
        gr.Markdown("**Steering is not available in this build**: the steering API (`ddpo.steering.api`) is not "
                    "installed. Install the `steering` extra (`pip install -e .[steering]`).",
                    elem_id="steer-unavailable")
        return
    lim = settings.limits
    envs = environments()
    env0 = envs[0] if envs else None
    with gr.Row():
        with gr.Column(scale=1):
            env = gr.Dropdown(envs, value=env0, label="Environment", elem_id="steer-env")
            policy = gr.Dropdown([SHIPPED], value=SHIPPED, label="Base policy (the shipped diffusion policy)")
            with gr.Row():
                run = gr.Dropdown([BASE_ONLY, *steering_runs(settings, env0)], value=BASE_ONLY, scale=4,
                                  allow_custom_value=True, label="Steering checkpoint (a `ddpo steer train` run)",
                                  elem_id="steer-run")
                refresh = gr.Button("Refresh", scale=1, size="sm")
            with gr.Row():
                episodes = gr.Slider(1, lim.max_episodes, value=min(5, lim.max_episodes), step=1, label="Episodes")
                seed = gr.Number(0, label="Seed (episode i uses seed + i)", precision=0, minimum=0,
                                 maximum=lim.max_seed)
            render = gr.Checkbox(True, label="Render the first episode (base | steered)")
            go = gr.Button("Run episodes", variant="primary", elem_id="steer-go")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="steer-summary")
            table = gr.Dataframe(label="Returns", interactive=False)
            video = gr.Image(label="First episode: base (left) | steered (right)", type="filepath", interactive=False)

    def run_choices(env_id):
        return gr.Dropdown(choices=[BASE_ONLY, *steering_runs(settings, env_id)], value=BASE_ONLY)

    @readable_errors
    def on_run(env_id, policy_label, run_name, n, seed_value, do_render, progress=gr.Progress()):
        from ddpo.steering.api import run_episodes

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
        return text, rows, gif

    env.change(run_choices, env, run, api_name=False)
    refresh.click(run_choices, env, run, api_name=False)
    go.click(on_run, [env, policy, run, episodes, seed, render], [summary, table, video], api_name="steer",
             concurrency_id="generation", concurrency_limit=settings.generation_concurrency)
