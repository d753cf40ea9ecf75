"""Two CPU processes (gloo DDP) make the same update as one process with the same global batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpo.checkpoint import list_checkpoints
from ddpo.metrics import read_metrics
from localhost import free_port

COMMON = ["train.num_epochs=2", "sample.batch_size=2", "train.batch_size=2", "train.learning_rate=1e-2",
          "reward.name=rewards_for_tests:brightness", "prompts.eval_every=1", "prompts.eval_split=all",
          "prompts.eval_num_prompts=5"]


def launch(nproc: int, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    torchrun = [shutil.which("torchrun") or "torchrun", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "ddpo.cli", "train"]
    command = torchrun if nproc > 1 else [sys.executable, "-m", "ddpo.cli", "train"]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_sd3", "tiny_flux", "tiny_sdxl"])  # every model family
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, preset):
    # 1 process: 2 batches of 2, both micro-batches accumulated into one step.
    one = launch(1, preset, *COMMON, "sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=2",
                 f"logging.output_dir={tmp_path}", "logging.run_name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    # 2 processes: 1 batch of 2 each; DDP averages their gradients.
    two = launch(2, preset, *COMMON, "sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1",
                 f"logging.output_dir={tmp_path}", "logging.run_name=two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.splitlines()[-1].startswith("done: run folder")  # flushed before the process left (os._exit)
    rows_one, rows_two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["num_samples"] for r in rows_two] == [4, 4]  # rewards gathered from both processes
    assert [r["reward_mean"] for r in rows_one] == pytest.approx([r["reward_mean"] for r in rows_two], rel=1e-6)
    # Evaluation: 5 distinct prompts, noise seeded by prompt position, so 2 processes agree with 1 (3 + 2 prompts).
    assert rows_two[0]["eval_reward_before"] == pytest.approx(rows_one[0]["eval_reward_before"], rel=1e-6)
    assert [r["eval_reward_mean"] for r in rows_two] == pytest.approx([r["eval_reward_mean"] for r in rows_one],
                                                                      rel=1e-5)
    weights_one = load_file(list_checkpoints(tmp_path / "one")[-1] / "pytorch_lora_weights.safetensors")
    weights_two = load_file(list_checkpoints(tmp_path / "two")[-1] / "pytorch_lora_weights.safetensors")
    initial = load_file(list_checkpoints(tmp_path / "one")[0] / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(weights_one[k], initial[k]) for k in initial)
    for key in weights_one:
        # Summation order differs; Adam turns float noise in a near-zero gradient into a move of up to ~lr (1e-2)
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-4, atol=1e-4)


def test_a_distributed_ddpo_train_leaves_through_os_exit_with_its_status(monkeypatch, capsys):
    """gloo's and FSDP2's threads can abort (SIGABRT) a finished run at interpreter teardown; under a launcher
    `ddpo train` skips that teardown, after flushing what it printed, and keeps its exit status."""
    from ddpo import train_cli

    left = []
    monkeypatch.setattr(os, "_exit", left.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_cli.main(["tiny_cpu", "train.num_epochs=0"])  # a config error: exit status 2
    assert left == [2] and "config error" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train_cli.main(["--list-presets"]) == 0 and left == [2]  # one process: an ordinary return
