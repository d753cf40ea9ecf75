"""The trainer never hangs and never saves a broken model (issue 17, section 4).

A reward that never returns stops the run after reward.timeout_s; SIGINT and SIGTERM end a run promptly in every
executor with the checkpoints intact; a non-finite loss or gradient stops the run (or is skipped and counted) and
no checkpoint with non-finite weights is written; a scheduler whose last step has std 0 trains; `--resume` with new
optimizer or stat-tracker settings applies them; `ddpo train` prints one line only for the project's own errors.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ddpo.checkpoint import find_checkpoint, list_checkpoints
from ddpo.config import ConfigError, load_config
from ddpo.losses import NonFiniteError
from ddpo.metrics import append_metrics, read_metrics
from ddpo.reward_pool import RewardTimeoutError
from ddpo.trainer import train
from ddpo.train_cli import main as train_main

TESTS = Path(__file__).parent
HANG = "reward.name=hanging_rewards:hangs_after"


def run(tmp_path, *overrides, name="run"):
    config = load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", *overrides])
    return train(config)


def all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in load_file(folder / "pytorch_lora_weights.safetensors").values())


# ---------------------------------------------------------------------------------------------- hung rewards


@pytest.mark.parametrize("executor", ["process", "thread", "inline"])
def test_a_hung_reward_stops_the_run_after_timeout_s(tmp_path, executor):
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"(?s)reward 'hanging_rewards:hangs_after' did not return within "
                                                 r"reward.timeout_s=2 s.*on prompts: \['"):
        run(tmp_path, HANG, f"reward.executor={executor}", "reward.timeout_s=2", "train.num_epochs=1")
    # Sampling takes a second, a spawned worker a few more to start; never the reward's hour.
    assert time.monotonic() - start < 30


def _ddpo_train(*args) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "ddpo.cli", "train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("sig, executor", [(signal.SIGINT, "process"), (signal.SIGTERM, "process"),
                                           (signal.SIGINT, "inline"), (signal.SIGTERM, "thread")])
def test_a_signal_ends_a_run_whose_reward_hangs(tmp_path, sig, executor):
    """Like Ctrl-C in a terminal (SIGINT to the process group) or the app's Stop (SIGTERM to it): the run exits
    within seconds with 128 + signum and one line, the worker is gone, and epoch 1's checkpoint verifies."""
    marker = tmp_path / "hung"
    proc = _ddpo_train("tiny_cpu", f"logging.output_dir={tmp_path}", "logging.run_name=run", HANG,
                       f"reward.kwargs={{calls: 2, marker: '{marker}'}}", f"reward.executor={executor}",
                       "train.num_epochs=3")
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=30)[1] if proc.poll() is not None else "the reward never hung"
    time.sleep(0.3)  # the reward is inside its sleep
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        _, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run was still alive 15 s after {sig.name}") from None
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr, stderr
    assert f"stopped by {sig.name}; " in stderr and "epoch_0001 is the newest checkpoint" in stderr, stderr
    assert find_checkpoint(tmp_path / "run").name == "epoch_0001"  # verified against its manifest
    worker = int(marker.read_text())
    if worker != proc.pid:  # the process executor's worker: gone with the trainer
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)


def test_a_signal_while_a_checkpoint_is_written_takes_effect_after_it():
    from ddpo.trainer import _signals_deferred

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            seen.append("written")
        assert seen == ["written", signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- non-finite steps


def test_learning_rate_inf_is_refused_by_validation():
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config("tiny_cpu", ["train.learning_rate=.inf"])


def test_learning_rate_1e6_stops_with_a_message_and_no_nan_checkpoint(tmp_path, capsys):
    code = train_main(["tiny_cpu", f"logging.output_dir={tmp_path}", "logging.run_name=run", "train.learning_rate=1e6"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("ddpo train: NonFiniteError: epoch 1, optimizer step 2: the gradient is NaN or infinite")
    assert "train.learning_rate=1e+06 is too high" in err and "train.on_nonfinite=skip" in err
    assert "Traceback" not in err
    checkpoints = list_checkpoints(tmp_path / "run")
    assert all(all_finite(c) for c in checkpoints)  # none is written here; never a NaN one


def test_skipped_nonfinite_steps_are_counted_and_logged_as_strings(tmp_path):
    run_dir = run(tmp_path, "train.learning_rate=1e6", "train.on_nonfinite=skip")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["nonfinite_steps"] == 1 and rows[1]["nonfinite_steps"] == 2  # of 2 optimizer steps per epoch
    raw = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert raw[1]["loss"] == "nan" and math.isnan(rows[1]["loss"])  # every step skipped: no loss, not "n/a"
    assert math.isfinite(rows[0]["loss"])  # the mean of the step that was applied
    assert all(all_finite(c) for c in list_checkpoints(run_dir))


def test_metrics_write_nonfinite_values_as_strings_and_read_them_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    row = {"epoch": 0, "reward_mean": 1.0, "reward_std": math.inf, "loss": math.nan, "approx_kl": None,
           "clipfrac": None, "samples_per_s": -math.inf, "sample_s": 0.0, "reward_s": 0.0, "train_s": 0.0}
    append_metrics(path, row)
    raw = json.loads(path.read_text())
    assert (raw["loss"], raw["reward_std"], raw["samples_per_s"], raw["approx_kl"]) == ("nan", "inf", "-inf", None)
    back = read_metrics(path)[0]
    assert math.isnan(back["loss"]) and back["reward_std"] == math.inf and back["samples_per_s"] == -math.inf
    assert back["approx_kl"] is None


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    from ddpo.trainer import _save

    weight = torch.nn.Parameter(torch.tensor([1.0, math.nan]))
    optimizer = torch.optim.AdamW([weight])
    accelerator = SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True, num_processes=1,
                                  unwrap_model=lambda m: m)
    config = load_config("tiny_cpu")
    with pytest.raises(NonFiniteError, match=r"not saving epoch 4's checkpoint: 1 of 1 trained weight tensors"):
        _save(tmp_path, 3, accelerator, None, None, optimizer, [weight], None, config)  # index 3: the 4th epoch
    assert not (tmp_path / "checkpoints").exists()


def test_a_scheduler_with_set_alpha_to_one_trains_with_finite_log_probs(tmp_path, tiny_sd_path):
    """DDIMScheduler.from_config of Euler/DPM/PNDM configs sets set_alpha_to_one: the last step has std 0. It is
    deterministic, so it has log-prob 0 and is not trained on; before, its 0/0 made the loss and LoRA NaN."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    scheduler_config = model / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()), "set_alpha_to_one": True}))
    run_dir = run(tmp_path, f"model.pretrained={model}", "train.kl_coef=0.1")
    rows = read_metrics(run_dir / "metrics.jsonl")
    for row in rows:
        assert row["nonfinite_steps"] == 0
        assert all(math.isfinite(row[k]) for k in ("loss", "approx_kl", "clipfrac", "kl_ref")), row
    from ddpo.families import load_family

    family = load_family(str(model))
    family.set_steps(4)
    assert (family.step_stds(1.0) > 0).tolist() == [True, True, True, False]  # the update trains on these
    first, last = list_checkpoints(run_dir)
    assert all_finite(first) and all_finite(last)
    assert any(not torch.equal(a, b) for a, b in zip(load_file(first / "pytorch_lora_weights.safetensors").values(),
                                                      load_file(last / "pytorch_lora_weights.safetensors").values()))


# ---------------------------------------------------------------------------------------------- resume overrides


def test_resume_applies_a_new_learning_rate_and_stat_tracker_sizes(tmp_path, capsys):
    args = ["tiny_cpu", f"logging.output_dir={tmp_path}", "logging.run_name=run", "train.num_epochs=1",
            "train.stat_buffer_size=16", "train.stat_min_count=2"]
    assert train_main(args) == 0
    run_dir = tmp_path / "run"
    first = list_checkpoints(run_dir)[0]
    assert torch.load(first / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"] == 1e-3

    assert train_main(["--resume", str(run_dir), "train.num_epochs=2", "train.learning_rate=5e-4",
                       "train.adam_weight_decay=0.02", "train.stat_buffer_size=4", "train.stat_min_count=3"]) == 0
    last = list_checkpoints(run_dir)[-1]
    group = torch.load(last / "optimizer.pt", weights_only=True)["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (5e-4, 0.02)  # in effect, not the checkpoint's 1e-3
    tracker = json.loads((last / "trainer_state.json").read_text())["stat_tracker"]
    assert (tracker["buffer_size"], tracker["min_count"]) == (4, 3)
    assert all(len(values) <= 4 for values in tracker["buffers"].values())
    saved = load_config(str(run_dir / "config.yaml"))
    assert (saved.train.learning_rate, saved.train.stat_buffer_size, saved.train.stat_min_count) == (5e-4, 4, 3)

    from ddpo.trainer import _check_resumable

    with pytest.raises(ConfigError, match="train.use_8bit_adam=True but checkpoint .* train.use_8bit_adam=False"):
        _check_resumable(last, load_config(str(run_dir / "config.yaml"), ["train.use_8bit_adam=true"]))


# ---------------------------------------------------------------------------------------------- ddpo train errors


def test_train_cli_prints_one_line_for_project_errors_and_a_traceback_for_bugs(tmp_path, capsys, monkeypatch):
    grammar = tmp_path / "g.yaml"
    grammar.write_text("name: plain\nrules:\n  prompt: \"a {animal}\"\n  animal: [cat, dog]\n")
    args = ["tiny_cpu", f"prompts.grammar={grammar}", "prompts.eval_every=1", f"logging.output_dir={tmp_path}"]
    assert train_main(args) == 1
    assert capsys.readouterr().err.startswith("ddpo train: ConfigError: prompts.eval_split=heldout but grammar")

    def buggy(config, resume=None):
        raise ValueError("a bug inside the trainer")

    monkeypatch.setattr("ddpo.trainer.train", buggy)
    with pytest.raises(ValueError, match="a bug inside the trainer"):  # not swallowed into one line
        train_main(["tiny_cpu", f"logging.output_dir={tmp_path}"])


def test_an_unknown_reward_is_a_reward_error_before_the_model_loads(tmp_path, capsys):
    code = train_main(["tiny_cpu", f"logging.output_dir={tmp_path}", "reward.name=no_such_reward",
                       "model.pretrained=does-not-exist/never-loaded"])
    assert code == 1
    assert capsys.readouterr().err.startswith("ddpo train: RewardError: reward.name='no_such_reward' could not be "
                                              "built: ValueError: unknown reward 'no_such_reward'")
