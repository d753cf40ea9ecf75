"""What a new user sees in the first hour: one epoch numbering (1..N), the run folder announced at the start,
resume from checkpoints written before that numbering, preset descriptions, key suggestions, quiet logs."""

import json
import shutil

import pytest

from ddpo.checkpoint import list_checkpoints
from ddpo.config import load_config
from ddpo.manifest import sha256_file
from ddpo.metrics import read_metrics, truncate_metrics
from ddpo.train_cli import main as train_main


def _tiny(tmp_path, *overrides):
    return ["tiny_cpu", f"logging.output_dir={tmp_path}", "logging.run_name=run", *overrides]


def _as_old_checkpoint(run_dir):
    """Rewrite a run of one epoch as the trainer wrote it before epochs were numbered 1..N: folder epoch_0000,
    trainer state {"epoch": 0} without epochs_done, metrics row "epoch": 0 (a valid manifest, as then)."""
    new = run_dir / "checkpoints" / "epoch_0001"
    old = new.with_name("epoch_0000")
    new.rename(old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["epochs_done"]
    state["epoch"] = 0
    (old / "trainer_state.json").write_text(json.dumps(state))
    manifest = {name: sha256_file(old / name) for name in json.loads((old / "manifest.json").read_text())}
    (old / "manifest.json").write_text(json.dumps(manifest))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in rows))
    return old


def test_console_metrics_grids_and_checkpoints_count_epochs_from_one(tmp_path, capsys):
    assert train_main(_tiny(tmp_path, "train.num_epochs=2", "logging.save_every=2")) == 0
    out = capsys.readouterr().out.splitlines()
    run_dir = tmp_path / "run"
    # The run folder comes first, before any epoch, and again at the end with the newest checkpoint.
    assert out[0].startswith(f"run folder {run_dir}: metrics.jsonl") and "checkpoints/epoch_NNNN/" in out[0]
    assert "TensorBoard: off (logging.tensorboard=true turns it on)" in out[0]
    assert [line.split()[1] for line in out if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert out[-1] == f"done: run folder {run_dir} (metrics.jsonl, samples/, checkpoints/); newest checkpoint " \
                      f"{run_dir / 'checkpoints' / 'epoch_0002'}"
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch_0002"]  # save_every=2: after the second epoch
    state = json.loads((list_checkpoints(run_dir)[0] / "trainer_state.json").read_text())
    assert state["epochs_done"] == state["epoch"] == 2


def test_resume_from_a_checkpoint_written_before_one_based_epochs(tmp_path, capsys):
    assert train_main(_tiny(tmp_path, "train.num_epochs=1")) == 0
    run_dir = tmp_path / "run"
    first_row = read_metrics(run_dir / "metrics.jsonl")[0]
    _as_old_checkpoint(run_dir)
    capsys.readouterr()
    assert train_main(["--resume", str(run_dir), "train.num_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "(resumed)" in out and "epoch 2/2" in out and "epoch 1/2" not in out  # epoch 1 is not redone
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["reward_mean"] == first_row["reward_mean"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch_0000", "epoch_0002"]


def test_truncate_metrics_renumbers_old_rows_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "loss": 0.5}) + "\n" for e in range(4)))
    truncate_metrics(path, 3)  # an old file (first row 0): rows become 1..4, those after epoch 3 are dropped
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 3)  # now 1-based: unchanged
    assert [r["epoch"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 0)
    assert path.read_text() == ""


def _cli(*args, cwd=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddpo.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _own_lines(stderr: str) -> list[str]:
    """stderr without the model-loading bars of diffusers/transformers (one redraw each, not per epoch)."""
    return [line for line in stderr.splitlines() if line.strip() and "Loading" not in line]


def test_a_redirected_run_and_generate_print_no_library_noise(tmp_path):
    # progress=true, but stderr is a pipe: no per-step bars; no torchvision or LoRA-key warnings either.
    train = _cli("train", *_tiny(tmp_path, "train.num_epochs=1", "logging.progress=true"))
    assert train.returncode == 0, train.stderr
    assert _own_lines(train.stderr) == [], train.stderr
    generate = _cli("generate", "--lora", str(tmp_path / "run"), "--prompt", "a cat", "-n", "2", "--seed", "7",
                    "--guidance", "1.5", "--out", str(tmp_path / "images"))
    assert generate.returncode == 0, generate.stderr
    assert _own_lines(generate.stderr) == [], generate.stderr
    # It says what it used: the checkpoint (the run's newest), the model it was trained on, the sampler and seeds.
    first, *paths = generate.stdout.splitlines()
    assert first == (f"ddpo generate: model tiny-random, LoRA {tmp_path / 'run' / 'checkpoints' / 'epoch_0001'}; "
                     f"4 steps (the checkpoint's), guidance 1.5 (--guidance), eta 1; seeds 7..8 per prompt -> "
                     f"{tmp_path / 'images'}/")
    assert paths == [str(tmp_path / "images" / f"p00_seed000{i}.png") for i in (7, 8)]


def test_a_redirected_generate_shows_no_model_loading_bars(tmp_path):
    # The shipped model loads through from_pretrained (diffusers' and transformers' loading bars); a pipe gets none.
    generate = _cli("generate", "--model", "shapes", "--prompt", "a red circle", "-n", "1", "--out", str(tmp_path))
    assert generate.returncode == 0, generate.stderr
    assert "Loading" not in generate.stderr and "it/s" not in generate.stderr, generate.stderr


def test_generate_help_states_the_shapes_sampler_it_uses():
    from ddpo.generate import _shapes_sampler

    assert _shapes_sampler() == (10, 2.0)  # the default preset's sampler, which shapes eval also uses
    result = _cli("generate", "--help")
    text = " ".join(result.stdout.split())
    assert "without --lora 10 for shapes" in text and "without --lora 2 for shapes, else 5" in text


def test_shapes_eval_json_is_strict_json_with_null_for_no_pairs(tmp_path, capsys):
    from ddpo.shapes.cli import main as shapes_main

    out = tmp_path / "eval.json"
    assert shapes_main(["eval", "--rare-only", "--per-pair", "1", "--steps", "2", "--json", str(out)]) == 0
    strict = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict["common_accuracy"] is None and 0 <= strict["rare_accuracy"] <= 1  # --rare-only: no common pairs
    assert len(strict["per_pair"]) == 6
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert printed["common_accuracy"] is None and "per_pair" not in printed


def _readme_config_rows():
    """(keys, code-default cells, `ddpo train` cells) of each row of the README's config reference table."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text[text.index("### Config reference"):text.index("## Inference")]
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        key_cell, default_cell, preset_cell = (cell.strip() for cell in line.strip().strip("|").split("|")[:3])
        keys = [k.strip().strip("`") for k in key_cell.split(",")]
        section = keys[0].split(".")[0] if "." in keys[0] else ""
        keys = [k if "." in k or not section else f"{section}.{k}" for k in keys]

        def cells(cell):
            return [c.strip().strip("`") for c in cell.split("`, `")] if cell else [None] * len(keys)

        yield keys, cells(default_cell), cells(preset_cell)


def _matches(cell: str, value) -> bool:
    """A README cell written as YAML (`3e-4`, `[to_q, to_k]`, `""`) against a config value."""
    import yaml

    if isinstance(value, str):  # text as written: `no` is mixed_precision "no", `""` the empty string
        return cell.strip('"') == value
    parsed = yaml.safe_load(cell)
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)  # YAML 1.1 reads 3e-4 as text
        except ValueError:
            pass
    return parsed == value


def test_readme_config_reference_matches_the_code_defaults_and_the_default_preset():
    from ddpo.config import Config

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and not key.endswith("kwargs"):  # kwargs, eval_kwargs: one value
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults, preset = dict(flat(Config().to_dict())), dict(flat(load_config().to_dict()))
    seen = []
    for keys, default_cells, preset_cells in _readme_config_rows():
        assert len(keys) == len(default_cells) == len(preset_cells), keys
        for key, default, ran in zip(keys, default_cells, preset_cells):
            seen.append(key)
            assert _matches(default, defaults[key]), (key, default, defaults[key])
            # An empty cell: the default preset keeps the code default.
            assert _matches(ran, preset[key]) if ran is not None else preset[key] == defaults[key], (key, ran)
    assert sorted(seen) == sorted(defaults)  # every key documented, once


def test_tensorboard_files_when_asked_and_a_warning_when_the_package_is_missing(tmp_path, capsys, caplog, monkeypatch):
    import ddpo.trainer

    assert train_main(_tiny(tmp_path, "train.num_epochs=1", "logging.tensorboard=true")) == 0
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'run'}" in capsys.readouterr().out
    assert len(list((tmp_path / "run" / "ddpo").glob("events.out.tfevents.*"))) == 1  # where the README says

    monkeypatch.setattr(ddpo.trainer, "_has_tensorboard", lambda: False)
    assert train_main(_tiny(tmp_path, "train.num_epochs=1", "logging.tensorboard=true", "logging.run_name=none")) == 0
    assert "TensorBoard: none (tensorboard is not installed)" in capsys.readouterr().out
    assert any("tensorboard is not installed: this run writes no TensorBoard files" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / "none" / "ddpo").exists()
