"""Registry, input conversion, JPEG numbers, composition arithmetic, NaN reporting."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward, list_rewards
from rewards.images import check_tensor, to_pil


def _noise_and_flat(size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    flat = Image.new("RGB", (size, size), (120, 30, 200))
    return [noise, flat]


def _jpeg_kb(image: Image.Image) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def constant_reward(value: float = 1.0):
    """A user reward factory, loaded by "test_rewards_core:constant_reward"."""
    def reward(images, prompts, metadata):
        return np.full(len(prompts), value), {"value": [value] * len(prompts)}
    return reward


def nan_reward():
    def reward(images, prompts, metadata):
        return np.array([1.0, np.nan]), {}
    return reward


def test_unknown_name_lists_valid_rewards():
    with pytest.raises(ValueError) as err:
        build_reward("aesthetics")
    for name in ["aesthetic", "jpeg_compressibility", "vlm_bertscore", "compose", "remote"]:
        assert name in str(err.value)
        assert name in list_rewards()


def test_module_path_reward_and_its_errors():
    reward = build_reward("test_rewards_core:constant_reward", value=2.5)
    scores, info = reward(_noise_and_flat(), ["a", "b"], [{}, {}])
    assert scores.dtype == np.float32 and scores.tolist() == [2.5, 2.5] and info["value"] == [2.5, 2.5]
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        build_reward("test_rewards_core:missing")
    with pytest.raises(ImportError, match="no_such_module"):
        build_reward("no_such_module:f")


def test_kwargs_must_be_plain_data():
    with pytest.raises(TypeError, match="kwargs must be plain data"):
        build_reward("test_rewards_core:constant_reward", value=np.float32(1.0))


def test_batch_size_mismatch_is_refused():
    reward = build_reward("jpeg_compressibility")
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        reward(_noise_and_flat(), ["only one"], None)


def test_jpeg_scores_are_kb_at_quality_95():
    images = _noise_and_flat()
    expected = [_jpeg_kb(im) for im in images]
    comp, info = build_reward("jpeg_compressibility")(images, ["x", "y"], [{}, {}])
    incomp, _ = build_reward("jpeg_incompressibility")(images, ["x", "y"], None)
    np.testing.assert_allclose(incomp, expected, rtol=1e-6)
    np.testing.assert_allclose(comp, [-e for e in expected], rtol=1e-6)
    assert info["jpeg_kb"] == pytest.approx(expected)
    assert incomp[0] > 5 * incomp[1]  # noise is far less compressible than a flat colour


def test_tensor_and_pil_inputs_agree():
    images = _noise_and_flat()
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    from_pil, _ = build_reward("jpeg_incompressibility")(images, ["x", "y"], None)
    from_tensor, _ = build_reward("jpeg_incompressibility")(tensor, ["x", "y"], None)
    np.testing.assert_allclose(from_pil, from_tensor)


def test_image_conversion_and_refusals():
    gray = Image.new("L", (10, 6), 128)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white background
    rgb = to_pil([gray, rgba])
    assert [im.mode for im in rgb] == ["RGB", "RGB"]
    assert rgb[0].getpixel((0, 0)) == (128, 128, 128) and rgb[1].getpixel((0, 0)) == (255, 255, 255)
    for mode in ("I", "F"):  # 32-bit integer and float: no defined range
        with pytest.raises(ValueError, match=f"image 1 has PIL mode '{mode}'"):
            to_pil([gray, Image.new(mode, (4, 4))])
    with pytest.raises(ValueError, match=r"\[-1, 1\]\? pass \(images \+ 1\) / 2"):
        check_tensor(torch.rand(2, 3, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match="channels-last"):
        check_tensor(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"NaN or infinite values in images \[1\]"):
        check_tensor(torch.stack([torch.rand(3, 4, 4), torch.full((3, 4, 4), float("nan"))]))
    with pytest.raises(TypeError, match="expected a list of PIL images"):
        to_pil("image.png")
    assert to_pil(np.zeros((1, 3, 4, 6), dtype=np.float32))[0].size == (6, 4)
    gray_tensor = check_tensor(torch.full((1, 1, 5, 7), 0.5))
    assert gray_tensor.shape == (1, 3, 5, 7)
    assert check_tensor(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).max().item() == 1.0


def test_sixteen_bit_palette_and_transparency_conversions():
    sixteen = Image.fromarray(np.array([[0, 257, 32896, 65535, 65534, 128]], dtype=np.uint16))
    assert sixteen.mode == "I;16"  # what a 16-bit grayscale PNG opens as: scaled, not clipped at 255
    assert np.array(to_pil([sixteen])[0])[0, :, 0].tolist() == [0, 1, 128, 255, 255, 0]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 transparent -> white, index 1 opaque blue
    assert np.array(to_pil([palette])[0]).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    half = Image.new("LA", (1, 1), (0, 128))  # black at alpha 128/255 on white
    assert to_pil([half])[0].getpixel((0, 0)) == (127, 127, 127)
    keyed = Image.new("RGB", (1, 1), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # a PNG tRNS colour key
    assert to_pil([keyed])[0].getpixel((0, 0)) == (255, 255, 255)


def test_nan_scores_get_a_reason_naming_the_prompt():
    reward = build_reward("test_rewards_core:nan_reward")
    with pytest.warns(UserWarning, match="a cat"):
        scores, info = reward(_noise_and_flat(), ["a dog", "a cat"], None)
    assert np.isnan(scores[1]) and info["unscorable"][0] is None and "a cat" in info["unscorable"][1]


def test_compose_weighted_sum_with_raw_terms_in_info():
    images = _noise_and_flat()
    kb = np.array([_jpeg_kb(im) for im in images])
    reward = build_reward("compose", terms={"jpeg_incompressibility": 0.5, "test_rewards_core:constant_reward": 2.0},
                          kwargs={"test_rewards_core:constant_reward": {"value": 3.0}})
    scores, info = reward(images, ["x", "y"], None)
    np.testing.assert_allclose(scores, 0.5 * kb + 2.0 * 3.0, rtol=1e-5)
    assert info["jpeg_incompressibility"] == pytest.approx(kb.tolist())
    assert info["jpeg_incompressibility/jpeg_kb"] == pytest.approx(kb.tolist())
    assert info["test_rewards_core:constant_reward"] == [3.0, 3.0]


def test_compose_normalization_batch_and_fixed():
    images = _noise_and_flat()
    kb = np.array([_jpeg_kb(im) for im in images])
    batch_reward = build_reward("compose", terms={"jpeg_incompressibility": 1.0}, normalize="batch")
    batch, _ = batch_reward(images, ["x", "y"], None)
    np.testing.assert_allclose(batch, [1.0, -1.0], atol=1e-4)  # two values z-score to +-1
    fixed, _ = build_reward("compose", terms={"jpeg_incompressibility": 2.0, "jpeg_compressibility#same": 1.0},
                            normalize={"jpeg_incompressibility": {"mean": 1.0, "std": 4.0}})(images, ["x", "y"], None)
    np.testing.assert_allclose(fixed, 2.0 * (kb - 1.0) / 4.0 - kb, rtol=1e-5)
    with pytest.raises(ValueError, match="not terms"):
        build_reward("compose", terms={"jpeg_compressibility": 1.0}, kwargs={"aesthetic": {}})
    with pytest.raises(ValueError, match="std"):
        build_reward("compose", terms={"jpeg_compressibility": 1.0}, normalize={"jpeg_compressibility": {"mean": 0}})


def test_compose_propagates_unscorable_terms():
    reward = build_reward("compose", terms={"test_rewards_core:nan_reward": 1.0, "jpeg_compressibility": 1.0})
    with pytest.warns(UserWarning):
        scores, info = reward(_noise_and_flat(), ["a dog", "a cat"], None)
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    assert info["unscorable"][0] is None and "a cat" in info["unscorable"][1]
