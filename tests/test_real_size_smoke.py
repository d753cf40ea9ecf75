"""benchmarks/real_size_smoke.py on its --tiny configs: every model kind builds, samples and takes a LoRA step."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("real_size_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(smoke, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "smoke.json"
    smoke.main(["--tiny", "--in-process", "--models", "sd15,sdxl,sd35m,flux", "--threads", "1", "--repeats", "1",
                "--out", str(out)])
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd35m", "flux"])
def test_row_is_complete_and_sane(results, name):
    row = next(r for r in results[0]["rows"] if r["model"] == name)
    assert row["status"] == "ok" and row["tiny"] and row["dtype"] == "bfloat16"
    for key in ("params", "params_with_buffers", "lora_params", "sample_step_s", "train_step_s", "sample_cpu_s",
                "train_cpu_s", "weights_gib"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    for key in ("build_peak_gib", "sample_peak_gib", "lora_setup_peak_gib", "train_peak_gib", "peak_gib"):
        assert math.isfinite(row[key]) and row[key] >= 0, key
    assert row["lora_params"] < row["params"] <= row["params_with_buffers"]  # base only: no LoRA in the count
    assert row["lora_changed"], "the AdamW step did not move the LoRA weights"
    assert row["base_unchanged"], "the LoRA step touched the frozen base weights"
    assert row["gradient_checkpointing"] == (name in ("sd35m", "flux"))  # --gradient-checkpointing auto
    assert ("add_q_proj" in row["lora_targets"]) == (name in ("sd35m", "flux"))


def test_markdown_table_has_a_row_per_model(results):
    table = results[1]
    for name in ("sd15", "sdxl", "sd35m", "flux"):
        assert f"| {name} |" in table


def test_published_configs_match_published_sizes(smoke):
    """Parameter counts of the real configs on the meta device (no memory): within 5% of the published sizes."""
    import diffusers
    import torch

    for name, (cls, _, published, *_rest, config, _tiny) in smoke.MODELS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**config)
        count = sum(t.numel() for t in model.state_dict().values())
        assert abs(count / 1e9 / published - 1) < 0.05, (name, count)


def test_flux_is_skipped_on_cpu_with_a_reason(smoke, tmp_path):
    args = smoke.parse(["--models", "flux", "--out", str(tmp_path / "x.json")])
    assert "--include-flux" in smoke.skip_reason("flux", args)
    assert smoke.skip_reason("flux", smoke.parse(["--models", "flux", "--include-flux"])) is None


def test_out_of_memory_becomes_a_row(smoke, monkeypatch):
    def oom(name, args):
        raise MemoryError("cannot allocate 24 GiB")

    monkeypatch.setattr(smoke, "bench_model", oom)
    row = smoke.bench_or_oom("sdxl", smoke.parse(["--models", "sdxl"]))
    assert row["status"] == "out of memory" and "24 GiB" in row["reason"]
    assert "out of memory" in smoke.markdown([row])


def test_cpu_allocator_failure_is_out_of_memory_but_other_errors_raise(smoke, monkeypatch):
    def fail(message):
        def bench(name, args):
            raise RuntimeError(message)
        return bench

    args = smoke.parse(["--models", "sd15"])
    monkeypatch.setattr(smoke, "bench_model", fail("DefaultCPUAllocator: not enough memory: you tried to allocate"))
    assert smoke.bench_or_oom("sd15", args)["status"] == "out of memory"
    monkeypatch.setattr(smoke, "bench_model", fail("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        smoke.bench_or_oom("sd15", args)
