"""Loading models through the real from_pretrained path, and the errors for models that cannot load offline."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo.families import ModelLoadError, load_family


def load_pipeline(name):
    return load_family(name).pipe
from ddpo.tiny import save_tiny_pipeline


def test_loads_a_saved_folder_with_a_ddim_scheduler(tiny_sd_path):
    pipe = load_pipeline(str(tiny_sd_path))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert len(pipe.tokenizer) > 50 and pipe.tokenizer.model_max_length == 77


def test_uncached_hub_id_explains_how_to_pass_a_local_folder():
    with pytest.raises(ModelLoadError, match=r"(?s)could not load the model 'someone/not-cached-model'.*--local-dir.*"
                                             r"model.pretrained=./models/sd"):
        load_pipeline("someone/not-cached-model")


def test_folder_without_model_index_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_empty_tokenizer_is_refused(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "p")
    for f in (folder / "tokenizer").iterdir():
        if f.name != "tokenizer_config.json":  # vocab.json, merges.txt, tokenizer.json
            f.unlink()
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    json.loads(tokenizer_config.read_text())  # still a valid config, just no vocabulary
    with pytest.raises(ModelLoadError, match="tokenizer .* is empty"):
        load_pipeline(str(folder))


def test_generate_cli_same_seed_same_images(tmp_path, tiny_sd_path):
    from ddpo.generate import main

    args = ["--model", str(tiny_sd_path), "--prompt", "a cat", "-n", "2", "--seed", "5", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["p00_seed0005.png", "p00_seed0006.png"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_generate_image_i_depends_only_on_seed_plus_i(tiny_sd_path):
    from ddpo.generate import generate_images, load_for_inference

    pipe = load_for_inference(str(tiny_sd_path))
    three = generate_images(pipe, ["a cat"] * 3, seed=0, num_steps=3)
    last = generate_images(pipe, ["a cat"], seed=2, num_steps=3)
    assert torch.equal(three[2], last[0]) and not torch.equal(three[0], three[1])


def test_cli_help_does_not_import_torch():
    code = "import sys; from ddpo.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "serve-reward" in result.stdout
