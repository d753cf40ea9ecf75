"""A run killed with SIGKILL mid-epoch and resumed ends with the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from ddpo.checkpoint import list_checkpoints
from ddpo.metrics import read_metrics

import pytest

ARGS = ["train.num_epochs=4", "sample.num_steps=6", "sample.num_batches_per_epoch=3",
        "train.batch_size=2", "train.num_inner_epochs=2", "logging.keep_last=2"]


def ddpo_train(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ddpo.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# The UNet families and both flow families (sdxl resumes as sd does: same LoRA format, only more conditioning).
@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_sd3", "tiny_flux"])
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, preset):
    straight = ddpo_train(preset, *ARGS, f"logging.output_dir={tmp_path}", "logging.run_name=straight")
    killed = ddpo_train(preset, *ARGS, f"logging.output_dir={tmp_path}", "logging.run_name=killed")
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while not list_checkpoints(run_dir) and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # somewhere in epoch 1 (or while saving it): never at a clean boundary
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = read_metrics(run_dir / "metrics.jsonl")
    assert len(done_before) < 4

    resumed = ddpo_train("--resume", str(run_dir))
    assert resumed.wait() == 0, resumed.stderr.read()
    assert straight.wait() == 0, straight.stderr.read()
    final_a = load_file(list_checkpoints(tmp_path / "straight")[-1] / "pytorch_lora_weights.safetensors")
    final_b = load_file(list_checkpoints(run_dir)[-1] / "pytorch_lora_weights.safetensors")
    assert list_checkpoints(run_dir)[-1].name == "epoch_0004"
    for key in final_a:
        assert torch.allclose(final_a[key], final_b[key], rtol=0, atol=1e-6), key
    rows_a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    rows_b = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]  # no duplicated rows for the redone epoch
    assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]
