"""`ddpo shapes pretrain` end to end at a few steps per stage: it writes a loadable, manifest-checked package folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_pretrain_stages_write_a_loadable_pipeline_and_captioner(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ddpo.shapes import ShapesWeightsError, captioner_path, pipeline_path
    from ddpo.shapes.captioner import ShapesCaptioner
    from ddpo.shapes.cli import main

    out, work = tmp_path / "pretrained", tmp_path / "work"
    args = ["pretrain", "--work-dir", str(work), "--out", str(out), "--vae-steps", "2", "--decoder-steps", "2",
            "--num-images", "256", "--unet-steps", "2", "--captioner-steps", "2", "--log-every", "1",
            "--captioner-rounded-fraction", "0.5"]
    assert main(args) == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["pretrain_config"]["unet_steps"] == 2 and "pipeline/unet/config.json" in manifest["files"]
    for shipped in (out, Path(__file__).parents[1] / "ddpo" / "shapes" / "pretrained"):  # no pretraining-machine paths
        assert not [f for f in shipped.rglob("config.json") if "_name_or_path" in json.loads(f.read_text())]
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path(out))
    assert len(pipe.tokenizer) > 100 and pipe.vae.config.scaling_factor != 0.18215  # measured, not SD's
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 8
    assert len(ShapesCaptioner(captioner_path(out)).caption([], "?")) == 0
    weights = out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated: corrupt
    with pytest.raises(ShapesWeightsError, match="ddpo shapes pretrain"):
        pipeline_path(out)


def test_pretrain_rejects_unknown_stage(tmp_path):
    from ddpo.shapes.cli import main

    with pytest.raises(SystemExit, match="unknown stage"):
        main(["pretrain", "--work-dir", str(tmp_path), "--stages", "vae,dreaming"])


def test_rounded_squares_get_soft_labels_that_follow_their_fill_ratio():
    import numpy as np

    from ddpo.shapes.evaluator import analyse
    from ddpo.shapes.pretrain import _targets, _with_rounded_squares
    from ddpo.shapes.world import SHAPES, sample_scenes

    rng = np.random.default_rng(0)
    scenes = sample_scenes(300, rng, rare_fraction=0.25)
    images, p_square = _with_rounded_squares(scenes, 1.0, rng)
    rounded = ~np.isnan(p_square)
    assert rounded.sum() == sum(s.shape in ("square", "circle") for s in scenes)  # fraction 1: every one
    fills = np.array([analyse(image).fill for image in images[rounded]])
    assert np.corrcoef(fills, p_square[rounded])[0, 1] > 0.95  # measured 0.998
    shape = _targets(scenes, p_square)[1]
    np.testing.assert_allclose(shape[rounded].sum(1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(shape[rounded][:, SHAPES.index("square")].numpy(), p_square[rounded], rtol=1e-5)
    _, none = _with_rounded_squares(scenes, 0.0, np.random.default_rng(0))
    assert np.isnan(none).all() and _targets(scenes)[1].ndim == 1  # off: exact renders, class indices


def test_unset_pretrain_options_keep_each_configs_own_defaults():
    """The UNet's and the flow model's configs share some names (seed, data): an option given applies to both, an
    option not given leaves each class's own default (not the other's)."""
    from ddpo.shapes.cli import _given, _parser
    from ddpo.shapes.flow import FlowPretrainConfig
    from ddpo.shapes.pretrain import PretrainConfig

    args = _parser().parse_args(["pretrain", "--flow"])
    assert _given(args, PretrainConfig) == {} and _given(args, FlowPretrainConfig) == {}
    args = _parser().parse_args(["pretrain", "--flow", "--rare-fraction", "0.0002", "--flow-steps", "7"])
    assert _given(args, PretrainConfig) == {"rare_fraction": 0.0002}
    assert FlowPretrainConfig(**_given(args, FlowPretrainConfig)) == FlowPretrainConfig(rare_fraction=0.0002,
                                                                                        flow_steps=7)
