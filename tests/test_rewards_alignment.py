"""BERTScore with the shipped MiniLM, vlm_bertscore with a fake captioner, and the OpenAI-compatible client."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from rewards import build_reward
from rewards.alignment import default_bertscore_model, get_bertscorer
from rewards.http import HTTPError

RED, BLUE = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))


class FakeCaptioner:
    """Describes a pure-colour image by its colour; cannot score prompts that mention "unicorn";
    returns "" for the first `empty_first` answers (like LLaVA-7B sometimes does)."""

    def __init__(self, empty_first: int = 0, device: str = "cpu"):
        self.empty_left, self.device, self.calls = empty_first, device, 0

    def caption(self, images, question):
        self.calls += 1
        answers = []
        for image in images:
            r, g, b = image.getpixel((0, 0))
            answers.append("" if self.empty_left > 0 else ("a red square" if r > b else "a blue square"))
            self.empty_left -= 1
        return answers

    def unscorable_reason(self, prompt):
        return "the fake captioner has no word for unicorns" if "unicorn" in prompt else None


def test_minilm_bertscore_ranks_paraphrase_above_unrelated():
    scorer = get_bertscorer(default_bertscore_model(), 6, "cpu")
    p, r, f = scorer.score(["a dolphin on a bicycle", "a bowl of soup"], ["a dolphin riding a bike"] * 2)
    for metric in (p, r, f):
        assert metric[0] > metric[1] + 0.3
    assert 0.7 < float(r[0]) < 1.0 and float(r[1]) < 0.4  # measured 0.86 and 0.15


def test_vlm_bertscore_scores_matching_captions_higher():
    reward = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner", metric="f1")
    scores, info = reward([RED, BLUE], ["a red square", "a red square"], [{}, {}])
    assert info["captions"] == ["a red square", "a blue square"]
    assert scores[0] > 0.99 and scores[0] > scores[1]
    np.testing.assert_allclose(scores, info["bertscore_f1"])
    assert info["unscorable"] == [None, None] and info["caption_failed"] == [False, False]
    assert reward.fn.captioner.device == "cpu"  # device reached the captioner


def test_vlm_bertscore_unscorable_prompt_is_nan_with_reason():
    reward = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner")
    scores, info = reward([RED, BLUE], ["a red square", "a blue unicorn"], None)
    assert np.isfinite(scores[0]) and np.isnan(scores[1])
    assert "unicorn" in info["unscorable"][1] and info["captions"][1] == ""


def test_empty_captions_are_retried_then_scored_zero(caplog):
    retried = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner",
                           captioner_kwargs={"empty_first": 2}, caption_retries=1)
    scores, info = retried([RED, BLUE], ["a red square", "a blue square"], None)
    assert info["captions"] == ["a red square", "a blue square"] and retried.fn.captioner.calls == 2
    assert scores.min() > 0.9
    failing = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner",
                           captioner_kwargs={"empty_first": 5}, caption_retries=2)
    scores, info = failing([RED], ["a lonely red square"], None)
    assert scores.tolist() == [0.0] and info["caption_failed"] == [True]
    assert "a lonely red square" in caplog.text


def test_reference_template_uses_metadata_and_names_missing_keys():
    reward = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner",
                          reference_template="a {colour} square")
    _, info = reward([RED], ["anything"], [{"colour": "red"}])
    assert info["references"] == ["a red square"] and info["bertscore_recall"][0] > 0.99
    with pytest.raises(ValueError, match="'colour'"):
        reward([RED], ["anything"], [{}])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="recall"):
        build_reward("vlm_bertscore", metric="accuracy")
    with pytest.raises(ValueError, match="unknown captioner backend 'llama'"):
        build_reward("vlm_bertscore", captioner="llama")([RED], ["x"], None)
    with pytest.raises(ValueError, match="leave num_layers unset"):
        build_reward("vlm_bertscore", num_layers=12)
    own_model = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner",
                             bertscore_model="/models/my-bert")
    with pytest.raises(ValueError, match="pass num_layers=N"):
        own_model([RED], ["a red square"], None)


class _ChatServer:
    """A local OpenAI-compatible /v1/chat/completions that answers with the image's colour.
    The first `fail_first` requests get HTTP 503 (a server that is starting)."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0):
        self.requests, self.fail_left, self.lock = [], fail_first, threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, self.headers.get("Authorization"), body))
                    fail = outer.fail_left > 0
                    outer.fail_left -= 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(delay)
                with outer.lock:
                    outer.in_flight -= 1
                if fail:
                    self.send_response(503)
                    self.end_headers()
                    return
                content = body["messages"][0]["content"]
                url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                r, g, b = image.convert("RGB").getpixel((0, 0))
                answer = "a red square" if r > b else "a blue square"
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_openai_captioner_against_local_server(monkeypatch):
    from rewards.captioners import build_captioner

    monkeypatch.setenv("TEST_VLM_KEY", "sekrit")
    chat = _ChatServer(fail_first=2)
    try:
        captioner = build_captioner("openai", base_url=chat.url, model="tiny-vlm", api_key_env="TEST_VLM_KEY",
                                    concurrency=1, backoff=0.01)
        answers = captioner.caption([RED, BLUE, RED], "What colour is this?")
    finally:
        chat.close()
    assert answers == ["a red square", "a blue square", "a red square"]
    assert len(chat.requests) == 5  # 2 refused with 503 and retried, then 3 answered
    path, auth, body = chat.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sekrit" and body["model"] == "tiny-vlm"
    assert {"type": "text", "text": "What colour is this?"} in body["messages"][0]["content"]


def test_openai_captioner_sends_concurrent_requests_and_keeps_order():
    from rewards.captioners import build_captioner

    chat = _ChatServer(delay=0.2)
    try:
        answers = build_captioner("openai", base_url=chat.url, concurrency=4).caption([RED, BLUE] * 4, "colour?")
    finally:
        chat.close()
    assert answers == ["a red square", "a blue square"] * 4
    assert chat.max_in_flight == 4  # the server sees up to `concurrency` requests at once, and can batch them


def test_openai_captioner_gives_up_with_a_clear_error():
    from rewards.captioners import build_captioner

    chat = _ChatServer(fail_first=100)
    try:
        captioner = build_captioner("openai", base_url=chat.url, retries=2, backoff=0.01)
        with pytest.raises(HTTPError, match="failed after 3 attempts; last error: HTTP 503"):
            captioner.caption([RED], "What is this?")
    finally:
        chat.close()
    assert len(chat.requests) == 3


def test_vlm_bertscore_through_openai_backend():
    chat = _ChatServer()
    try:
        reward = build_reward("vlm_bertscore", captioner="openai", captioner_kwargs={"base_url": chat.url})
        scores, info = reward([RED, BLUE], ["a blue square"] * 2, None)
    finally:
        chat.close()
    assert info["captions"] == ["a red square", "a blue square"] and scores[1] > scores[0]


def test_shapes_backend_alias_resolves_to_the_shapes_captioner(tmp_path):
    captioner_module = pytest.importorskip("ddpo.shapes.captioner")
    captioner_module.CaptionerNet().save_pretrained(tmp_path / "captioner")  # random weights: any caption will do
    reward = build_reward("vlm_bertscore", captioner="shapes", captioner_kwargs={"path": str(tmp_path / "captioner")})
    scores, info = reward([RED, BLUE], ["a red circle on a blue background", "a dolphin riding a bike"], None)
    assert isinstance(reward.fn.captioner, captioner_module.ShapesCaptioner)
    assert np.isfinite(scores[0]) and info["captions"][0].endswith("background")
    assert np.isnan(scores[1]) and "dolphin" in info["unscorable"][1]


class CyclingCaptioner:
    """Answers "a red square" and "a blue square" in turn, whatever the image: a sampling VLM in miniature."""

    def __init__(self):
        self.count = 0

    def caption(self, images, question):
        answers = ["a red square" if (self.count + i) % 2 == 0 else "a blue square" for i in range(len(images))]
        self.count += len(images)
        return answers


def test_num_captions_averages_the_score_over_several_answers(monkeypatch):
    one = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner")
    right, _ = one([RED], ["a red square"], None)
    wrong, _ = one([BLUE], ["a red square"], None)
    scorer, scored_pairs = get_bertscorer(default_bertscore_model(), 6, "cpu"), []
    real_score = scorer.score
    monkeypatch.setattr(scorer, "score", lambda cands, refs: scored_pairs.append(len(cands)) or real_score(cands, refs))
    four = build_reward("vlm_bertscore", captioner="test_rewards_alignment:CyclingCaptioner", num_captions=4)
    scores, info = four([RED, BLUE], ["a red square", "a red square"], None)
    # each image got 2 right and 2 wrong answers: the mean of the two scores, for both images
    np.testing.assert_allclose(scores, [(right[0] + wrong[0]) / 2] * 2, rtol=1e-5)
    assert info["all_captions"][0] == ["a red square", "a blue square"] * 2 and info["captions"][0] == "a red square"
    assert scored_pairs == [2]  # 8 answers, 2 distinct (caption, reference) pairs: each scored once
    with pytest.raises(ValueError, match="num_captions=0"):
        build_reward("vlm_bertscore", captioner="shapes", num_captions=0)


class DistributionCaptioner(FakeCaptioner):
    """Reads a red image as "a red square" with probability 0.75 and "a blue square" with 0.25."""

    def caption_distribution(self, images, question):
        return [[("a red square", 0.75), ("a blue square", 0.25)] for _ in images]


def test_expected_score_weights_each_caption_by_its_probability():
    one = build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner")
    right, _ = one([RED], ["a red square"], None)
    wrong, _ = one([BLUE], ["a red square"], None)
    expected = build_reward("vlm_bertscore", captioner="test_rewards_alignment:DistributionCaptioner", expected=True)
    scores, info = expected([RED, RED], ["a red square", "a unicorn"], None)
    np.testing.assert_allclose(scores[0], 0.75 * right[0] + 0.25 * wrong[0], rtol=1e-5)
    assert np.isnan(scores[1]) and info["captions"][0] == "a red square"
    assert info["all_captions"][0] == ["a red square", "a blue square"]
    with pytest.raises(ValueError, match="caption_distribution"):  # refused at construction, before any model loads
        build_reward("vlm_bertscore", captioner="test_rewards_alignment:FakeCaptioner", expected=True)
    with pytest.raises(ValueError, match="'llava' has not"):
        build_reward("vlm_bertscore", captioner="llava", expected=True)
    with pytest.raises(ValueError, match="num_captions"):
        build_reward("vlm_bertscore", captioner="shapes", expected=True, num_captions=4)
