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


def test_reference_prediction_turns_lora_off_and_back_on():
    from ddpo.families import Cond, load_family
    from ddpo.objectives import adapters_off
    from ddpo.pipeline import prepare_denoiser

    family = load_family("tiny-random")
    pipe = family.pipe
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    cond, uncond = Cond(embeds=torch.randn(2, 77, 16)), Cond(embeds=torch.randn(2, 77, 16))

    def predict_noise(model, *args):
        return family.predict(model, *args)

    base = predict_noise(pipe.unet, x, t, cond, uncond, 2.0)
    params = prepare_denoiser(pipe.unet, use_lora=True, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                          gradient_checkpointing=False, attention="sdpa")
    with torch.no_grad():
        for p in params:
            p.add_(0.5)  # LoRA B starts at zero: move it so the adapted model differs
    tuned = predict_noise(pipe.unet, x, t, cond, uncond, 2.0)
    assert not torch.allclose(tuned, base, atol=1e-4)
    with adapters_off(pipe.unet) as reference:
        torch.testing.assert_close(predict_noise(reference, x, t, cond, uncond, 2.0), base)
    torch.testing.assert_close(predict_noise(pipe.unet, x, t, cond, uncond, 2.0), tuned)  # adapters back on


def _lora_norm(run_dir) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(list_checkpoints(run_dir)[-1] / "pytorch_lora_weights.safetensors"))
    return float(sum(v.float().norm() ** 2 for k, v in weights.items() if "lora.up" in k or "lora_B" in k) ** 0.5)


def test_kl_penalty_keeps_the_policy_nearer_the_pretrained_model(tmp_path):
    # Adam moves every weight by about the learning rate per step: without the penalty the LoRA weights wander off
    # (measured norm 0.74 after 4 epochs, 1.13 after 10); with it they stay within a few steps of zero (0.57).
    free = run(tmp_path / "free", "train.num_epochs=10", "train.learning_rate=1e-2")
    held = run(tmp_path / "held", "train.num_epochs=10", "train.learning_rate=1e-2", "train.kl_coef=100")
    assert 0 < _lora_norm(held) < 0.7 * _lora_norm(free)
    kl_free, kl_held = (read_metrics(d / "metrics.jsonl")[-1].get("kl_ref") for d in (free, held))
    assert kl_free is None and 0 < kl_held < 1  # logged only when the penalty is on


def test_kl_penalty_needs_lora_and_a_ddpo_algorithm(tmp_path):
    from ddpo.config import ConfigError

    with pytest.raises(ConfigError, match="use_lora"):
        run(tmp_path, "train.kl_coef=0.1", "model.use_lora=false")
    with pytest.raises(ConfigError, match="kl_coef"):
        run(tmp_path, "train.kl_coef=0.1", "train.algorithm=rwr")


def test_a_resumed_fp16_run_keeps_its_loss_scale_and_logs_skipped_steps(tmp_path, monkeypatch):
    # CPU accelerate has no fp16 GradScaler, so give the accelerator a CPU one: the code under test (saving the
    # scaler in the checkpoint, restoring it, counting the steps it skips) is the same as on a GPU.
    import json

    import ddpo.trainer as trainer

    made, scales, original = [], [1024.0, 65536.0, float("inf")], trainer.make_accelerator

    def with_scaler(config, run_dir):
        accelerator = original(config, run_dir)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scales[len(made)], growth_interval=1)
        made.append(accelerator)
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", with_scaler)
    run_dir = run(tmp_path, "train.num_epochs=1")  # 2 optimizer steps, each doubling the scale: 1024 -> 4096
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    assert (row["optimizer_steps"], row["fp16_skipped_steps"]) == (2, 0) and row["grad_norm"] > 0
    saved = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())["grad_scaler"]
    assert saved["scale"] == made[0].scaler.get_scale() == 4096.0
    train(load_config("tiny_cpu", ["train.num_epochs=2"]), resume=str(run_dir))
    assert made[1].scaler.get_scale() == 16384.0  # from the saved 4096, not from the fresh scaler's 65536
    # An overflowing scale: the scaler drops both steps, and the metrics say so.
    row = read_metrics(run(tmp_path / "inf", "train.num_epochs=1") / "metrics.jsonl")[0]
    assert (row["optimizer_steps"], row["fp16_skipped_steps"]) == (2, 2)
