"""Full finetuning, bf16 autocast, gradient checkpointing, TensorBoard, and optional-dependency errors."""

import pytest
import torch

from ddpo.checkpoint import list_checkpoints
from ddpo.config import load_config
from ddpo.metrics import read_metrics
from ddpo.trainer import train


def run(tmp_path, *overrides):
    return train(load_config("tiny_cpu", [f"logging.output_dir={tmp_path}", "logging.run_name=r", *overrides]))


def test_full_finetuning_saves_a_unet_folder_that_generate_loads(tmp_path, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    from ddpo.generate import generate_images, load_for_inference

    run_dir = run(tmp_path, f"model.pretrained={tiny_sd_path}", "model.use_lora=false", "train.learning_rate=1e-2")
    first, last = list_checkpoints(run_dir)
    a = UNet2DConditionModel.from_pretrained(first / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(last / "unet").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    base = generate_images(load_for_inference(str(tiny_sd_path)), ["a cat"], num_steps=3)
    tuned = generate_images(load_for_inference(str(tiny_sd_path), str(run_dir)), ["a cat"], num_steps=3)
    assert not torch.equal(base, tuned)


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    run_dir = run(tmp_path, "model.mixed_precision=bf16", "model.gradient_checkpointing=true",
                  "train.num_epochs=1")
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    assert row["loss"] is not None and row["approx_kl"] >= 0


def test_tensorboard_events_are_written(tmp_path):
    run_dir = run(tmp_path, "logging.tensorboard=true", "train.num_epochs=1")
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_8bit_adam_without_bitsandbytes_says_how_to_install(tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        run(tmp_path, "train.use_8bit_adam=true")


def test_wandb_without_the_package_fails_before_the_model_loads(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ImportError, match="pip install wandb"):
        run(tmp_path, "logging.wandb=true", "model.pretrained=never/loaded")
