"""Test-wide settings: offline, one torch thread, and tiny Stable Diffusion pipelines built in code."""

from __future__ import annotations

import os

# Before any Hugging Face import: a hub lookup without this hangs for minutes on an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads on two shared cores were 10-20x slower than one in this suite.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline saved as a diffusers folder (model_index.json + safetensors)."""
    from ddpo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipeline")
