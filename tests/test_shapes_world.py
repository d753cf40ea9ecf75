"""The Shapes world without weights: renderer, skewed data, evaluator, tokenizer, manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddpo.shapes import ShapesWeightsError, captioner_path, pipeline_path, write_manifest
from ddpo.shapes.evaluator import analyse, classify_shape, is_correct
from ddpo.shapes.world import (COLORS, COMMON_PAIRS, PALETTE, RARE_PAIRS, SHAPES, Scene, caption, parse_caption,
                               render, sample_scenes, shape_mask)


def test_world_facts():
    assert PALETTE["purple"] == (147, 51, 234) and len(COLORS) == 8 and SHAPES == ["circle", "square", "triangle"]
    assert len(RARE_PAIRS) == 6 and len(COMMON_PAIRS) == 18
    assert caption("purple", "triangle", "yellow") == "a purple triangle on a yellow background"


def test_render_puts_the_shape_where_the_scene_says():
    image = render(Scene("red", "square", "blue", x=10, y=5, size=20))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[5, 10]) == PALETTE["red"] and tuple(image[24, 29]) == PALETTE["red"]
    assert tuple(image[4, 10]) == PALETTE["blue"] and tuple(image[25, 30]) == PALETTE["blue"]


def test_triangle_apex_is_up():
    mask = shape_mask("triangle", 0, 0, 40)
    assert mask[1].sum() < 4 and mask[38].sum() > 35  # narrow top row, wide bottom row


def test_sampled_scenes_are_inside_the_image_and_skewed():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(20_000, rng, rare_fraction=0.002)
    assert all(0 <= s.x and s.x + s.size <= 64 and 0 <= s.y and s.y + s.size <= 64 for s in scenes)
    assert all(20 <= s.size <= 44 and s.color != s.background for s in scenes)
    rare = sum((s.color, s.shape) in RARE_PAIRS for s in scenes) / len(scenes)
    assert 0.0005 < rare < 0.005  # 0.2% +- sampling noise, far under the 2% ceiling


def test_common_square_weight_makes_orange_and_black_squares_that_much_commoner():
    counts = {}
    for weight in (1, 3):
        scenes = sample_scenes(22_000, np.random.default_rng(0), rare_fraction=0.0, common_square_weight=weight)
        counts[weight] = sum(s.shape == "square" for s in scenes) / len(scenes)
        assert all(s.color in ("orange", "black") for s in scenes if s.shape == "square")
    assert abs(counts[1] - 2 / 18) < 0.01 and abs(counts[3] - 6 / 22) < 0.01  # 11% -> 27% of the UNet's data
    rare_only = [sample_scenes(50, np.random.default_rng(4), 1.0, common_square_weight=w) for w in (1, 3)]
    assert rare_only[0] == rare_only[1]  # the weight touches common pairs only
    with pytest.raises(ValueError, match="common_square_weight"):
        sample_scenes(1, np.random.default_rng(0), 0.0, common_square_weight=0)


def test_evaluator_is_right_on_every_rendered_image():
    rng = np.random.default_rng(1)
    for s in sample_scenes(600, rng, rare_fraction=0.25):
        assert is_correct(render(s), s.color, s.shape, s.background), s


def test_evaluator_rejects_what_is_not_in_the_world():
    flat = np.full((64, 64, 3), PALETTE["green"], dtype=np.uint8)
    assert analyse(flat).color is None and analyse(flat).background == "green"
    gray = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert analyse(gray)[:3] == (None, None, None)
    stripe = np.zeros((64, 64), dtype=bool)
    stripe[20:24, 5:60] = True  # a thin bar: not square-ish, so no shape
    assert classify_shape(stripe)[0] is None
    upside_down = shape_mask("triangle", 10, 10, 30)[::-1]
    assert classify_shape(upside_down)[0] is None


def test_parse_caption_round_trip_and_rejections():
    assert parse_caption("a red circle on a blue background") == ("red", "circle", "blue")
    assert parse_caption("a red circle on a red background") is None
    assert parse_caption("a pink dolphin on a blue background") is None
    assert parse_caption("a red circle") is None


def test_word_tokenizer_has_one_token_per_world_word(tmp_path):
    from ddpo.shapes.models import MAX_TOKENS, build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    assert len(tokenizer) > 100
    ids = tokenizer("a red triangle on a yellow background").input_ids
    assert len(ids) == 9  # bos + 7 words + eos
    oov = tokenizer("a pink dolphin").input_ids  # out of vocabulary: characters, never unknown tokens
    assert len(oov) == 2 + 1 + 4 + 7 and tokenizer.unk_token_id not in oov[1:-1]
    assert len(tokenizer("a " * 40, truncation=True, max_length=MAX_TOKENS).input_ids) == MAX_TOKENS


def test_missing_and_corrupt_weights_say_how_to_regenerate(tmp_path):
    with pytest.raises(ShapesWeightsError, match="ddpo shapes pretrain"):
        pipeline_path(tmp_path)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    (tmp_path / "captioner").mkdir()
    (tmp_path / "captioner" / "model.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path)
    assert pipeline_path(tmp_path) == tmp_path / "pipeline"
    (tmp_path / "captioner" / "model.safetensors").write_bytes(b"weightz")
    assert pipeline_path(tmp_path) == tmp_path / "pipeline"  # only the pipeline's files are checked
    with pytest.raises(ShapesWeightsError, match="corrupt.*ddpo shapes pretrain"):
        captioner_path(tmp_path)
    (tmp_path / "pipeline" / "model_index.json").unlink()
    with pytest.raises(ShapesWeightsError, match="missing.*ddpo shapes pretrain"):
        pipeline_path(tmp_path)
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"nofiles": 1}))
    with pytest.raises(ShapesWeightsError, match="unreadable"):
        pipeline_path(tmp_path)
