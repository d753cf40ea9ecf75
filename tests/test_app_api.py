"""The app's API (what every button calls), driven with gradio_client against the app on a free localhost port.

Runs on the 'tiny-random' model; numbers are checked against the same functions called directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from localhost import launch_app  # noqa: E402

TINY_TRAIN = ["tiny_cpu", "tiny-random", "jpeg_compressibility", "simple_animals", "ddpo_is", 2, 1e-3, 4, 2]


class EchoCaptioner:
    """A stand-in VLM: answers with the colour of the image's first pixel, so captions are known in advance."""

    def caption(self, images, question):
        return [f"pixel {'bright' if np.asarray(im)[0, 0].mean() > 127 else 'dark'}" for im in images]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(client, settings, demo): the app on tiny-random, with one finished tiny run holding a checkpoint."""
    root = tmp_path_factory.mktemp("app")
    from ddpo.config import load_config
    from ddpo.trainer import train
    from ddpo.ui.settings import AppSettings

    runs = root / "runs"
    train(load_config("tiny_cpu", [f"logging.output_dir={runs}", "logging.run_name=tiny", "train.learning_rate=0.05"]))
    # the operator's --reward-config: a stand-in VLM (a "module:Class" captioner only an operator may name) and an
    # aesthetic reward whose CLIP folder does not exist (a reward that fails while the others score)
    settings = AppSettings(runs_dir=runs, default_model="tiny-random", reward_config={
        "vlm_bertscore": {"captioner": "test_app_api:EchoCaptioner"},
        "aesthetic": {"clip_model": str(root / "no-clip-here")}})
    demo, port, env = launch_app(settings, root)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(root / "downloads"))
    yield client, settings, demo
    demo.training.stop()
    demo.close()
    env.undo()


def compare(client, *, source="typed prompt (n seeds)", prompt="a cat", grammar="simple_animals", split="all", n=3,
            seed=5, steps=2, guidance=3.0, rewards=("jpeg_compressibility", "jpeg_incompressibility"), weights="",
            normalize="none", options="{}", model="tiny-random", ckpt="(none: base model)"):
    return client.predict(model, ckpt, source, prompt, grammar, split, n, seed, steps, guidance, list(rewards),
                          weights, normalize, options, api_name="/compare")


def direct_scores(prompts, seed, steps, guidance, reward, lora=None):
    from ddpo.generate import generate_images, load_for_inference
    from rewards import build_reward

    images = generate_images(load_for_inference("tiny-random", lora), prompts, seed=seed, num_steps=steps,
                             guidance_scale=guidance, eta=1.0)
    return build_reward(reward)(images, prompts, None)[0]


def column(table, name):
    return np.array([row[table["headers"].index(name)] for row in table["data"]], dtype=np.float64)


def test_compare_scores_agreement_and_composition(app):
    client, _, _ = app
    gallery, table, agreement, _, notes, cards = compare(client,
                                                         weights="jpeg_compressibility: 1, jpeg_incompressibility: 1")
    assert len(gallery) == 3 and all(Path(item["image"]).is_file() for item in gallery)
    assert "seed 5" in gallery[0]["caption"] and "jpeg_compressibility" in gallery[0]["caption"]
    assert table["headers"] == ["image", "seed", "prompt", "jpeg_compressibility", "jpeg_incompressibility", "compose"]
    assert column(table, "seed").tolist() == [5, 6, 7]
    # the app's scores are those of generate_images + build_reward called directly on the same seeds
    np.testing.assert_allclose(column(table, "jpeg_compressibility"),
                               direct_scores(["a cat"] * 3, 5, 2, 3.0, "jpeg_compressibility"), atol=1e-3)
    # compressibility = -incompressibility, so their unweighted composition is 0 and their ranks are reversed
    np.testing.assert_allclose(column(table, "compose"), 0.0, atol=1e-3)
    assert agreement["data"][0][0] == "jpeg_compressibility"
    assert agreement["data"][0][1] == pytest.approx(1.0)
    assert agreement["data"][0][2] == pytest.approx(-1.0)
    assert notes == ""
    # every score on a line of its own under its image, never cut
    first = f"{column(table, 'jpeg_incompressibility')[0]:.4f}"
    assert cards.count("class='ddpo-card'") == 3 and f"<b>{first}</b>" in cards and "seed 7" in cards


def test_compare_prompts_from_grammar(app):
    from prompts import load_grammar

    client, _, _ = app
    _, table, _, _, _, _ = compare(client, source="n prompts from a grammar", n=4, seed=2, split="train",
                                rewards=["jpeg_compressibility"])
    assert [row[2] for row in table["data"]] == [p.text for p in load_grammar("simple_animals").sample(4, 2, "train")]


@pytest.mark.parametrize("change, message", [
    # Gradio checks slider bounds itself; the handlers check again (see test_app_units) for other clients
    ({"n": 1000}, "greater than maximum value 16"),
    ({"steps": 0}, "less than minimum value 1"),
    ({"seed": -1}, "less than minimum value 0"),
    ({"model": "/etc"}, "is not one of the offered models"),
    ({"ckpt": "../../etc"}, "is not in the runs folder"),
    ({"rewards": [], "weights": ""}, "tick at least one reward"),
    ({"weights": "jpeg_compressibility: lots"}, "is not 'name: weight'"),
    ({"options": "{not json"}, "reward options are not valid JSON"),
    ({"options": '{"vlm_bertscore": {"captioner": "no_such_backend"}}'}, "captioner 'no_such_backend' is not offered"),
    ({"options": '{"aesthetic": {"clip_model": "/tmp"}}'}, "aesthetic.clip_model cannot be set from the browser"),
    ({"weights": "remote: 1"}, "reward 'remote' is not offered"),
])
def test_compare_rejects_bad_input_with_a_readable_message(app, change, message):
    client, _, _ = app
    with pytest.raises(AppError, match=message):
        compare(client, **change)


def test_one_failing_reward_does_not_hide_the_others(app):
    client, _, _ = app
    _, table, _, _, notes, _ = compare(client, n=1, rewards=["jpeg_compressibility", "aesthetic"])
    assert table["headers"][3:] == ["jpeg_compressibility"]
    assert "aesthetic" in notes and "no-clip-here" in notes


@pytest.mark.parametrize("options", ["{}", '{"vlm_bertscore": {"captioner": "test_app_api:EchoCaptioner"}}'])
def test_vlm_captions_are_shown(app, options):
    """The operator's captioner is the default, and the one captioner beyond the local ones a browser may pick."""
    client, _, _ = app
    _, table, _, captions, _, _ = compare(client, n=2, rewards=["vlm_bertscore"], options=options)
    assert [row[1] for row in captions["data"]] == ["vlm_bertscore", "vlm_bertscore"]
    assert all(row[2] in ("pixel bright", "pixel dark") for row in captions["data"])
    assert all(row[3] == "a cat" for row in captions["data"])  # the reference sentence BERTScore compared with
    assert all(0.0 <= s <= 1.0 for s in column(table, "vlm_bertscore"))


def test_score_uploaded_images(app, tmp_path):
    from PIL import Image

    from rewards import build_reward

    client, _, _ = app
    images = [Image.new("RGB", (32, 32), "white"), Image.effect_noise((32, 32), 100).convert("RGB")]
    files = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        files.append(handle_file(str(tmp_path / f"{i}.png")))
    gallery, table, _, _, _, _ = client.predict(files, "a square", ["jpeg_compressibility"], "", "none", "{}",
                                             api_name="/score_uploads")
    assert len(gallery) == 2 and [row[2] for row in table["data"]] == ["a square", "a square"]
    expected = build_reward("jpeg_compressibility")(images, ["a square"] * 2, None)[0]
    np.testing.assert_allclose(column(table, "jpeg_compressibility"), expected, atol=1e-3)
    assert expected[0] > expected[1]  # a flat image compresses better than noise


def test_base_vs_finetuned_deltas(app):
    client, settings, _ = app
    args = ["tiny-random", "tiny", "typed prompt (n seeds)", "a dog", "simple_animals", "all", 2, 11, 2, 3.0,
            ["jpeg_compressibility"], "", "none", "{}"]
    base, tuned, summary, table, pairs = client.predict(*args, api_name="/base_vs_finetuned")
    assert len(base) == len(tuned) == 2
    # the paired view: one row per seed, two images each, the seed and the delta of each reward
    assert pairs.count("class='ddpo-pair'") == 2 and pairs.count("<img ") == 4 and "seed 12" in pairs
    assert table["headers"][:4] == ["image", "seed", "jpeg_compressibility delta", "prompt"]
    b, t, d = (column(table, f"jpeg_compressibility {k}") for k in ("base", "finetuned", "delta"))
    np.testing.assert_allclose(b, direct_scores(["a dog"] * 2, 11, 2, 3.0, "jpeg_compressibility"), atol=1e-3)
    lora = str(settings.runs_dir / "tiny")
    np.testing.assert_allclose(t, direct_scores(["a dog"] * 2, 11, 2, 3.0, "jpeg_compressibility", lora), atol=1e-3)
    np.testing.assert_allclose(d, t - b, atol=2e-4)
    assert "| jpeg_compressibility |" in summary
    with pytest.raises(AppError, match="choose a finetuned checkpoint"):
        client.predict(*args[:1], "(none: base model)", *args[2:], api_name="/base_vs_finetuned")


def test_prompts_tab_samples_and_heldout(app):
    from prompts import load_grammar

    client, _, _ = app
    sampled = client.predict("shapes", "heldout", 5, 3, api_name="/sample_prompts")
    grammar = load_grammar("shapes")
    assert [row[0] for row in sampled["data"]] == [p.text for p in grammar.sample(5, 3, "heldout")]
    about, heldout = client.predict("shapes", api_name="/grammar_info")
    assert f"{grammar.count('heldout')} held out" in about
    assert len(heldout["data"]) == grammar.count("heldout")


def wait_for(client, run, done, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.predict(run, [], 0, api_name="/train_status")
        if done(status[0]):
            return status
        time.sleep(1.0)
    raise AssertionError(f"run {run} did not finish in {timeout} s; last status: {status[0]}; log:\n{status[3]}")


def test_train_start_watch_and_refuse_a_second_run(app):
    client, settings, demo = app
    status, watch = client.predict(*TINY_TRAIN[:1], "ui-run", *TINY_TRAIN[1:], "", api_name="/train_start")
    assert "ui-run" in status and watch["value"] == "ui-run"
    with pytest.raises(AppError, match="still training"):
        client.predict(*TINY_TRAIN[:1], "ui-run-2", *TINY_TRAIN[1:], "", api_name="/train_start")
    status, bar, plot, grid, log, table, runs, *_ = wait_for(client, "ui-run", lambda s: any(
        word in s for word in ("finished", "failed", "stopped")))
    assert "finished, 2/2 epochs" in status, log
    from ddpo.metrics import read_metrics

    metrics = read_metrics(settings.runs_dir / "ui-run" / "metrics.jsonl")
    # the table is metrics.jsonl, epochs numbered from 1 as in the log ("epoch 1/2")
    assert len(metrics) == 2 and table["headers"][:3] == ["epoch", "reward_mean", "reward_std"]
    assert [row[0] for row in table["data"]] == [1, 2] and "epoch 2/2" in log
    np.testing.assert_allclose([row[1] for row in table["data"]], [m["reward_mean"] for m in metrics], rtol=1e-3)
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/png;base64,")
    assert "max='2' value='2'" in bar
    assert grid is not None and Path(grid).is_file()
    assert "ui-run" in [row[0] for row in runs["data"]]
    with pytest.raises(AppError, match="already exists"):
        client.predict(*TINY_TRAIN[:1], "ui-run", *TINY_TRAIN[1:], "", api_name="/train_start")


def test_train_stop_and_blocked_overrides(app):
    client, settings, demo = app
    with pytest.raises(AppError, match="is not allowed here"):
        client.predict(*TINY_TRAIN[:1], "bad", *TINY_TRAIN[1:], "reward.name=os:system", api_name="/train_start")
    with pytest.raises(AppError, match="config error"):
        client.predict(*TINY_TRAIN[:1], "bad2", *TINY_TRAIN[1:], "train.clip_range=-1", api_name="/train_start")
    client.predict(*TINY_TRAIN[:1], "long", *TINY_TRAIN[1:], "train.num_epochs=100000", api_name="/train_start")
    process = demo.training.process
    assert "stopped" in client.predict(api_name="/train_stop")
    assert process.poll() is not None
    assert "stopped by you" in client.predict("long", [], 0, api_name="/train_status")[0]


@pytest.fixture(scope="module")
def steering_run(app):
    """A tiny `ddpo steer train` run on Pendulum-v1 in the app's runs folder (skips without the steering extra)."""
    steering = pytest.importorskip("ddpo.steering.cli")
    runs = app[1].runs_dir
    assert steering.main(["train", "--env", "Pendulum-v1", "--method", "dsrl_sac", "--steps", "200",
                          "--warm-start-steps", "100", "--eval-every", "1000", "--eval-episodes", "1",
                          "--checkpoint-every", "200", "--no-video", "--runs-dir", str(runs), "--name", "pend"]) == 0
    return runs / "pend"


def test_steering_base_against_steered(app, steering_run):
    from ddpo.steering.api import run_episodes

    client, settings, _ = app
    summary, table, gif, chart = client.predict("Pendulum-v1", "shipped", "pend", 2, 3, False, api_name="/steer")
    base, steered, _ = run_episodes("Pendulum-v1", None, str(steering_run), n=2, seed=3, render=False)
    assert [row[1] for row in table["data"]] == [3, 4]
    np.testing.assert_allclose(column(table, "base return"), base, atol=1e-3)
    np.testing.assert_allclose(column(table, "steered return"), steered, atol=1e-3)
    assert "Steered" in summary and gif["value"] is None
    assert gif["label"] == "First episode: base (left) | steered (right)"
    assert chart["type"] == "matplotlib"
    summary, table, gif, chart = client.predict("Pendulum-v1", "shipped", "(none: base policy only)", 1, 3, True,
                                         api_name="/steer")
    assert table["data"][0][3] is None and "Steered" not in summary and gif["label"] == "First episode: base policy"
    path = gif["value"]["path"] if isinstance(gif["value"], dict) else gif["value"]
    assert Path(path).is_file() and Path(path).read_bytes()[:3] == b"GIF"
    with pytest.raises(AppError, match="is not a Pendulum-v1 run"):
        client.predict("Pendulum-v1", "shipped", "../pend", 1, 0, False, api_name="/steer")
