"""Every model family (sd, sdxl, sd3, flux) behind the policy interface, on tiny random pipelines built in code."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpo.checkpoint import list_checkpoints
from ddpo.config import ConfigError, load_config
from ddpo.metrics import read_metrics
from ddpo.trainer import train

PRESETS = {"sd": "tiny_cpu", "sdxl": "tiny_sdxl", "sd3": "tiny_sd3", "flux": "tiny_flux"}
ALGORITHMS = {"ddpo_is": [], "grpo": ["sample.images_per_prompt=2"], "rwr": [], "nft": []}


def run(tmp_path, family, *overrides, name="run"):
    config = load_config(PRESETS[family], [f"logging.output_dir={tmp_path}", f"logging.run_name={name}",
                                           "reward.name=rewards_for_tests:brightness", *overrides])
    return train(config)


def lora(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("family", PRESETS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_epochs_of_each_algorithm_on_each_family(tmp_path, family, algorithm):
    run_dir = run(tmp_path, family, f"train.algorithm={algorithm}", *ALGORITHMS[algorithm])
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert np.isfinite(row["loss"]) and np.isfinite(row["reward_mean"]) and row["optimizer_steps"] >= 1
        if algorithm in ("ddpo_is", "grpo"):
            assert row["approx_kl"] >= 0 and 0 <= row["clipfrac"] <= 1
        else:
            assert row["approx_kl"] is None
    first, last = list_checkpoints(run_dir)
    assert any(not torch.equal(a, b) for a, b in zip(lora(first).values(), lora(last).values()))


@pytest.mark.parametrize("family,cfg", [("sd", True), ("sd", False), ("sdxl", True), ("sdxl", False),
                                        ("sd3", True), ("sd3", False), ("flux", True)])
def test_importance_ratio_is_exactly_one_before_the_first_update(tmp_path, family, cfg):
    # One call per step, as sampling made them: exactly the sampled numbers (batched calls: tests/test_train.py).
    run_dir = run(tmp_path, family, "train.num_epochs=1", "sample.num_batches_per_epoch=1", "train.batch_size=2",
                  "train.gradient_accumulation_steps=1", f"train.cfg={str(cfg).lower()}", "train.timesteps_per_call=1",
                  *([] if cfg else ["sample.guidance_scale=1.0"]))
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    assert row["approx_kl"] == 0.0 and row["clipfrac"] == 0.0


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_lora_checkpoint_loads_in_diffusers_and_changes_the_output_as_the_trainer_does(tmp_path, family):
    from ddpo.families import load_family
    from ddpo.generate import generate_images, load_for_inference
    from ddpo.pipeline import load_trained_weights, prepare_denoiser

    config = load_config(PRESETS[family])
    run_dir = run(tmp_path, family, "train.num_epochs=1", "train.learning_rate=0.1")
    folder = list_checkpoints(run_dir)[-1]
    model, kwargs = config.model.pretrained, {"num_steps": 3, "guidance_scale": config.sample.guidance_scale}
    untrained = load_for_inference(model)
    untrained.set_resolution(config.model.resolution)
    base = generate_images(untrained, ["a cat"], **kwargs)
    through_diffusers = load_for_inference(model, str(run_dir))  # pipe.load_lora_weights(folder)
    assert through_diffusers.denoiser.peft_config
    tuned = generate_images(through_diffusers, ["a cat"], **kwargs)

    trainer = load_family(model)  # the trainer's own loader: LoRA adapters added, then its weights loaded
    trainer.set_resolution(config.model.resolution)
    prepare_denoiser(trainer.denoiser, use_lora=True, rank=config.model.lora_rank, alpha=config.model.lora_alpha,
                     target_modules=list(trainer.default_lora_targets), gradient_checkpointing=False, attention="sdpa")
    if family in ("sd3", "flux"):  # the family's default LoRA targets include the joint attention's projections
        assert any("add_q_proj" in key for key in lora(folder))
    load_trained_weights(trainer, trainer.denoiser, folder, use_lora=True)
    by_trainer = generate_images(trainer, ["a cat"], **kwargs)
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changes the images...
    torch.testing.assert_close(tuned, by_trainer, rtol=0, atol=1e-5)  # ...exactly as the trainer's weights do


def test_full_finetuning_of_a_transformer_saves_and_generates(tmp_path):
    from ddpo.generate import generate_images, load_for_inference

    run_dir = run(tmp_path, "sd3", "model.use_lora=false", "train.num_epochs=1", "train.learning_rate=1e-2")
    folder = list_checkpoints(run_dir)[-1]
    assert (folder / "transformer" / "config.json").is_file() and not (folder / "unet").exists()
    images = generate_images(load_for_inference("tiny-random-sd3", str(run_dir)), ["a cat"], num_steps=3)
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def test_sde_window_trains_only_the_window_steps():
    from ddpo.rollout import sde_window

    config = load_config("tiny_sd3", ["sample.num_steps=6", "sample.sde_window=2"])
    masks = [sde_window(config, epoch) for epoch in range(20)]
    assert all(int(m.sum()) == 2 and m.tolist().index(True) <= 4 for m in masks)
    assert len({m.tolist().index(True) for m in masks}) > 1  # the window moves between epochs
    assert torch.equal(sde_window(config, 3), masks[3])  # seeded by (seed, epoch)
    sliding = load_config("tiny_sd3", ["sample.num_steps=6", "sample.sde_window=2", "sample.sde_window_starts=[0, 2]",
                                       "sample.sde_window_schedule=sliding"])
    assert [sde_window(sliding, e).tolist().index(True) for e in range(4)] == [0, 2, 0, 2]


def test_sde_window_outside_steps_are_deterministic_and_not_trained(tmp_path):
    run_dir = run(tmp_path, "sd3", "train.num_epochs=1", "sample.num_steps=4", "sample.sde_window=1")
    row = read_metrics(run_dir / "metrics.jsonl")[0]
    # 4 samples x 1 trained step in micro-batches of 2: the window's step alone is trained
    assert row["optimizer_steps"] == 2 and np.isfinite(row["loss"])


@pytest.mark.parametrize("overrides,message", [
    (["train.algorithm=grpo", "sample.images_per_prompt=1"], "images_per_prompt"),
    (["sample.sde_window=9"], r"sample.sde_window=9 must be in \[0, sample.num_steps=4\]"),
    (["sample.sde_window=2", "sample.sde_window_starts=[3]"], r"starts at 0..2"),
    (["sample.sde_window=0", "sample.sde_window_starts=[0]"], "needs sample.sde_window > 0"),
    (["train.algorithm=grpo", "sample.eta=0"], "needs a stochastic policy"),
    (["train.nft_beta=0"], "train.nft_beta=0.0 must be > 0"),
    (["model.resolution=-8"], "model.resolution=-8 must be >= 0"),
])
def test_flow_settings_are_validated_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_sd3", overrides)


def test_cps_step_on_a_unet_family_is_refused_before_the_weights_load(tmp_path):
    with pytest.raises(ConfigError, match="sample.flow_step=cps chooses the step of flow-matching models"):
        run(tmp_path, "sd", "sample.flow_step=cps")


def test_a_pipeline_of_another_class_is_named_with_the_families(tmp_path):
    from ddpo.families import ModelLoadError, load_family
    from ddpo.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ModelLoadError, match=r"KandinskyPipeline.*StableDiffusion3Pipeline \(sd3\).*docs/models.md"):
        load_family(str(folder))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_saved_folders_load_through_from_pretrained(tmp_path, family):
    from ddpo.families import load_family
    from ddpo.generate import generate_images
    from ddpo.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / family, family=family)
    loaded = load_family(str(folder))
    assert loaded.name == family
    loaded.set_resolution(16)
    images = generate_images(loaded, ["a red fox"], num_steps=2, guidance_scale=2.0 if family != "flux" else 3.5)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", PRESETS)
def test_gradient_checkpointing_gives_the_same_update(tmp_path, family):
    plain = run(tmp_path / "a", family, "train.num_epochs=1")
    checkpointed = run(tmp_path / "b", family, "train.num_epochs=1", "model.gradient_checkpointing=true")
    a, b = lora(list_checkpoints(plain)[-1]), lora(list_checkpoints(checkpointed)[-1])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_nft_trains_on_deterministic_samples(tmp_path):
    # likelihood-free: the ODE sampler (eta 0) has no log-probabilities, DiffusionNFT needs none
    run_dir = run(tmp_path, "sd3", "train.algorithm=nft", "sample.eta=0", "sample.sde_window=0")
    first, last = list_checkpoints(run_dir)
    assert any(not torch.equal(a, b) for a, b in zip(lora(first).values(), lora(last).values()))


@pytest.mark.parametrize("family", PRESETS)
def test_deterministic_sampler_matches_the_diffusers_pipeline(family):
    """encode, schedule, predict (with CFG), the step at noise level 0 and decode agree with the pipeline's own
    __call__ from the same initial noise: the family is the model as diffusers runs it."""
    from ddpo.families import load_family
    from ddpo.sampler import sample_trajectories

    loaded = load_family(load_config(PRESETS[family]).model.pretrained)
    loaded.set_resolution(16)
    noise = torch.randn(loaded.latent_shape(1), generator=torch.Generator().manual_seed(0))
    guidance = 3.0
    ours = sample_trajectories(loaded, loaded.denoiser, loaded.encode(["a red fox"], "cpu"), loaded.encode([""], "cpu"),
                               num_steps=4, guidance_scale=guidance, eta=0.0, generator=torch.Generator(),
                               initial_noise=noise).images
    kwargs = {"eta": 0.0} if family in ("sd", "sdxl") else {}
    theirs = loaded.pipe("a red fox", num_inference_steps=4, guidance_scale=guidance, latents=noise.clone(),
                         height=16, width=16, output_type="pt", **kwargs).images
    torch.testing.assert_close(ours, theirs.float().cpu(), rtol=0, atol=1e-4)
