"""Training runs for the UI: `ddpo train` in a child process, and what a run folder says about its progress.

The child is a separate process (its own session, so Stop reaches the reward workers it starts too): the UI stays
responsive while it trains, and a crash in training only ends the child. This module does not import gradio.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from ddpo.ui.pickers import RUN_NAME, list_runs
from ddpo.ui.settings import AppSettings, UIError

LOG_FILE = "app_train.log"
# Overrides the browser may give. Paths, the model, the reward and its options are picked from lists instead
# (a reward name or captioner may be "package.module:attr", which imports code), and wandb would send data out.
ALLOWED_OVERRIDES = ("seed=", "sample.", "train.", "prompts.split=", "prompts.eval_", "model.use_lora=",
                     "model.lora_", "model.mixed_precision=", "model.gradient_checkpointing=", "model.attention=",
                     "reward.executor=", "reward.on_nonfinite=", "logging.save_every=", "logging.keep_last=",
                     "logging.tensorboard=", "logging.sample_grid=")


def check_overrides(lines: list[str]) -> list[str]:
    overrides = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for item in overrides:
        if "=" not in item or not item.startswith(ALLOWED_OVERRIDES):
            raise UIError(f"override {item!r} is not allowed here: the app accepts key=value lines for seed, sample.*, "
                          "train.*, prompts.split/eval_*, model.lora_* and a few logging keys; pick the model, "
                          "reward and grammar with the inputs above, or run `ddpo train` from a shell for the rest")
    return overrides


class TrainingManager:
    """At most one `ddpo train` child at a time, started and stopped from the UI."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.run_name: str | None = None
        self._log = None
        self._lock = threading.Lock()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, preset: str, run_name: str, overrides: list[str]) -> str:
        """Validate the config in this process (fast, no model), then launch the child. Returns the run name."""
        from ddpo.config import ConfigError, list_presets, load_config

        with self._lock:
            if self.running():
                raise UIError(f"run {self.run_name!r} is still training; stop it first (one run at a time)")
            if preset not in list_presets():
                raise UIError(f"preset {preset!r} is not one of {', '.join(list_presets())}")
            name = (run_name or "").strip() or datetime.now().strftime("app-%Y%m%d-%H%M%S")
            if not RUN_NAME.fullmatch(name):
                raise UIError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (at most 80), "
                              "starting with a letter or digit")
            run_dir = self.settings.runs_dir / name
            if run_dir.exists():
                raise UIError(f"a run named {name!r} already exists in {self.settings.runs_dir}; choose another name")
            full = [*overrides, f"logging.output_dir={self.settings.runs_dir}", f"logging.run_name={name}"]
            try:
                load_config(preset, full)
            except ConfigError as err:
                raise UIError(f"config error: {err}") from None
            run_dir.mkdir(parents=True)
            self._close_log()
            self._log = open(run_dir / LOG_FILE, "w")
            python = self.settings.train_python or sys.executable
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            self.process = subprocess.Popen([python, "-m", "ddpo.cli", "train", preset, *full], stdout=self._log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
            self.run_name = name
            return name

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM the child's process group, SIGKILL it after `timeout` seconds. Returns a status line."""
        with self._lock:
            if not self.running():
                return "no run is training"
            process = self.process
            os.killpg(process.pid, signal.SIGTERM)  # the child's own session: it and its reward workers only
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self._close_log()
            return f"stopped {self.run_name!r}"

    def status(self) -> str:
        if self.process is None:
            return "no run started from this app yet"
        code = self.process.poll()
        if code is None:
            return f"**{self.run_name}**: training (pid {self.process.pid})"
        self._close_log()
        if code == 0:
            return f"**{self.run_name}**: finished"
        if code < 0:
            return f"**{self.run_name}**: stopped (signal {-code})"
        return f"**{self.run_name}**: failed with exit code {code}; see the log below"

    def _close_log(self) -> None:
        if self._log is not None and (self.process is None or self.process.poll() is not None):
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------------------------------- run folders


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl written so far (a half-written last line, while training, is skipped)."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def curve_frame(rows: list[dict]):
    """Long-format DataFrame (epoch, value, metric) of reward_mean and eval_reward_mean, for gr.LinePlot."""
    import pandas as pd

    points = [{"epoch": r["epoch"], "value": r[key], "metric": key} for r in rows
              for key in ("reward_mean", "eval_reward_mean") if isinstance(r.get(key), (int, float))]
    frame = pd.DataFrame(points, columns=["epoch", "value", "metric"])
    return frame.astype({"epoch": "int64", "value": "float64", "metric": "str"})


def latest_sample(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("epoch_*.png")) if (run_dir / "samples").is_dir() else []
    return grids[-1] if grids else None


def log_tail(run_dir: Path, lines: int = 30) -> str:
    path = run_dir / LOG_FILE
    if not path.is_file():
        return "(no log: this run was not started from the app)"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


def runs_table(runs_dir: Path) -> list[list]:
    """[name, epochs logged, last reward_mean, checkpoints, last modified] per run, newest first."""
    rows = []
    for run in list_runs(runs_dir):
        metrics = read_metrics(run)
        last = metrics[-1].get("reward_mean") if metrics else None
        ckpts = len(list((run / "checkpoints").glob("epoch_*"))) if (run / "checkpoints").is_dir() else 0
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.stat().st_mtime))
        rows.append([run.name, len(metrics), None if last is None else round(last, 4), ckpts, modified])
    return rows
