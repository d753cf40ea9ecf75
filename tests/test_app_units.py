"""The app's pieces without a server: pickers (what the browser may name), bounds, scoring tables, overrides."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from ddpo.ui.pickers import NO_CHECKPOINT, checkpoint_choices, list_runs, model_choices, resolve_checkpoint, \
    resolve_model, resolve_run
from ddpo.ui.reward_options import parse_options, parse_weights
from ddpo.ui.scoring import Scored, agreement_rows, caption_rows, spearman
from ddpo.ui.settings import AppSettings, UIError, check_float, check_int
from ddpo.ui.training import check_overrides, read_metrics


@pytest.fixture
def settings(tmp_path):
    runs = tmp_path / "runs"
    for name, epochs in (("run-a", [0, 1]), ("run-b", [])):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text("seed: 0\n")
        for e in epochs:
            (runs / name / "checkpoints" / f"epoch_{e:04d}").mkdir(parents=True)
    (runs / "not-a-run").mkdir()
    models = tmp_path / "models"
    (models / "sd").mkdir(parents=True)
    (models / "sd" / "model_index.json").write_text("{}")
    (models / "junk").mkdir()
    return AppSettings(runs_dir=runs, model_dirs=[models])


def test_checkpoint_picker_offers_only_runs_with_checkpoints(settings):
    assert checkpoint_choices(settings.runs_dir) == [NO_CHECKPOINT, "run-a", "run-a/epoch_0001", "run-a/epoch_0000"]
    assert resolve_checkpoint(settings, NO_CHECKPOINT) is None
    assert resolve_checkpoint(settings, "run-a") == str(settings.runs_dir / "run-a")
    assert resolve_checkpoint(settings, "run-a/epoch_0000") == str(settings.runs_dir / "run-a/checkpoints/epoch_0000")
    for bad in ("../runs/run-a", "run-a/../../x", "/etc/passwd", "run-b", "run-a/epoch_0009"):
        with pytest.raises(UIError, match="not in the runs folder"):
            resolve_checkpoint(settings, bad)


def test_run_picker(settings):
    assert sorted(p.name for p in list_runs(settings.runs_dir)) == ["run-a", "run-b"]
    assert resolve_run(settings, "run-b") == settings.runs_dir / "run-b"
    with pytest.raises(UIError, match="no run named"):
        resolve_run(settings, "../run-a")


def test_model_picker_allows_model_folders_and_hub_ids_only(settings, tmp_path):
    sd = str(tmp_path / "models" / "sd")
    from ddpo.ui.pickers import BUILTIN_MODELS, _shipped_flow_model

    assert model_choices(settings) == [*BUILTIN_MODELS, *_shipped_flow_model(), sd]
    assert {"tiny-random-sd3", "tiny-random-flux", "tiny-random-sdxl"} <= set(BUILTIN_MODELS)  # every family
    assert resolve_model(settings, sd) == sd
    assert resolve_model(settings, "org/model-1") == "org/model-1"
    for bad in (str(tmp_path / "models" / "junk"), "/etc", "../models/sd", "a/../b", str(tmp_path)):
        with pytest.raises(UIError, match="not one of the offered models"):
            resolve_model(settings, bad)
    no_hub = AppSettings(runs_dir=settings.runs_dir, allow_hub=False)
    with pytest.raises(UIError):
        resolve_model(no_hub, "org/model-1")


def test_numeric_bounds_are_checked_on_the_server():
    assert check_int("steps", 5.0, 1, 10) == 5
    for bad in (0, 11, 2.5, None):
        with pytest.raises(UIError, match="steps"):
            check_int("steps", bad, 1, 10)
    with pytest.raises(UIError, match="guidance"):
        check_float("guidance", 25.0, 1.0, 20.0)


def test_spearman_matches_scipy_with_ties_and_nans():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)
    a[3] = a[5]  # a tie
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    b[0] = np.nan  # NaN samples are left out of the pair
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a[1:], b[1:]).statistic)
    assert math.isnan(spearman(a[:2], b[:2])) and math.isnan(spearman(np.ones(5), a[:5]))


def test_agreement_and_caption_tables():
    scored = Scored({"x": np.array([1.0, 2, 3]), "y": np.array([3.0, 2, 1])},
                    {"x": {}, "y": {"captions": ["a", "b", "c"], "references": ["r1", "r2", "r3"]}}, {})
    headers, rows = agreement_rows(scored.scores)
    assert headers == ["reward", "x", "y"] and rows == [["x", 1.0, -1.0], ["y", -1.0, 1.0]]
    assert caption_rows(scored) == [[0, "y", "a", "r1"], [1, "y", "b", "r2"], [2, "y", "c", "r3"]]
    composed = Scored({"compose": np.zeros(1)}, {"compose": {"vlm_bertscore/captions": ["hi"],
                                                             "vlm_bertscore/references": ["ref"]}}, {})
    assert caption_rows(composed) == [[0, "compose/vlm_bertscore", "hi", "ref"]]


def test_parse_weights_and_reward_options():
    assert parse_weights("a: 1, b:-0.5\nc: 2e-1") == {"a": 1.0, "b": -0.5, "c": 0.2}
    assert parse_weights("  ") == {}
    for bad in ("a", "a: x", "a: nan"):
        with pytest.raises(UIError, match="name: weight"):
            parse_weights(bad)
    with pytest.raises(UIError, match="weights must lie within"):
        parse_weights("a: 1e9")
    with pytest.raises(UIError, match="the limit is 16"):
        parse_weights(", ".join(f"jpeg_compressibility#t{i}: 1" for i in range(17)))
    # parsed only: which names and options are allowed is checked by reward_jobs (test_app_security)
    assert parse_options('{"r": {"k": 1}}') == {"r": {"k": 1}}
    with pytest.raises(UIError, match="must map reward names"):
        parse_options('{"r": 1}')
    with pytest.raises(UIError, match="nested too deeply"):
        parse_options('{"r": {"k": ' + "[" * 3000 + "]" * 3000 + "}}")
    with pytest.raises(UIError, match="the limit is 10000"):
        parse_options('{"r": {"k": "' + "x" * 10_000 + '"}}')


def test_overrides_that_could_import_code_or_write_elsewhere_are_refused():
    assert check_overrides(["train.learning_rate=1e-4", "", "# note", "sample.num_steps=10"]) == \
        ["train.learning_rate=1e-4", "sample.num_steps=10"]
    for bad in ("reward.name=os:system", "reward.kwargs={}", "logging.output_dir=/tmp", "model.pretrained=/x",
                "prompts.grammar=/etc/passwd", "logging.wandb=true", "train.learning_rate"):
        with pytest.raises(UIError, match="not allowed"):
            check_overrides([bad])


def test_metrics_reader_skips_a_half_written_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "reward_mean": 1.5}\n{"epoch": 1, "reward_mean": 2.0, '
                                            '"eval_reward_mean": 3.0}\n{"epoch": 2, "rew')
    rows = read_metrics(tmp_path)
    # the old 0-based file is renumbered 1..N, as the log numbers epochs
    assert [(r["epoch"], r["reward_mean"]) for r in rows] == [(1, 1.5), (2, 2.0)] and rows[1]["eval_reward_mean"] == 3


def test_app_main_listens_on_localhost_without_share_or_analytics(monkeypatch):
    import app
    import ddpo.ui

    launched = {}

    class FakeDemo:
        class training:  # noqa: N801 - stands in for the TrainingManager attribute
            stopped = False

            @classmethod
            def stop(cls):
                cls.stopped = True

        def launch(self, **kwargs):
            launched.update(kwargs)

    def fake_build_app(settings):
        launched["settings"] = settings
        return FakeDemo()

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setattr(ddpo.ui, "build_app", fake_build_app)
    assert app.main(["--runs-dir", "my-runs", "--max-images", "3"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860 and launched["share"] is False
    assert launched["run_history"] is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert str(launched["settings"].runs_dir) == "my-runs" and launched["settings"].limits.max_images == 3
    assert FakeDemo.training.stopped  # a run started from the UI does not outlive it
    assert app.main(["--max-images", "0"]) == 2


def test_default_model_falls_back_to_tiny_random_with_a_notice(monkeypatch, tmp_path):
    from ddpo.ui import pickers

    monkeypatch.setattr(pickers, "shapes_available", lambda: (False, "ShapesWeightsError: manifest missing"))
    model, notice = pickers.default_model(AppSettings(runs_dir=tmp_path))
    assert model == "tiny-random" and "manifest missing" in notice
    monkeypatch.setattr(pickers, "shapes_available", lambda: (True, ""))
    assert pickers.default_model(AppSettings(runs_dir=tmp_path)) == ("shapes", "")
    assert pickers.default_model(AppSettings(runs_dir=tmp_path, default_model="tiny-random")) == ("tiny-random", "")
