"""Training runs for the UI: `ddpo train` in a child process, and what a run folder says about its progress.

The child is a separate process (its own session, so Stop reaches the reward workers it starts too): the UI stays
responsive while it trains, and a crash in training only ends the child. This module does not import gradio.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from ddpo.ui.pickers import list_runs
from ddpo.ui.settings import AppSettings, UIError

LOG_FILE = "app_train.log"
# Overrides the browser may give. Paths, the model, the reward and its options are picked from lists instead
# (a reward name or captioner may be "package.module:attr", which imports code), and wandb would send data out.
ALLOWED_OVERRIDES = ("seed=", "sample.", "train.", "prompts.split=", "prompts.mix_heldout=", "prompts.eval_", "model.use_lora=",
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
        self.started_at = 0.0
        self.stopped_by_user = False
        self._log = None
        self._lock = threading.Lock()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, preset: str, run_name: str, overrides: list[str]) -> str:
        """Validate the config in this process (fast, no model), then launch the child. Returns the run name."""
        from ddpo.config import RUN_NAME, RUN_NAME_RULE, ConfigError, list_presets, load_config

        with self._lock:
            if self.running():
                raise UIError(f"run {self.run_name!r} is still training; stop it first (one run at a time)")
            if preset not in list_presets():
                raise UIError(f"preset {preset!r} is not one of {', '.join(list_presets())}")
            name = (run_name or "").strip() or datetime.now().strftime("app-%Y%m%d-%H%M%S")
            if not RUN_NAME.fullmatch(name):
                raise UIError(f"run name {name!r}: {RUN_NAME_RULE}")
            run_dir = self.settings.runs_dir / name
            if run_dir.exists() and not _failed_before_first_epoch(run_dir):
                raise UIError(f"a run named {name!r} already exists in {self.settings.runs_dir}; choose another name")
            full = [*overrides, f"logging.output_dir={self.settings.runs_dir}", f"logging.run_name={name}"]
            try:
                config = load_config(preset, full)
            except ConfigError as err:
                raise UIError(f"config error: {err}") from None
            problem = cannot_run_here(config)
            if problem:
                raise UIError(problem)
            if run_dir.exists():  # an earlier start that failed before its first epoch: nothing worth keeping
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            self._close_log()
            self._log = open(run_dir / LOG_FILE, "w")
            python = self.settings.train_python or sys.executable
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            self.process = subprocess.Popen([python, "-m", "ddpo.cli", "train", preset, *full], stdout=self._log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
            self.run_name, self.started_at, self.stopped_by_user = name, time.time(), False
            return name

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM the child's process group, SIGKILL it after `timeout` seconds. Returns a status line."""
        with self._lock:
            if not self.running():
                return "no run is training"
            process = self.process
            self.stopped_by_user = True
            os.killpg(process.pid, signal.SIGTERM)  # the child's own session: it and its reward workers only
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self._close_log()
            return self.status()

    def status(self) -> str:
        """One line about the run this app started: loading, epoch k/N with ETA, finished, stopped or failed."""
        if self.process is None:
            return "no run started from this app yet"
        code = self.process.poll()
        if code is not None:
            self._close_log()
        return run_status(self.settings.runs_dir / self.run_name, code, running=code is None,
                          stopped_by_user=self.stopped_by_user, started_at=self.started_at)

    def _close_log(self) -> None:
        if self._log is not None and (self.process is None or self.process.poll() is not None):
            self._log.close()
            self._log = None


def cannot_run_here(config) -> str | None:
    """Why a config cannot train on this machine (a hub model not downloaded while offline, fp16/bf16 or a CUDA
    reward without a GPU), said before Start rather than after the child fails; None if nothing is known wrong."""
    import torch

    problems = []
    pretrained = config.model.pretrained
    if pretrained not in ("shapes", "tiny-random") and not Path(pretrained).expanduser().is_dir():
        try:
            from rewards.hub import require_weights

            require_weights(pretrained, "the model", "", filename="model_index.json")
        except FileNotFoundError as err:
            problems.append(str(err).strip().rstrip("."))
    if config.reward.name not in ("compose", "remote"):
        from ddpo.ui.availability import unavailable_rewards

        missing = unavailable_rewards([config.reward.name], {config.reward.name: dict(config.reward.kwargs or {})})
        problems += [f"reward {name}: {why}" for name, why in missing.items()]
    if not torch.cuda.is_available():
        if config.model.mixed_precision != "no":
            problems.append(f"model.mixed_precision={config.model.mixed_precision} needs a GPU (there is none "
                            "here): set it to 'no' under More overrides")
        device = str((config.reward.kwargs or {}).get("device", ""))
        if device.startswith("cuda"):
            problems.append(f"the reward runs on {device!r}, and this machine has no GPU")
    return ("cannot run here: " + "; ".join(problems)) if problems else None


def _failed_before_first_epoch(run_dir: Path) -> bool:
    """A run folder the app made whose child ended before logging an epoch or saving a checkpoint: its name is
    free again. Anything else in it (a finished epoch, a checkpoint, files the app did not write) keeps it."""
    known = {LOG_FILE, "config.yaml", "metrics.jsonl", "samples", "checkpoints", "tensorboard"}
    if not (run_dir / LOG_FILE).is_file() or any(p.name not in known for p in run_dir.iterdir()):
        return False
    if read_metrics(run_dir):
        return False
    ckpts = run_dir / "checkpoints"
    return not (ckpts.is_dir() and any(ckpts.iterdir()))


# ---------------------------------------------------------------------------------------------- run folders


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl written so far (a half-written last line, while training, is skipped).

    Non-finite numbers are written as "nan", "inf" and "-inf"; they are read back as floats. `epoch` is the number
    of epochs completed (1..N, as the log's "epoch k/N"); files of older versions, whose first row is epoch 0,
    are renumbered the same way."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append({k: NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()})
    if rows and rows[0].get("epoch") == 0:
        rows = [{**r, "epoch": r["epoch"] + 1} if isinstance(r.get("epoch"), int) else r for r in rows]
    return rows


NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def planned_epochs(run_dir: Path) -> int | None:
    """train.num_epochs of the run's config.yaml (written by the trainer when it starts), or None."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        epochs = config["train"]["num_epochs"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return epochs if isinstance(epochs, int) else None


def progress_of(run_dir: Path) -> tuple[int, int | None, float | None]:
    """(epochs done, epochs planned or None, seconds left or None). The ETA is the mean duration of the last three
    epochs times the epochs left."""
    rows = read_metrics(run_dir)
    total = planned_epochs(run_dir)
    done = int(rows[-1]["epoch"]) if rows and isinstance(rows[-1].get("epoch"), int) else 0
    durations = [r["epoch_s"] for r in rows[-3:] if isinstance(r.get("epoch_s"), (int, float))
                 and math.isfinite(r["epoch_s"])]
    eta = sum(durations) / len(durations) * max(total - done, 0) if durations and total else None
    return done, total, eta


def mmss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60:02d}:{seconds % 60:02d}"


def run_status(run_dir: Path, code: int | None, running: bool, stopped_by_user: bool = False,
               started_at: float | None = None) -> str:
    """The status line of a run: code is the child's exit code (None while running, or for a run this app did
    not start, whose state is read from its folder alone)."""
    name = run_dir.name
    done, total, eta = progress_of(run_dir)
    of = f"{done}/{total}" if total else str(done)
    after = f"after epoch {of}" if done else "before the first epoch"
    if running:
        if done == 0:
            waited = f" ({time.time() - started_at:.0f} s)" if started_at else ""
            return f"**{name}**: loading the model and sampling the first epoch{waited}"
        return f"**{name}**: epoch {of}" + (f", ETA {mmss(eta)}" if eta is not None else "")
    if code is None:  # not started by this app (or by an earlier app): judge from the folder
        if total and done >= total:
            return f"**{name}**: finished, {of} epochs"
        return f"**{name}**: {of} epochs logged"
    if code == 0:
        return f"**{name}**: finished, {of} epochs"
    if stopped_by_user:
        return f"**{name}**: stopped by you {after}"
    if code in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT):
        return f"**{name}**: stopped from outside the app (terminated) {after}"
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return f"**{name}**: killed {after} (out of memory?)"
    why = error_line(run_dir)
    return f"**{name}**: failed {after}" + (f": {why}" if why else f" (exit code {code}); see the log")


_ERROR = re.compile(r"^(ddpo \w+: |\w*(Error|Exception)\b)")


def error_line(run_dir: Path) -> str:
    """The line of the log that says why a run failed: the CLI's one-line error, else the last exception line."""
    lines = [line for line in log_tail(run_dir, 200).splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR.match(line.strip()):
            return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else ""


def latest_sample(run_dir: Path) -> Path | None:
    grids = sorted((run_dir / "samples").glob("epoch_*.png")) if (run_dir / "samples").is_dir() else []
    return grids[-1] if grids else None


# CSI (colours, cursor moves: tqdm's "\x1b[A"), OSC (titles), and two-character escapes
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def clean_log(text: str) -> str:
    """What a terminal would show: escape codes removed, and of a line redrawn with carriage returns (tqdm) only
    its last state."""
    lines = []
    for line in _ANSI.sub("", text).split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        lines.append(parts[-1] if parts else "")
    return "\n".join(line.rstrip() for line in lines if not _CONTROL.fullmatch(line)).strip("\n")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]+")


def log_tail(run_dir: Path, lines: int = 30) -> str:
    """The last `lines` lines of the run's app log, cleaned of terminal control codes."""
    path = run_dir / LOG_FILE
    if not path.is_file():
        return "(no log: this run was not started from the app)"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        text = clean_log(f.read().decode(errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


def runs_table(runs_dir: Path) -> list[list]:
    """[name, epochs logged / planned, last reward_mean, checkpoints, last modified] per run, newest first."""
    rows = []
    for run in list_runs(runs_dir):
        metrics = read_metrics(run)
        last = _round(metrics[-1].get("reward_mean")) if metrics else None
        ckpts = len(list((run / "checkpoints").glob("epoch_*"))) if (run / "checkpoints").is_dir() else 0
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.stat().st_mtime))
        total = planned_epochs(run)
        rows.append([run.name, f"{len(metrics)}/{total}" if total else str(len(metrics)), last, ckpts, modified])
    return rows


METRIC_COLUMNS = ("reward_mean", "reward_std", "eval_reward_mean", "eval_score_mean", "loss", "approx_kl", "clipfrac", "kl_ref",
                  "samples_per_s")


def metrics_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(headers, rows): one row per logged epoch (numbered 1..N as the log numbers it); the columns any row has."""
    columns = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    return ["epoch", *columns], [[r["epoch"], *(_round(r.get(c)) for c in columns)] for r in rows
                                 if isinstance(r.get("epoch"), int)]


def _round(value) -> float | str | None:
    """4 significant digits for the tables; NaN and infinities as words (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return float(f"{value:.4g}")
