"""Tab 5, Steering: base policy against the steered one, when the steering API is installed."""

from __future__ import annotations

import importlib.util

import gradio as gr

from ddpo.ui.settings import AppSettings


def steering_available() -> bool:
    try:
        return importlib.util.find_spec("ddpo.steering.api") is not None
    except ImportError:
        return False


def build(settings: AppSettings) -> None:
    if not steering_available():
        gr.Markdown("**Steering is not available in this build**: the steering API (`ddpo.steering.api`) is not "
                    "installed yet. Use `ddpo steer --help` from a shell once it is.", elem_id="steer-unavailable")
        return
    gr.Markdown("Steering API found, but this app version has no steering panel yet; use `ddpo steer`.",
                elem_id="steer-unavailable")
