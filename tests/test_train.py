"""End-to-end DDPO runs on a tiny random Stable Diffusion: algorithms, logging, checkpoints, bad rewards."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpo.checkpoint import CheckpointError, find_checkpoint, list_checkpoints
from ddpo.config import load_config
from ddpo.metrics import REQUIRED_KEYS, read_metrics
from ddpo.reward_pool import RewardError
from ddpo.trainer import train


def run(tmp_path, *overrides, name="run"):
    config = load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", *overrides])
    return train(config)


def lora(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "rwr", "rwr_sparse"])
def test_two_epochs_of_each_algorithm(tmp_path, algorithm):
    on_policy = ["train.gradient_accumulation_steps=2"] if algorithm == "ddpo_sf" else []  # one step per epoch
    run_dir = run(tmp_path, f"train.algorithm={algorithm}", "reward.name=rewards_for_tests:brightness", *on_policy)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]  # epochs are numbered 1..N everywhere
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert np.isfinite(row["loss"]) and row["num_samples"] == 4 and row["samples_per_s"] > 0
        if algorithm.startswith("ddpo"):
            assert row["approx_kl"] >= 0 and 0 <= row["clipfrac"] <= 1
        else:
            assert row["approx_kl"] is None and row["clipfrac"] is None  # RWR has no importance ratio
    first, last = list_checkpoints(run_dir)
    changed = [not torch.equal(a, b) for a, b in zip(lora(first).values(), lora(last).values())]
    assert any(changed), "the second epoch's update did not change the LoRA weights"
    assert [p.name for p in (first, last)] == ["epoch_0001", "epoch_0002"]
    assert sorted(p.name for p in (run_dir / "samples").glob("epoch_*.png")) == ["epoch_0001.png", "epoch_0002.png"]
    assert (run_dir / "config.yaml").is_file() and (first / "config.yaml").is_file()


@pytest.mark.parametrize("per_call", ["1", "auto"])
def test_importance_ratio_is_exactly_one_before_the_first_update(tmp_path, per_call):
    # One optimizer step per epoch: every log-prob is recomputed before the weights change. One timestep per call
    # makes the calls sampling made (exactly its numbers); auto puts all 4 steps in one call, whose other batch
    # shape changes float rounding only.
    run_dir = run(tmp_path, "train.num_epochs=1", "sample.num_batches_per_epoch=1", "train.batch_size=2",
                  "train.gradient_accumulation_steps=1", f"train.timesteps_per_call={per_call}")
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    assert row["clipfrac"] == 0.0
    assert row["approx_kl"] == 0.0 if per_call == "1" else abs(row["approx_kl"]) < 1e-12, row["approx_kl"]
    assert row["timesteps_per_call"] == (1 if per_call == "1" else 4)


def test_training_raises_a_simple_reward(tmp_path):
    run_dir = run(tmp_path, "reward.name=rewards_for_tests:brightness", "train.num_epochs=6", "train.learning_rate=3e-2",
                  "sample.batch_size=4", "train.batch_size=4", "train.clip_range=0.2", "train.num_inner_epochs=2",
                  "logging.keep_last=1")
    rewards = [r["reward_mean"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]), rewards


def test_lora_checkpoint_loads_in_diffusers(tmp_path, tiny_sd_path):
    from ddpo.generate import generate_images, load_for_inference

    run_dir = run(tmp_path, f"model.pretrained={tiny_sd_path}", "train.num_epochs=1", "train.learning_rate=0.1")
    base = generate_images(load_for_inference(str(tiny_sd_path)), ["a cat"] * 2, seed=0, num_steps=4)
    tuned_pipe = load_for_inference(str(tiny_sd_path), str(run_dir))  # diffusers' load_lora_weights
    assert tuned_pipe.denoiser.peft_config  # the adapter was attached
    tuned = generate_images(tuned_pipe, ["a cat"] * 2, seed=0, num_steps=4)
    again = generate_images(tuned_pipe, ["a cat"] * 2, seed=0, num_steps=4)
    assert torch.equal(tuned, again)  # same seeds, same images
    assert not torch.equal(base, tuned)


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    run_dir = run(tmp_path, "train.num_epochs=1")
    folder = list_checkpoints(run_dir)[-1]
    config = load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "logging.run_name=run", "train.num_epochs=2",
                                      "model.lora_rank=3"])
    with pytest.raises(CheckpointError, match=r"model.lora_rank=2 but this run has model.lora_rank=3"):
        train(config, resume=str(run_dir))
    weights = folder / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        find_checkpoint(run_dir)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path)  # the same run name again: refuses instead of overwriting


def test_failing_reward_names_the_prompt_and_keeps_the_checkpoint(tmp_path):
    marker = tmp_path / "crash"
    reward = ["reward.name=rewards_for_tests:raises_when_marker_exists", f"reward.kwargs={{marker: '{marker}'}}",
              "reward.executor=process"]
    run_dir = run(tmp_path, "train.num_epochs=1", *reward)
    marker.touch()
    config = load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "logging.run_name=run",
                                      "train.num_epochs=2", *reward])
    with pytest.raises(RewardError, match=r"raised ValueError: the reward model crashed\n  on prompts: \['"):
        train(config, resume=str(run_dir))
    assert find_checkpoint(run_dir).name == "epoch_0001"  # verified intact
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 1


def test_nonfinite_rewards_error_or_skip(tmp_path):
    with pytest.raises(RewardError, match=r"(?s)NaN or infinite.*\(not in the vocabulary\).*on_nonfinite=skip"):
        run(tmp_path, "reward.name=rewards_for_tests:nan_for_first", name="a")
    run_dir = run(tmp_path, "reward.name=rewards_for_tests:nan_for_first", "reward.on_nonfinite=skip", name="b")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["num_skipped"] for r in rows] == [2, 2] and rows[0]["reward_mean"] == 1.0


def test_metrics_rows_are_plain_json(tmp_path):
    run_dir = run(tmp_path, "train.num_epochs=1")
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert all(isinstance(row[k], (int, float)) for k in REQUIRED_KEYS)


def test_images_per_prompt_samples_each_prompt_in_a_group_with_different_noise():
    from contextlib import nullcontext

    from ddpo.reward_pool import RewardPool
    from ddpo.rollout import collect_rollout
    from ddpo.families import load_family
    from prompts import load_grammar

    config = load_config("tiny_cpu", ["sample.batch_size=6", "sample.images_per_prompt=3", "train.batch_size=3"])
    family = load_family("tiny-random")
    pool = RewardPool("rewards_for_tests:brightness", {}, "inline")
    try:
        rollout = collect_rollout(family, family.denoiser, load_grammar("simple_animals"), pool, config, epoch=0,
                                  process_index=0, num_processes=1, device=torch.device("cpu"), autocast=nullcontext,
                                  progress=False)
    finally:
        pool.close()
    groups = [rollout.prompts[i:i + 3] for i in range(0, 12, 3)]  # 2 batches of 2 prompts x 3 images
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) > 1
    images = rollout.trajectories.images
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
