"""The Train tab's readers: metrics with non-finite values, progress and ETA, plain status words, a cleaned log tail,
curve series and smoothing, and the HTML of the paired and score views (no server, no browser)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from PIL import Image

from ddpo.ui import cards, curves
from ddpo.ui.training import LOG_FILE, _failed_before_first_epoch, clean_log, error_line, log_tail, metrics_table, \
    mmss, progress_of, read_metrics, run_status


def write_run(run, epochs, planned=4, extra=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"train:\n  num_epochs: {planned}\n")
    rows = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05, "loss": 1.0 / e, "epoch_s": 2.0 + e,
             **(extra or {})} for e in epochs]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_nonfinite_strings_are_read_as_floats_and_shown_as_words(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "reward_mean": "nan", "loss": "inf", "approx_kl": null}\n'
                                            '{"epoch": 2, "reward_mean": 0.5, "loss": "-inf", "approx_kl": 0.1}\n')
    rows = read_metrics(tmp_path)
    assert np.isnan(rows[0]["reward_mean"]) and rows[0]["loss"] == np.inf and rows[1]["loss"] == -np.inf
    headers, table = metrics_table(rows)
    assert headers == ["epoch", "reward_mean", "loss", "approx_kl"]
    assert table == [[1, "nan", "inf", None], [2, 0.5, "-inf", 0.1]]
    # a curve skips the non-finite points instead of drawing nothing
    assert curves.series(rows, "reward_mean") == ([2], [0.5])
    assert curves.series(rows, "approx_kl") == ([2], [0.1])


def test_progress_eta_and_status_words(tmp_path):
    run = tmp_path / "r"
    write_run(run, [1, 2, 3], planned=10)
    done, total, eta = progress_of(run)
    assert (done, total) == (3, 10) and eta == pytest.approx((3 + 4 + 5) / 3 * 7)
    assert mmss(eta) == "00:28" and mmss(3725) == "1:02:05"
    assert run_status(run, None, running=True) == "**r**: epoch 3/10, ETA 00:28"
    assert run_status(run, -signal.SIGTERM, running=False, stopped_by_user=True) == "**r**: stopped by you after " \
                                                                                    "epoch 3/10"
    assert "terminated" in run_status(run, 143, running=False) and "signal" not in run_status(run, 143, False)
    assert "out of memory" in run_status(run, -signal.SIGKILL, running=False)
    (run / LOG_FILE).write_text("epoch 3/10 ...\nTraceback (most recent call last):\n  File x\n"
                                "ValueError: bad thing\nsome warning after\n")
    assert run_status(run, 1, running=False) == "**r**: failed after epoch 3/10: ValueError: bad thing"
    (run / LOG_FILE).write_text("ddpo train: CheckpointError: the checkpoint does not fit\n")
    assert error_line(run) == "ddpo train: CheckpointError: the checkpoint does not fit"
    empty = tmp_path / "e"
    write_run(empty, [], planned=2)
    assert "loading the model" in run_status(empty, None, running=True, started_at=0.0)
    assert run_status(run, None, running=False) == "**r**: 3/10 epochs logged"
    write_run(run, [1, 2], planned=2)
    assert run_status(run, 0, running=False) == "**r**: finished, 2/2 epochs"


def test_log_tail_strips_terminal_codes_and_keeps_the_newest_lines(tmp_path):
    raw = ("\x1b[33mwarning\x1b[0m: slow\n" + "".join(f"line {i}\n" for i in range(50)) +
           "sampling:  10%|#         | 1/10\rsampling:  50%|#####     | 5/10\rsampling: 100%|##########| 10/10\r\n"
           "\x1b]0;title\x07\x1b[2K\x1b[Adone: runs/x\n")
    assert clean_log(raw).splitlines()[0] == "warning: slow"
    (tmp_path / LOG_FILE).write_bytes(raw.encode())
    tail = log_tail(tmp_path, lines=3).splitlines()
    assert tail == ["line 49", "sampling: 100%|##########| 10/10", "done: runs/x"]


def test_a_run_that_failed_before_its_first_epoch_frees_its_name(tmp_path):
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / LOG_FILE).write_text("ddpo train: FileNotFoundError: model not found\n")
    (failed / "config.yaml").write_text("seed: 0\n")
    assert _failed_before_first_epoch(failed)
    (failed / "notes.txt").write_text("mine")  # a file the app did not write: keep the folder
    assert not _failed_before_first_epoch(failed)
    trained = tmp_path / "trained"
    write_run(trained, [1])
    (trained / LOG_FILE).write_text("epoch 1/4\n")
    assert not _failed_before_first_epoch(trained)
    outside = tmp_path / "cli"  # made by `ddpo train`, not the app: never reused
    outside.mkdir()
    (outside / "config.yaml").write_text("seed: 0\n")
    assert not _failed_before_first_epoch(outside)


def test_smoothing_is_a_debiased_moving_average():
    assert curves.smooth([1.0, 2.0, 3.0], 0) == [1.0, 2.0, 3.0]
    smoothed = curves.smooth([1.0, 3.0], 0.5)
    assert smoothed[0] == pytest.approx(1.0) and smoothed[1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def _line_pixels(fig) -> int:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    arr = np.asarray(Image.open(buf).convert("RGB")).astype(int)
    blue = np.array([0x1F, 0x77, 0xB4])
    return int((np.abs(arr - blue).sum(-1) < 40).sum())


def test_curves_figure_draws_every_run_and_only_panels_with_data(tmp_path):
    rows = {"a": [{"epoch": e, "reward_mean": e * 0.1, "reward_std": 0.01, "loss": 1.0} for e in (1, 2, 3)],
            "b": [{"epoch": e, "reward_mean": -e * 0.1, "loss": "nan"} for e in (1, 2)]}
    fig = curves.curves_figure(rows, smoothing=0.5)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["reward (mean ± std)", "loss"]
    reward_ax = fig.axes[0]
    assert [line.get_label() for line in reward_ax.get_lines() if not line.get_label().startswith("_")] == ["a", "b"]
    assert list(reward_ax.get_xticks()) == [int(t) for t in reward_ax.get_xticks()]  # whole epochs only
    assert _line_pixels(fig) > 200  # run a's line is drawn in its colour
    empty = curves.curves_figure({}, empty="pick a run")
    assert _line_pixels(empty) == 0 and empty.texts[0].get_text() == "pick a run"


def test_pairs_and_cards_show_every_score_escaped():
    img = Image.new("RGB", (16, 16), "red")
    base, tuned = {"r": np.array([1.0, 2.0])}, {"r": np.array([1.5, 1.0])}
    html = cards.pair_rows([img, img], [img, img], base, tuned, [7, 8], ["<b>cat</b>", "dog"])
    assert html.count("class='ddpo-pair'") == 2 and html.count("<img ") == 4
    assert "&lt;b&gt;cat&lt;/b&gt;" in html and "<b>cat</b>" not in html
    assert "+0.5000" in html and "-1.0000" in html and "#1a7f37" in html and "#cf222e" in html
    card = cards.score_cards([img], {"jpeg_incompressibility": np.array([np.nan])}, [3], ["p"])
    assert "jpeg_incompressibility</span> <b>n/a</b>" in card and "seed 3" in card


def test_gpu_only_presets_and_unavailable_rewards_are_said_before_start():
    import torch

    from ddpo.config import load_config
    from ddpo.ui.training import cannot_run_here

    assert cannot_run_here(load_config("tiny_cpu")) is None
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    problem = cannot_run_here(load_config("tiny_cpu", ["model.mixed_precision=fp16"]))
    assert problem.startswith("cannot run here:") and "mixed_precision=fp16 needs a GPU" in problem
    problem = cannot_run_here(load_config("tiny_cpu", ["reward.name=hpsv2"]))
    hpsv2_installed = __import__("importlib.util").util.find_spec("hpsv2") is not None
    assert hpsv2_installed or (problem and "reward hpsv2: reward 'hpsv2' needs the package" in problem)
