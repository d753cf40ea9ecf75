"""The reward server (round trip, auth, limits, errors), the `remote` reward's retries, and the CLIs."""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from rewards import build_reward
from rewards.http import HTTPError
from rewards.server import make_server

from localhost import free_port

rng = np.random.default_rng(0)
IMAGES = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), Image.new("RGB", (20, 30), "white")]
PROMPTS = ["noise", "a white page"]
FAST = {"retries": 2, "backoff": 0.01}


BOOMS = []


def flaky_reward():
    """Raises on the prompt "boom", NaN on the prompt "nan", else the prompt's length."""
    def reward(images, prompts, metadata):
        if "boom" in prompts:
            BOOMS.append(prompts)
            raise RuntimeError("exploded")
        return np.array([np.nan if p == "nan" else len(p) for p in prompts]), {"meta": metadata}
    return reward


class Served:
    def __init__(self, reward_name: str, port: int = 0, **kwargs):
        self.server = make_server(build_reward(reward_name), reward_name, port=port, **kwargs)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_round_trip_matches_local_scores():
    local, local_info = build_reward("jpeg_incompressibility")(IMAGES, PROMPTS, None)
    with Served("jpeg_incompressibility") as served:
        assert served.server.server_address[0] == "127.0.0.1"
        remote, info = build_reward("remote", url=served.url, **FAST)(IMAGES, PROMPTS, None)
        health = requests.get(served.url + "/health", timeout=5).json()
    np.testing.assert_allclose(remote, local)  # PNG is lossless, so the JPEG sizes are identical
    assert info["jpeg_kb"] == pytest.approx(local_info["jpeg_kb"]) and health["reward"] == "jpeg_incompressibility"


def test_nan_metadata_and_reward_errors_cross_the_wire():
    with Served("test_rewards_server:flaky_reward") as served:
        remote = build_reward("remote", url=served.url, **FAST)
        scores, info = remote(IMAGES, ["abc", "nan"], [{"colour": "red"}, {"n": 2}])
        assert scores[0] == 3 and np.isnan(scores[1]) and "'nan'" in info["unscorable"][1]
        assert info["meta"] == [{"colour": "red"}, {"n": 2}]
        with pytest.raises(HTTPError, match="HTTP 500.*exploded"):
            remote(IMAGES, ["boom", "x"], None)
        assert len(BOOMS) == 1  # a reward's own error is not retried
        assert remote(IMAGES, ["ab", "c"], None)[0].tolist() == [2, 1]  # still serving


def test_bearer_token(monkeypatch):
    with Served("jpeg_compressibility", token="s3cret") as served:
        with pytest.raises(HTTPError, match="HTTP 401"):
            build_reward("remote", url=served.url, **FAST)(IMAGES, PROMPTS, None)
        monkeypatch.setenv("MY_TOKEN", "wrong")
        with pytest.raises(HTTPError, match="HTTP 401"):
            build_reward("remote", url=served.url, token_env="MY_TOKEN", **FAST)(IMAGES, PROMPTS, None)
        monkeypatch.setenv("MY_TOKEN", "s3cret")
        scores, _ = build_reward("remote", url=served.url, token_env="MY_TOKEN", **FAST)(IMAGES, PROMPTS, None)
        assert scores.shape == (2,)
        assert requests.get(served.url + "/health", timeout=5).status_code == 401


def test_size_batch_and_format_limits():
    with Served("jpeg_compressibility", max_request_bytes=2000, max_batch=2) as served:
        with pytest.raises(HTTPError, match="HTTP 413.*above the limit of 2000 bytes"):
            build_reward("remote", url=served.url, **FAST)(IMAGES, PROMPTS, None)  # the noise PNG is ~3 kB
        small = [Image.new("RGB", (8, 8))] * 3
        with pytest.raises(HTTPError, match="HTTP 413.*limit of 2"):
            build_reward("remote", url=served.url, **FAST)(small, ["a"] * 3, None)
        bad = requests.post(served.url + "/score", json={"images": ["not base64!"], "prompts": ["a"]}, timeout=5)
        assert bad.status_code == 400 and "base64" in bad.json()["error"]
        pickle_like = requests.post(served.url + "/score", data=b"\x80\x04\x95", timeout=5)
        assert pickle_like.status_code == 400 and "not JSON" in pickle_like.json()["error"]
        connection = http.client.HTTPConnection(served.url.removeprefix("http://"), timeout=5)
        connection.putrequest("POST", "/score")
        connection.putheader("Content-Length", "-5")  # would make a naive server read until the client hangs up
        connection.endheaders()
        negative = connection.getresponse()
        assert negative.status == 400 and "Content-Length" in json.loads(negative.read())["error"]
        connection.close()


def test_remote_fails_clearly_when_server_is_down():
    start = time.monotonic()
    with pytest.raises(HTTPError, match="failed after 3 attempts.*cannot connect"):
        build_reward("remote", url=f"http://127.0.0.1:{free_port()}", timeout=2, **FAST)(IMAGES, PROMPTS, None)
    assert time.monotonic() - start < 10  # a clear error, never a hang


def test_remote_survives_a_server_restart():
    port = free_port()
    holder = {}

    def start_late():
        time.sleep(0.3)
        holder["served"] = Served("jpeg_compressibility", port=port)

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        remote = build_reward("remote", url=f"http://127.0.0.1:{port}", retries=6, backoff=0.1)
        scores, _ = remote(IMAGES, PROMPTS, None)
    finally:
        thread.join()
        holder["served"].__exit__()
    assert scores.shape == (2,) and scores[0] < scores[1]


def test_serve_reward_cli_end_to_end():
    code = "import sys; from rewards.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--reward", "jpeg_incompressibility", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        scores, _ = build_reward("remote", url=url, **FAST)(IMAGES, PROMPTS, None)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    np.testing.assert_allclose(scores, build_reward("jpeg_incompressibility")(IMAGES, PROMPTS, None)[0])


def test_score_cli_prints_one_row_per_image(tmp_path, capsys):
    from rewards.cli import score_main

    paths = []
    for i, image in enumerate(IMAGES):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    kb = build_reward("jpeg_incompressibility")(IMAGES, PROMPTS, None)[0]
    assert score_main(["--reward", "jpeg_compressibility,jpeg_incompressibility", "--prompt", "x"] + paths) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["image", "jpeg_compressibility", "jpeg_incompressibility"]
    assert len(rows) == 2 and rows[0].split() == [paths[0], f"{-kb[0]:.4f}", f"{kb[0]:.4f}"]

    kwargs = json.dumps({"vlm_bertscore": {"captioner": "test_rewards_alignment:FakeCaptioner"}})
    assert score_main(["--reward", "vlm_bertscore", "--prompt", "a red square", "--kwargs", kwargs, "--json"]
                      + paths) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    from test_rewards_alignment import FakeCaptioner

    assert [line["vlm_bertscore:caption"] for line in lines] == FakeCaptioner().caption(IMAGES, "")
    assert [line["image"] for line in lines] == paths and all(0 <= line["vlm_bertscore"] <= 1 for line in lines)

    assert score_main(["--reward", "nope", paths[0]]) == 1
    assert "unknown reward 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score_main(["--reward", "jpeg_compressibility", str(tmp_path / "missing.png")])
    assert "cannot read image" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked from the header: 32 x 32 is above 0.0001 Mpx (104 pixels)
        score_main(["--reward", "jpeg_compressibility", "--max-image-mpix", "0.0001", paths[0]])
    assert "it is 32x32; the limit is 104 pixels" in capsys.readouterr().err


def _odd_images() -> dict[str, Image.Image]:
    """Images whose conversion to RGB is a choice: alpha, 16 bits, a transparent palette entry, grayscale."""
    rgba = np.concatenate([rng.integers(0, 256, (24, 24, 3)), np.tile(np.linspace(0, 255, 24), (24, 1))[..., None]],
                          axis=-1).astype(np.uint8)
    palette = Image.fromarray(rng.integers(0, 4, (24, 24), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return {"rgba": Image.fromarray(rgba, "RGBA"),
            "sixteen": Image.fromarray((np.outer(np.arange(24), np.arange(24)) * 113).astype(np.uint16)),
            "palette": palette, "gray": Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8), "L"),
            "gray_alpha": Image.fromarray(rgba[..., 2:], "LA")}


def test_every_entry_point_converts_images_the_same_way(tmp_path, capsys):
    """The Python API, `ddpo score`, the reward server and the app's uploads give one score per picture."""
    from rewards.cli import score_main

    paths = []
    for name, image in _odd_images().items():
        paths.append(str(tmp_path / f"{name}.png"))
        image.save(paths[-1], transparency=0) if name == "palette" else image.save(paths[-1])
    reward, prompts = build_reward("jpeg_incompressibility"), ["x"] * len(paths)
    opened = [Image.open(p) for p in paths]
    assert [im.mode for im in opened] == ["RGBA", "I;16", "P", "L", "LA"]
    api, _ = reward(opened, prompts, None)

    assert score_main(["--reward", "jpeg_incompressibility", "--json"] + paths) == 0
    cli = [json.loads(line)["jpeg_incompressibility"] for line in capsys.readouterr().out.splitlines()]
    with Served("jpeg_incompressibility") as served:
        payload = {"images": [base64.b64encode(open(p, "rb").read()).decode() for p in paths], "prompts": prompts}
        server = requests.post(served.url + "/score", json=payload, timeout=10).json()["scores"]
    np.testing.assert_allclose(cli, api, rtol=1e-6)
    np.testing.assert_allclose(server, api, rtol=1e-6)
    if importlib.util.find_spec("gradio") is not None:  # the app's upload path, when the app extra is installed
        from ddpo.ui.compare_tab import load_uploads

        np.testing.assert_allclose(reward(load_uploads(paths, 10), prompts, None)[0], api, rtol=1e-6)
    # What `ddpo score` did before: PIL's convert("RGB") drops alpha and clips 16-bit values at 255.
    dropped, _ = reward([Image.open(p).convert("RGB") for p in paths[:2]], prompts[:2], None)
    assert not np.isclose(dropped, api[:2], rtol=1e-3).any()


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "argument --max-batch: must be above 0"),
    (["--max-request-mb", "-1"], "argument --max-request-mb: must be above 0"),
    (["--max-request-mb", "nan"], "argument --max-request-mb: must be above 0 and finite"),
    (["--read-timeout", "inf"], "argument --read-timeout: must be above 0 and finite"),
    (["--workers", "0"], "argument --workers: must be above 0"),
    (["--port", "70000"], "argument --port: must be 0-65535"),
    (["--port", "http"], "argument --port: expected an integer port"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' cannot be resolved"),
    (["--max-request-mpix", "200"], "--max-request-mpix (200) is above --max-total-mpix (128)"),
    (["--reward", "nope"], "--reward 'nope': unknown reward 'nope'; valid rewards: aesthetic"),
    (["--reward", "rewards.jpeg:nope"], "--reward 'rewards.jpeg:nope': module 'rewards.jpeg' has no attribute"),
    (["--kwargs", '{"quality": 3}'], "--reward 'jpeg_compressibility': "),
])
def test_serve_reward_refuses_bad_arguments_in_one_line(args, message, capsys):
    from rewards.cli import serve_main

    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--reward", "jpeg_compressibility", "--port", "0"] + args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("ddpo serve-reward: error: ") and message in error, error


def test_serve_reward_says_when_the_port_is_taken(capsys):
    from rewards.cli import serve_main
    from rewards.serving import Limits

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit_info:
            serve_main(["--reward", "jpeg_compressibility", "--port", str(taken.getsockname()[1])])
    assert exit_info.value.code == 2 and "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-batch must be a finite number above 0"):
        make_server(build_reward("jpeg_compressibility"), "jpeg_compressibility", port=0, max_batch=0)
    assert Limits().memory_budget() < 2 * 2**30  # the help's figure for the defaults
