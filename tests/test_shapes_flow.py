"""The shipped Shapes flow model (`shapes-flow`): manifest, family, pretraining reproducibility, base accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpo.shapes import MANIFEST, PRETRAINED_DIR, flow_pipeline_path, pipeline_path


@pytest.fixture(scope="module")
def family():
    from ddpo.families import load_family

    return load_family("shapes-flow")


def test_shipped_flow_model_is_small_standard_and_in_the_manifest():
    root = flow_pipeline_path()  # verifies every flow_pipeline/ file against MANIFEST.json
    manifest = json.loads((PRETRAINED_DIR / MANIFEST).read_text())
    listed = {k for k in manifest["files"] if k.startswith("flow_pipeline/")}
    on_disk = {p.relative_to(PRETRAINED_DIR).as_posix() for p in root.rglob("*") if p.is_file()}
    assert listed == on_disk and "flow_pipeline/transformer/diffusion_pytorch_model.safetensors" in listed
    assert not list(root.rglob("*.bin")) and json.loads((root / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusion3Pipeline"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 6e6, f"the flow model is {size / 1e6:.1f} MB"
    assert manifest["flow_pretrain_config"]["seed"] == 0 and "pretrain_config" in manifest  # the UNet's entry kept
    # The same VAE as `shapes`: identical weights, SD3's shift_factor added, the same scaling factor.
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert manifest["files"][f"flow_pipeline/{vae_file}"] == manifest["files"][f"pipeline/{vae_file}"]
    flow_vae, vae = (json.loads((p / "vae" / "config.json").read_text()) for p in (root, pipeline_path()))
    assert flow_vae["shift_factor"] == 0.0 and flow_vae["scaling_factor"] == vae["scaling_factor"]
    assert not [f for f in root.rglob("config.json") if "_name_or_path" in json.loads(f.read_text())]


def test_shapes_flow_loads_as_the_sd3_family_without_t5(family):
    from ddpo.families import family_class
    from ddpo.families.flow import SD3Family

    assert family_class("shapes-flow") is SD3Family and isinstance(family, SD3Family)
    assert family.pipe.text_encoder_3 is None and family.default_resolution() == 64
    cond = family.encode(["a red square on a blue background"], torch.device("cpu"))
    # the pipeline's 16 + 256 tokens, its 256 identical zero tokens as one (tests/test_repeated_tokens.py)
    assert cond["embeds"].shape == (1, 16 + 1, 64) and cond["pooled"].shape == (1, 64)
    assert family.latent_shape(2) == (2, 4, 8, 8)


def test_pretraining_text_encoding_and_attention_are_the_pipelines(family):
    """Pretraining encodes prompts as the SD3 pipeline does, and its one-token stand-in for the 256 zero tokens
    (RepeatedTokenAttnProcessor) gives the transformer's output with all 256."""
    import copy

    from ddpo.families.attention import RepeatedTokenAttnProcessor
    from ddpo.shapes.flow import encode_text

    pipe = family.pipe
    prompts = ["a red square on a blue background", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        full_embeds, _, full_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        embeds, pooled = encode_text(pipe.text_encoder, pipe.text_encoder_2, ids)
        assert torch.equal(embeds, full_embeds) and torch.equal(pooled, full_pooled)
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([250.0, 900.0])
        full = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                                return_dict=False)[0]
        short = copy.deepcopy(pipe.transformer)
        short.set_attn_processor(RepeatedTokenAttnProcessor(256))
        one, _ = encode_text(pipe.text_encoder, pipe.text_encoder_2, ids, zero_tokens=1)
        out = short(hidden_states=x, timestep=t, encoder_hidden_states=one, pooled_projections=pooled,
                    return_dict=False)[0]
    assert (out - full).abs().max() < 1e-4 * full.abs().mean()


# `ddpo shapes pretrain --flow` with the short config below: the loss at each of its steps, measured once (torch
# 2.13.0, CPU, one thread). Two runs give identical files; these pin the numbers across changes of the code, the way
# the shipped weights pin the full recipe (docs/shapes.md, The Shapes flow model: its regeneration is bit for bit).
SHORT_FLOW_PRETRAIN = ["--num-images", "256", "--flow-steps", "3", "--flow-batch", "8", "--log-every", "1",
                       "--save-every", "0"]
PINNED_SHORT_LOSSES = [2.0501296520233154, 2.052919864654541, 2.0940675735473633]
PINNED_SHORT_WEIGHT_NORM = 5692.336721533748


def test_flow_pretraining_is_reproducible_and_ships_through_the_cli(tmp_path):
    """`ddpo shapes pretrain --flow` at a few steps, twice: identical weights, pinned losses; the manifest keeps the
    other entries."""
    from ddpo.shapes import write_manifest
    from ddpo.shapes.cli import main

    def run(name: str):
        out = tmp_path / name
        (out / "pipeline").mkdir(parents=True)
        (out / "pipeline" / "other.txt").write_text("the UNet's files stay listed")
        write_manifest(out, pretrain_config={"seed": 0})
        args = ["pretrain", "--flow", "--work-dir", str(tmp_path / f"work_{name}"), "--out", str(out),
                "--flow-vae", str(pipeline_path() / "vae"), *SHORT_FLOW_PRETRAIN]
        assert main(args) == 0
        log = [json.loads(line) for line in (tmp_path / f"work_{name}" / "flow_log.jsonl").read_text().splitlines()]
        return json.loads((out / MANIFEST).read_text()), [row["loss"] for row in log if "loss" in row]

    (first, losses), (second, losses_again) = run("a"), run("b")
    assert first == second and losses == losses_again  # same sha256 of every file, same configs, same losses
    from safetensors.torch import load_file

    weights_file = tmp_path / "a" / "flow_pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    norm = sum(float(w.double().pow(2).sum()) for w in load_file(weights_file).values())
    np.testing.assert_allclose(losses, PINNED_SHORT_LOSSES, rtol=1e-5)
    np.testing.assert_allclose(norm, PINNED_SHORT_WEIGHT_NORM, rtol=1e-6)  # the sum of the squared EMA weights
    assert first["pretrain_config"] == {"seed": 0} and "pipeline/other.txt" in first["files"]
    assert first["flow_pretrain_config"]["flow_steps"] == 3
    weights = [k for k in first["files"] if k.endswith(".safetensors")]
    assert {w.split("/")[1] for w in weights} == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert first["files"]["flow_pipeline/vae/diffusion_pytorch_model.safetensors"] == \
        json.loads((PRETRAINED_DIR / MANIFEST).read_text())["files"]["pipeline/vae/diffusion_pytorch_model.safetensors"]
    assert flow_pipeline_path(tmp_path / "a").is_dir()


@pytest.mark.slow  # 144 images: about 25 s alone on one thread
def test_base_flow_model_draws_common_pairs_right_and_rare_pairs_wrong(family):
    """The premise of shapes_flow_alignment, by the independent evaluator on fixed seeds at the preset's sampler."""
    from ddpo.shapes.evaluate import evaluate_pipeline
    from ddpo.shapes.flow import FLOW_EVAL_ETA, FLOW_EVAL_GUIDANCE, FLOW_EVAL_STEPS

    result = evaluate_pipeline(family, per_pair=6, steps=FLOW_EVAL_STEPS, guidance=FLOW_EVAL_GUIDANCE,
                               eta=FLOW_EVAL_ETA, seed=2)
    # Measured at 16 per pair (docs/shapes.md, The Shapes flow model); 6 per pair is noisier, hence the margins.
    assert result["common_accuracy"] >= 0.8, result["per_pair"]
    assert result["rare_accuracy"] <= result["common_accuracy"] - 0.25, result["per_pair"]


def test_eval_defaults_to_the_presets_sampler_for_each_model(family):
    from ddpo.config import load_config
    from ddpo.families.sd import SDFamily
    from ddpo.shapes.evaluate import EVAL_ETA, EVAL_GUIDANCE, EVAL_STEPS, default_eval_sampler

    sample = load_config("shapes_flow_alignment").sample
    assert default_eval_sampler(family) == (sample.num_steps, sample.guidance_scale, sample.eta)
    assert default_eval_sampler(SDFamily.__new__(SDFamily)) == (EVAL_STEPS, EVAL_GUIDANCE, EVAL_ETA)


def test_flow_preset_is_the_measured_grpo_row_of_the_comparison():
    """docs/shapes.md documents the preset by the comparison's `grpo` row (2,560 queries at the tuned 1e-3): the
    preset trains exactly that variant, which only adds evaluations and logging to its runs."""
    import importlib.util
    from dataclasses import asdict

    from ddpo.config import load_config

    spec = importlib.util.spec_from_file_location(
        "shapes_algorithms", Path(__file__).parent.parent / "benchmarks" / "shapes_algorithms.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = load_config("shapes_flow_alignment")
    row = load_config("shapes_flow_alignment", [*bench.VARIANTS["shapes-flow"]["grpo"], "train.learning_rate=1e-3",
                                                "train.num_epochs=40"])
    for section in ("model", "sample", "train", "reward", "seed"):
        assert asdict(config)[section] == asdict(row)[section], section
    assert config.model.pretrained == "shapes-flow" and config.train.algorithm == "grpo"
    assert config.sample.images_per_prompt >= 2 and config.sample.eta > 0
    assert config.prompts.split == "mix" and config.sample.sde_window == 0
    assert config.reward.name == load_config("shapes_alignment").reward.name
    assert config.reward.kwargs == load_config("shapes_alignment").reward.kwargs


def test_flow_world_images_are_read_by_the_evaluator(family):
    """A few common prompts at the deterministic ODE sampler, with the shipped model."""
    from ddpo.shapes.evaluate import generate
    from ddpo.shapes.evaluator import analyse
    from ddpo.shapes.flow import FLOW_EVAL_GUIDANCE, FLOW_EVAL_STEPS

    expected = [("green", "triangle", "purple"), ("red", "circle", "white"), ("black", "square", "yellow"),
                ("blue", "circle", "orange")]
    images = generate(family, expected, 0, FLOW_EVAL_STEPS, FLOW_EVAL_GUIDANCE, 0.0)
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()
    assert sum(analyse(im)[:3] == e for im, e in zip(images, expected)) >= 3
