"""Servers the tests start on this machine: a free loopback port, and the Gradio app launched on one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_app(settings, root: Path):
    """Build and launch the app on 127.0.0.1 with Gradio's temp files under `root`; returns (demo, port, env).

    Call `demo.close()` and `env.undo()` when done.
    """
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(root / "gradio-tmp"))
    env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from ddpo.ui import build_app

    demo = build_app(settings)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, port, env
