"""Bad input to the command line (issue 17, sections 5 and 6): paths that would leave their folder, edited
checkpoints, out-of-range generate and steer options, and missing extras each give one clear line, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpo.checkpoint import CheckpointError, find_checkpoint, list_checkpoints, read_optimizer_state
from ddpo.cli import main
from ddpo.manifest import sha256_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- run names


@pytest.mark.parametrize("name", ["../x", "../../x", "/tmp/ddpo-escape", "a/b"])
def test_train_refuses_a_run_name_that_leaves_the_output_dir(tmp_path, capsys, name):
    runs = tmp_path / "out" / "runs"
    assert main(["train", "tiny_cpu", f"logging.output_dir={runs}", f"logging.run_name={name}"]) == 2
    err = capsys.readouterr().err
    assert f"logging.run_name={name!r}: use letters, digits" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not Path("/tmp/ddpo-escape").exists()


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of tiny_cpu (a LoRA on the tiny random model): a run folder with one checkpoint."""
    from ddpo.config import load_config
    from ddpo.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    return train(load_config("tiny_cpu", [f"logging.output_dir={runs}", "logging.run_name=tiny", "train.num_epochs=1",
                                          "sample.num_steps=2", "logging.sample_grid=false"]))


def _copy(tiny_run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "epoch_0000"
    shutil.copytree(list_checkpoints(tiny_run)[-1], folder)
    return folder


def _rewrite(folder: Path, name: str, content: bytes) -> None:
    """Replace a file and its sha256 in the manifest, as a careful editor (or a bug) would."""
    (folder / name).write_bytes(content)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[name] = sha256_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_empty_manifest_does_not_pass_the_integrity_check(tiny_run, tmp_path):
    folder = _copy(tiny_run, tmp_path)
    (folder / "manifest.json").write_text("{}")
    (folder / "config.yaml").write_text("seed: 1\n")  # edited, and nothing left to compare it with
    with pytest.raises(CheckpointError, match=r"manifest.json does not list pytorch_lora_weights.safetensors, "
                                              r"config.yaml, optimizer.pt, trainer_state.json"):
        find_checkpoint(folder)
    manifest = {"config.yaml": sha256_file(folder / "config.yaml")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"does not list pytorch_lora_weights.safetensors, optimizer.pt"):
        find_checkpoint(folder)
    for bad in ("[]", '{"../outside": "' + "0" * 64 + '"}', '{"config.yaml": "abc"}'):
        (folder / "manifest.json").write_text(bad)
        with pytest.raises(CheckpointError, match="is not a mapping of file names to sha256 digests"):
            find_checkpoint(folder)


def test_a_file_the_manifest_does_not_list_is_refused(tiny_run, tmp_path):
    folder = _copy(tiny_run, tmp_path)
    assert find_checkpoint(folder) == folder
    (folder / "unet").mkdir()
    (folder / "unet" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"holds unet/extra.safetensors, which manifest.json does not list"):
        find_checkpoint(folder)


def test_garbage_trainer_state_and_optimizer_are_checkpoint_errors(tiny_run, tmp_path):
    folder = _copy(tiny_run, tmp_path)
    _rewrite(folder, "trainer_state.json", b"\x00garbage{")
    with pytest.raises(CheckpointError, match=r"trainer_state.json is not readable JSON .*earlier checkpoint"):
        find_checkpoint(folder)
    _rewrite(folder, "trainer_state.json", b'{"epoch": -1, "rng": {}}')
    with pytest.raises(CheckpointError, match=r"is not a ddpo trainer state \(it needs an `epoch` >= 0 and `rng`\)"):
        find_checkpoint(folder)
    _rewrite(folder, "optimizer.pt", b"not a torch file")
    with pytest.raises(CheckpointError, match=r"optimizer.pt is not an optimizer state saved by ddpo"):
        read_optimizer_state(folder)


def test_resume_from_an_edited_checkpoint_is_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (list_checkpoints(run)[-1] / "manifest.json").write_text("{}")
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert "CheckpointError: checkpoint" in err and "does not list" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--guidance", "-3"], "--guidance -3.0: must be a finite number >= 1"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number >= 1"),
    (["--eta", "-1"], "--eta -1.0: must be a finite number >= 0"),
    (["-n", "0"], "-n 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
])
def test_generate_refuses_out_of_range_options_before_loading(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "out"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_with_a_lora_from_another_base_model_names_the_model(tiny_run, tmp_path, capsys):
    from ddpo.tiny import save_tiny_pipeline

    wider = save_tiny_pipeline(tmp_path / "wider", channels=(16, 32), cross_attention_dim=32)
    assert main(["generate", "--model", str(wider), "--lora", str(tiny_run), "--prompt", "a cat",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "size mismatch" not in err and "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("ddpo generate:")]
    assert len(ours) == 1 and "was trained on model.pretrained='tiny-random'; pass --model tiny-random" in ours[0]


def test_generate_defaults_to_the_checkpoints_model_and_warns_about_long_prompts(tiny_run, tmp_path, capsys):
    long_prompt = "a cat " + "very " * 80 + "far away"
    assert main(["generate", "--lora", str(tiny_run), "--prompt", long_prompt, "--prompt", "a dog", "-n", "1",
                 "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p00_seed0000.png", "p01_seed0000.png"]
    warnings = [line for line in captured.err.splitlines() if line.startswith("ddpo generate: warning")]
    assert len(warnings) == 1 and "the text encoder reads 77, so the rest is cut" in warnings[0]
    assert "'a cat very" in warnings[0]


# ---------------------------------------------------------------------------------------------- steer


STEER = ["steer", "train", "--env", "Pendulum-v1", "--method", "dsrl_sac", "--no-video"]


@pytest.mark.parametrize("args,message", [
    (["--noise-bound", "inf"], "--noise-bound must be a finite number > 0, got inf"),
    (["--noise-bound", "nan"], "--noise-bound must be a finite number > 0, got nan"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    (["--updates-per-decision", "0"], "--updates-per-decision must be >= 1, got 0"),
    (["--warm-start-steps", "-5"], "--warm-start-steps must be >= 0, got -5"),
    (["--steps", "500"], "--steps 500 must be larger than --warm-start-steps 1000"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--name", "../../x"], "--name '../../x': use letters, digits"),
    (["--name", "/tmp/ddpo-steer-escape"], "--name '/tmp/ddpo-steer-escape': use letters"),
])
def test_steer_train_refuses_bad_options_before_writing_anything(args, message, tmp_path, capsys):
    pytest.importorskip("gymnasium")
    runs = tmp_path / "runs"
    assert main([*STEER, "--runs-dir", str(runs), *args]) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists() and not Path("/tmp/ddpo-steer-escape").exists()


@pytest.mark.parametrize("args", [["eval", "runs/x", "--episodes", "0"], ["bc", "Pendulum-v1", "--episodes", "0"],
                                  ["train", "--env", "Pendulum-v1", "--method", "dsrl_na", "--steps", "0"]])
def test_steer_episodes_and_steps_below_one_are_argparse_errors(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["steer", *args])
    assert info.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err


def test_evaluate_refuses_zero_episodes_instead_of_a_nan_mean():
    pytest.importorskip("gymnasium")
    from ddpo.steering.evaluate import evaluate

    with pytest.raises(ValueError, match="episodes must be >= 1, got 0"):
        evaluate("Pendulum-v1", lambda obs: None, 0)


def test_a_steer_folder_without_a_checkpoint_does_not_block_its_name(tmp_path, monkeypatch):
    pytest.importorskip("stable_baselines3")
    import ddpo.steering.train as steer_train

    monkeypatch.setattr(steer_train, "_train_sb3", lambda config, run_dir, checkpoint: None)  # no training here
    run = tmp_path / "Pendulum-v1_dsrl_sac_s0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"env_id": "Pendulum-v1", "noise_bound": 9.0}))  # a crashed start
    (run / "metrics.jsonl").write_text('{"env_steps": 0}\n')
    config = steer_train.TrainConfig(env_id="Pendulum-v1", method="dsrl_sac", video=False)
    assert steer_train.train(config, run) == run
    assert json.loads((run / "config.json").read_text())["noise_bound"] == 1.5
    assert not (run / "metrics.jsonl").exists()
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text("{}")  # now there is something to resume: options must match
    with pytest.raises(ValueError, match="holds a run with a different config"):
        steer_train.train(steer_train.TrainConfig(env_id="Pendulum-v1", method="dsrl_sac", noise_bound=2.0), run)


# ---------------------------------------------------------------------------------------------- missing extras


@pytest.mark.parametrize("module,args,extra", [
    ("gymnasium", ["steer", "list"], "steering"),
    ("stable_baselines3", ["steer", "train", "--env", "Pendulum-v1", "--method", "sac_scratch", "--runs-dir", "runs"],
     "steering"),
    ("gradio", ["app"], "app"),
])
def test_a_missing_extra_says_which_extra_to_install(module, args, extra, tmp_path):
    # sys.modules[name] = None makes `import name` raise ModuleNotFoundError, as when the extra is not installed.
    code = f"import sys; sys.modules[{module!r}] = None; from ddpo.cli import main; sys.exit(main({args!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"needs the {extra!r} extra ({module} is not installed)" in result.stderr
    assert f'pip install -c constraints.txt -e ".[{extra}]"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # checked before the run folder is written
