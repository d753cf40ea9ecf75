"""benchmarks/peers.py: the model and settings both implementations get, and ddpo's side end to end (--no-trl)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(peers, tmp_path_factory):
    return peers.build_peers_pipeline(tmp_path_factory.mktemp("peers") / "model")


def test_ddpo_gets_the_settings_and_the_lora_trl_gets(peers, model, tmp_path):
    """The command's overrides are valid and say what TRL's worker is told; LoRA rank 4 on to_q/to_k/to_v/to_out.0
    of this UNet is the 23,040 parameters TRL's DefaultDDPOStableDiffusionPipeline trains."""
    from ddpo.config import load_config
    from ddpo.trainer import build_policy

    command = peers.ddpo_command(str(model), str(tmp_path), "run", epochs=3, timesteps_per_call=10)
    assert command[2:6] == ["--ddpo-worker", "train", "tiny_cpu", f"model.pretrained={model}"]
    config = load_config("tiny_cpu", command[5:])
    s, t, S = config.sample, config.train, peers.SETTINGS
    assert (s.num_steps, s.guidance_scale, s.eta, s.batch_size, s.num_batches_per_epoch) == (
        S["num_steps"], S["guidance_scale"], S["eta"], S["sample_batch_size"], S["num_batches"])
    assert (t.batch_size, t.num_inner_epochs, t.gradient_accumulation_steps, t.learning_rate, t.timesteps_per_call,
            t.num_epochs) == (S["train_batch_size"], S["inner_epochs"], 1, S["learning_rate"], 10, 3)
    assert t.per_prompt_stat_tracking and (t.stat_buffer_size, t.stat_min_count) == (16, 16)
    assert config.reward.executor == "inline" and config.reward.name == "jpeg_compressibility"
    assert (config.model.lora_rank, config.model.lora_alpha) == (4, 4)
    family, params = build_policy(config, torch.device("cpu"))
    assert sum(p.numel() for p in params) == 23_040
    unet = family.denoiser.config
    assert tuple(unet.block_out_channels) == (32, 64) and unet.layers_per_block == 2
    assert unet.cross_attention_dim == 32 and unet.sample_size == 8 and family.resolution == 64


def test_ddpo_side_runs_and_reports(peers, tmp_path):
    out = tmp_path / "peers.json"
    report = peers.main(["--no-trl", "--threads", "1", "--runs", "1", "--epochs", "2", "--workdir",
                         str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "peers.md")])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    (row,) = report["rows"]
    assert (row["impl"], row["timesteps_per_call"], row["threads"], row["runs"]) == ("ddpo", 10, 1, 1)
    assert row["epoch_s"] > 0 and row["samples_per_s"] == pytest.approx(8 / row["epoch_s"])
    assert 100 < row["peak_rss_mib"] < 4096
    (run,) = report["runs"]
    assert len(run["epoch_times"]) == 2 and run["epoch_s"] == run["epoch_times"][1]  # the warm-up epoch left out
    assert 0 < run["epoch_cpu_s"]
    assert "| ddpo (this project), timesteps_per_call=10 | 1 |" in (tmp_path / "peers.md").read_text()
    # the worker's own VmHWM, not wait4's ru_maxrss (which counts the parent's resident set at the fork)
    peak = float((tmp_path / "work" / "ddpo10-t1-r0.peak").read_text())
    assert run["peak_rss_mib"] == peak
    assert report["settings"]["device"] == "cpu" and report["failed"] == []


def test_ratio_is_the_median_of_paired_runs(peers):
    def run(impl, index, epoch_s, threads=1):
        return {"impl": impl, "timesteps_per_call": 10 if impl == "ddpo" else None, "threads": threads, "run": index,
                "epoch_s": epoch_s, "epoch_cpu_s": epoch_s, "sample_s": epoch_s / 2, "train_s": epoch_s / 2, "peak_rss_mib": 500.0}

    results = [run("ddpo", 0, 1.0), run("trl", 0, 2.0), run("trl", 1, 1.5), run("ddpo", 1, 1.0),
               run("ddpo", 2, 2.0), run("trl", 2, 2.0), run("ddpo", 0, 0.8, threads=2), run("trl", 0, 1.6, threads=2)]
    ddpo, ddpo2, trl, trl2 = peers.summarise(results, [("ddpo", 10, 1), ("trl", None, None)], [1, 2])
    assert ddpo["speedup_vs_trl_runs"] == [2.0, 1.5, 1.0] and ddpo["speedup_vs_trl"] == 1.5
    assert (ddpo["epoch_s"], trl["epoch_s"]) == (1.0, 2.0) and "speedup_vs_trl" not in trl
    assert ddpo2["speedup_vs_trl"] == 2.0 and ddpo2["speedup_vs_1_thread"] == pytest.approx(1.25)
    table = peers.markdown([ddpo, ddpo2, trl, trl2])
    assert "| ddpo (this project), timesteps_per_call=10 | 1 |" in table and "| 1.50x |" in table


def test_gpu_options_reach_both_sides(peers):
    command = peers.ddpo_command("m", "w", "run", epochs=3, timesteps_per_call=1, mixed_precision="fp16")
    assert "model.mixed_precision=fp16" in command and "sample.batches_per_call=1" in command


def test_batches_per_call_reaches_ddpo_and_its_own_rows(peers, model, tmp_path):
    from ddpo.config import load_config

    command = peers.ddpo_command(str(model), str(tmp_path), "run", epochs=3, timesteps_per_call=3, batches_per_call=2)
    config = load_config("tiny_cpu", command[5:])
    assert (config.sample.batches_per_call, config.train.timesteps_per_call) == (2, 3)

    def run(impl, k, m, index, epoch_s):
        return {"impl": impl, "timesteps_per_call": k, "batches_per_call": m, "threads": 1, "run": index,
                "epoch_s": epoch_s, "epoch_cpu_s": epoch_s, "sample_s": 0.3, "train_s": 0.5, "peak_rss_mib": 500.0}

    results = [run("ddpo", 3, 1, 0, 1.2), run("ddpo", 3, 2, 0, 1.0), run("trl", None, None, 0, 1.5)]
    one, two, trl = peers.summarise(results, [("ddpo", 3, 1), ("ddpo", 3, 2), ("trl", None, None)], [1])
    assert (one["speedup_vs_trl"], two["speedup_vs_trl"]) == (1.25, 1.5) and two["batches_per_call"] == 2
    table = peers.markdown([one, two, trl])
    assert "| ddpo (this project), timesteps_per_call=3 | 1 |" in table
    assert "| ddpo (this project), timesteps_per_call=3, batches_per_call=2 | 1 |" in table
    with pytest.raises(SystemExit):  # 3 does not divide the 2 batches of an epoch
        peers.main(["--no-trl", "--batches-per-call", "3"])


def test_sd15_scale_is_the_published_model(peers):
    """--scale sd15 builds SD 1.5's published unet/vae/text_encoder configs: their published parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: no memory, no time
        unet = UNet2DConditionModel(**peers.SD15_UNET)
        vae = AutoencoderKL(**peers.SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**peers.SD15_TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 512


def test_fit_chooses_timesteps_per_call_from_the_one_step_run(peers):
    one = {"cuda_weights_mib": 2000.0, "cuda_epoch_extra_mib": 9000.0}
    assert peers.fit_timesteps_per_call(one, 2000 + 9000 * 4.5, num_steps=10) == 4
    assert peers.fit_timesteps_per_call(one, 140_000, num_steps=10) == 10  # never more than the steps
    assert peers.fit_timesteps_per_call(one, 5000, num_steps=10) == 1  # never fewer than one


def test_gpu_memory_columns_and_failed_variants(peers):
    def run(impl, k, epoch_s, gpu):
        return {"impl": impl, "timesteps_per_call": k, "threads": 4, "run": 0, "epoch_s": epoch_s,
                "epoch_cpu_s": epoch_s, "sample_s": 1.0, "train_s": epoch_s - 1, "peak_rss_mib": 5000.0,
                "cuda_peak_mib": gpu, "cuda_reserved_mib": gpu + 300}

    results = [run("ddpo", 1, 4.8, 11000.0), run("ddpo", 10, 3.0, 90000.0), run("trl", None, 4.8, 11000.0)]
    rows = peers.summarise(results, [("ddpo", 1, 1), ("ddpo", 4, 1), ("ddpo", 10, 1), ("trl", None, None)], [4])
    assert [(r["impl"], r["timesteps_per_call"]) for r in rows] == [("ddpo", 1), ("ddpo", 10), ("trl", None)]
    assert rows[1]["speedup_vs_trl"] == pytest.approx(1.6) and rows[1]["cuda_peak_mib"] == 90000.0
    table = peers.markdown(rows)
    assert "peak GPU MiB allocated / reserved" in table and "| 90000 / 90300 |" in table
