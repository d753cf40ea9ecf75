"""Nothing a browser sends may name code to import, a URL, an environment variable or a file (issue #17, part 1).

Every endpoint that takes reward options gets the attack payloads through gradio_client, against the app on
127.0.0.1 with a login; then: the marker file a `subprocess:Popen` captioner would create does not exist, a local
HTTP listener standing in for the attacker's server received no request (so no secret left the process), and a
module a `package.module:attr` reward name would import was not imported. Below: the allow-list itself, the
operator's --reward-config, and the rule that the app leaves loopback only behind a login.
"""

from __future__ import annotations

import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from localhost import free_port  # noqa: E402

SECRET_ENV, SECRET = "DDPO_TEST_SECRET", "s3cret-value-that-must-stay-here"
LOGIN = ("tester", "a-long-test-password")
PROBE = "ddpo_ui_probe_module"  # a module that writes a marker file when imported


class Listener:
    """A bounded HTTP server on 127.0.0.1 that records every request it gets and answers 404."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a half-sent request cannot hold the thread

            def do_POST(self):  # noqa: N802 - http.server's naming
                listener.requests.append((self.path, dict(self.headers)))
                self.send_error(404)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """(marker path of the import probe, marker path of the Popen payload); the probe module is importable."""
    folder = tmp_path_factory.mktemp("probe")
    imported = folder / "imported"
    (folder / f"{PROBE}.py").write_text(f"open({str(imported)!r}, 'w').close()\ndef reward(**kwargs): pass\n")
    sys.path.insert(0, str(folder))
    yield imported, folder / "popen-ran"
    sys.path.remove(str(folder))
    sys.modules.pop(PROBE, None)


@pytest.fixture(scope="module")
def app(tmp_path_factory, probe):
    """(client, demo, port): the app on tiny-random with a finished tiny run, launched as `ddpo app --auth-env`."""
    import app as launcher
    from ddpo.config import load_config
    from ddpo.trainer import train
    from ddpo.ui import build_app

    root = tmp_path_factory.mktemp("secure-app")
    runs = root / "runs"
    train(load_config("tiny_cpu", [f"logging.output_dir={runs}", "logging.run_name=tiny", "train.num_epochs=1"]))
    env = pytest.MonkeyPatch()
    env.setenv("GRADIO_TEMP_DIR", str(root / "gradio-tmp"))
    env.setenv(SECRET_ENV, SECRET)  # what an attacker would like the server to send out
    env.setenv("DDPO_TEST_LOGIN", ":".join(LOGIN))
    args = launcher.build_parser().parse_args(["--port", str(free_port()), "--runs-dir", str(runs), "--model",
                                               "tiny-random", "--auth-env", "DDPO_TEST_LOGIN"])
    options = launcher.launch_options(args)
    assert options["auth"] == [LOGIN] and options["server_name"] == "127.0.0.1"
    demo = build_app(launcher.make_settings(args))
    demo.launch(**options, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{args.port}/", auth=LOGIN, verbose=False,
                    download_files=str(root / "downloads"))
    yield client, demo, args.port
    demo.training.stop()
    demo.close()
    env.undo()


def call(client, endpoint: str, names: list[str], weights: str, options: str, tmp_path: Path):
    """The endpoint with these reward inputs and otherwise valid, small inputs (1 image, 1 step)."""
    generation = ["typed prompt (n seeds)", "a cat", "simple_animals", "all", 1, 0, 1, 3.0]
    rewards = [names, weights, "none", options]
    if endpoint == "/compare":
        return client.predict("tiny-random", "(none: base model)", *generation, *rewards, api_name=endpoint)
    if endpoint == "/base_vs_finetuned":
        return client.predict("tiny-random", "tiny", *generation, *rewards, api_name=endpoint)
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "up.png")
    return client.predict([handle_file(str(tmp_path / "up.png"))], "a cat", *rewards, api_name=endpoint)


ENDPOINTS = ["/compare", "/score_uploads", "/base_vs_finetuned"]


def payloads(listener_url: str, marker: Path) -> dict[str, tuple[list[str], str, str, str]]:
    """name -> (ticked rewards, composed weights, reward options JSON, expected error)."""
    import json

    return {
        "popen captioner": (["vlm_bertscore"], "", json.dumps(
            {"vlm_bertscore": {"captioner": "subprocess:Popen", "captioner_kwargs": {"args": ["touch", str(marker)]}}}),
            r"captioner 'subprocess:Popen' is not offered.*shapes"),
        "openai captioner with a secret": (["vlm_bertscore"], "", json.dumps(
            {"vlm_bertscore": {"captioner": "openai", "captioner_kwargs": {"base_url": f"{listener_url}/v1",
                                                                           "api_key_env": SECRET_ENV}}}),
            r"captioner 'openai' is not offered"),
        "url in the kwargs of an offered captioner": (["vlm_bertscore"], "", json.dumps(
            {"vlm_bertscore": {"captioner": "shapes", "captioner_kwargs": {"base_url": listener_url,
                                                                           "api_key_env": SECRET_ENV}}}),
            r"vlm_bertscore.captioner_kwargs.base_url cannot be set from the browser"),
        "composed remote with a secret": (["jpeg_compressibility"], "remote: 1.0", json.dumps(
            {"remote": {"url": listener_url, "token_env": SECRET_ENV}}), r"reward 'remote' is not offered"),
        "import as an options key": (["jpeg_compressibility"], "", json.dumps({f"{PROBE}:reward": {}}),
                                     rf"reward '{PROBE}:reward' is not offered"),
        "import as a ticked reward": ([f"{PROBE}:reward"], "", "{}", "is not in the list of choices"),
        "import as a composed term": (["jpeg_compressibility"], f"{PROBE}.x: 1", "{}",
                                      rf"reward '{PROBE}.x' is not offered"),
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_no_endpoint_runs_code_or_sends_secrets(app, listener, probe, endpoint, tmp_path):
    client, _, _ = app
    imported, marker = probe
    for name, (names, weights, options, message) in payloads(listener.url, marker).items():
        with pytest.raises(AppError, match=message):
            call(client, endpoint, names, weights, options, tmp_path)
        assert not marker.exists(), f"{endpoint}, {name}: the Popen captioner ran"
        assert not imported.exists() and PROBE not in sys.modules, f"{endpoint}, {name}: the module was imported"
        assert listener.requests == [], f"{endpoint}, {name}: a request left the server: {listener.requests}"


def test_the_app_still_scores_with_offered_options(app, tmp_path):
    """The allow-list refuses the payloads above, not ordinary use: bounded options of an offered captioner."""
    client, _, _ = app
    options = '{"vlm_bertscore": {"captioner": "shapes", "captioner_kwargs": {"do_sample": true}}}'
    _, table, _, _, notes, _ = call(client, "/score_uploads", ["jpeg_compressibility"], "jpeg_compressibility: 2",
                                    options, tmp_path)
    assert table["headers"][3:] == ["jpeg_compressibility", "compose"]
    assert table["data"][0][4] == pytest.approx(2 * table["data"][0][3], abs=2e-4)


def test_the_api_needs_the_login(app):
    import requests

    _, _, port = app
    with pytest.raises(Exception, match="credentials were not provided"):
        Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(f"http://127.0.0.1:{port}/", auth=("tester", "wrong-password"), verbose=False, download_files=False)
    reply = requests.post(f"http://127.0.0.1:{port}/gradio_api/call/compare", json={"data": []}, timeout=10)
    assert reply.status_code == 401


def test_prompts_tab_takes_no_grammar_path(app, tmp_path, monkeypatch):
    from ddpo.ui.widgets import load_builtin_grammar
    from prompts import GRAMMAR_DIR, load_grammar

    client, _, _ = app
    for bad in ("/etc/passwd", str(GRAMMAR_DIR / "shapes.yaml"), "../grammars/shapes"):
        with pytest.raises(AppError, match="not in the list of choices|not a built-in grammar"):
            client.predict(bad, "all", 3, 0, api_name="/sample_prompts")
        with pytest.raises(Exception, match="not a built-in grammar"):
            load_builtin_grammar(bad)
    # a file in the working folder named like a built-in grammar is not read instead of it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").write_text("not: [a grammar\n")
    assert load_builtin_grammar("shapes").sample(3, 0) == load_grammar(GRAMMAR_DIR / "shapes.yaml").sample(3, 0)


# ---------------------------------------------------------------------------------------------- the allow-list


def test_allow_list_types_and_bounds():
    from ddpo.ui.reward_options import request_kwargs
    from ddpo.ui.settings import UIError

    ok = {"num_captions": 4.0, "metric": "f1", "expected": False, "question": "What colour is the shape?",
          "captioner": "shapes", "captioner_kwargs": {"do_sample": True, "temperature": 0.5, "seed": 3}}
    assert request_kwargs({}, "vlm_bertscore", ok) == {**ok, "num_captions": 4}
    assert request_kwargs({}, "aesthetic", {"batch_size": 64}) == {"batch_size": 64}
    for reward, options, message in [
        ("vlm_bertscore", {"num_captions": 0}, "whole number between 1 and 16"),
        ("vlm_bertscore", {"num_captions": 17}, "between 1 and 16"),
        ("vlm_bertscore", {"num_captions": 2.5}, "whole number"),
        ("vlm_bertscore", {"num_captions": True}, "whole number"),
        ("vlm_bertscore", {"num_captions": "4"}, "whole number"),
        ("vlm_bertscore", {"expected": 1}, "true or false"),
        ("vlm_bertscore", {"metric": "bleu"}, "one of precision, recall, f1"),
        ("vlm_bertscore", {"question": "x" * 301}, "at most 300 characters"),
        ("vlm_bertscore", {"question": "a\x00b"}, "a line of text"),
        ("vlm_bertscore", {"captioner_kwargs": {"temperature": float("inf")}, "captioner": "shapes"}, "between 0.01"),
        ("vlm_bertscore", {"captioner_kwargs": {"temperature": 1e9}, "captioner": "llava"}, "between 0.01 and 5"),
        ("aesthetic", {"batch_size": 65}, "between 1 and 64"),
    ]:
        with pytest.raises(UIError, match=message):
            request_kwargs({}, reward, options)


@pytest.mark.parametrize("reward, options, where", [
    ("vlm_bertscore", {"bertscore_model": "/models/x"}, "vlm_bertscore.bertscore_model"),
    ("vlm_bertscore", {"reference_template": "{prompt.__class__}"}, "vlm_bertscore.reference_template"),
    ("vlm_bertscore", {"device": "cuda"}, "vlm_bertscore.device"),
    ("vlm_bertscore", {"captioner": "shapes", "captioner_kwargs": {"path": "/etc/passwd"}},
     "vlm_bertscore.captioner_kwargs.path"),
    ("vlm_bertscore", {"captioner": "llava", "captioner_kwargs": {"model": "org/evil"}},
     "vlm_bertscore.captioner_kwargs.model"),
    ("vlm_bertscore#count", {"captioner_kwargs": {"device": "cuda"}}, "vlm_bertscore#count.captioner_kwargs.device"),
    ("vlm_bertscore", {"batch_size": 8}, "vlm_bertscore.batch_size"),  # one BERTScore model kept per value
    ("aesthetic", {"mlp_path": "/etc/passwd"}, "aesthetic.mlp_path"),
    ("jpeg_compressibility", {"quality": 10}, "jpeg_compressibility.quality"),
])
def test_unknown_options_are_refused_naming_what_is_allowed(reward, options, where):
    from ddpo.ui.reward_options import request_kwargs
    from ddpo.ui.settings import UIError

    with pytest.raises(UIError, match=rf"{re.escape(where)} cannot be set from the browser; .* takes "
                                      r"(no options|[a-z_, ]+) here \(imports, URLs"):
        request_kwargs({}, reward, options)


@pytest.mark.parametrize("term, message", [
    ("remote", "reward 'remote' is not offered"),
    ("compose", "reward 'compose' is not offered"),
    ("os:system", "reward 'os:system' is not offered; choose one of aesthetic"),
    ("rewards.jpeg:jpeg_compressibility", "is not offered"),
    ("vlm_bertscore#a b", "the label after '#'"),
    ("vlm_bertscore#../x", "the label after '#'"),
])
def test_only_offered_reward_names(term, message):
    from ddpo.ui.reward_options import request_kwargs
    from ddpo.ui.settings import UIError

    with pytest.raises(UIError, match=re.escape(message)):
        request_kwargs({}, term, {})


def test_reward_jobs_check_everything_before_any_reward_is_built():
    from ddpo.ui.reward_options import reward_jobs
    from ddpo.ui.settings import UIError

    jobs = reward_jobs({}, ["jpeg_compressibility"], '{"vlm_bertscore#b": {"metric": "f1", "captioner": "shapes"}}',
                       "vlm_bertscore#a: 1, vlm_bertscore#b: -0.5", "batch")
    assert jobs["jpeg_compressibility"] == ("jpeg_compressibility", {})
    assert jobs["compose"] == ("compose", {"terms": {"vlm_bertscore#a": 1.0, "vlm_bertscore#b": -0.5},
                                           "normalize": "batch",
                                           "kwargs": {"vlm_bertscore#b": {"metric": "f1", "captioner": "shapes"}}})
    for names, options, weights, normalize, message in [
        ([], "{}", "", "none", "tick at least one reward"),
        (["jpeg_compressibility"], "{}", "", "z", "normalise must be 'none' or 'batch'"),
        (["vlm_bertscore#a"], "{}", "", "none", "'name#label' is for composed terms"),
        (["jpeg_compressibility"], '{"remote": {}}', "", "none", "reward 'remote' is not offered"),
        (["jpeg_compressibility"], "{}", "remote: 1", "none", "reward 'remote' is not offered"),
    ]:
        with pytest.raises(UIError, match=re.escape(message)):
            reward_jobs({}, names, options, weights, normalize)


# ---------------------------------------------------------------------------------------------- the operator's config


OPERATOR_YAML = """
vlm_bertscore:
  captioner: openai
  captioner_kwargs: {base_url: "http://10.0.0.5:8000/v1", api_key_env: VLLM_KEY, max_tokens: 32}
  bertscore_model: /models/deberta
remote: {url: "http://127.0.0.1:8085", token_env: DDPO_REWARD_TOKEN}
"""


def test_reward_config_is_merged_and_the_browser_cannot_override_it(tmp_path):
    from ddpo.ui.reward_options import load_reward_config, offered_captioners, offered_rewards, request_kwargs, \
        reward_jobs
    from ddpo.ui.settings import UIError

    (tmp_path / "rewards.yaml").write_text(OPERATOR_YAML)
    op = load_reward_config(tmp_path / "rewards.yaml")
    assert "remote" in offered_rewards(op) and "remote" not in offered_rewards({})
    assert offered_captioners(op) == ["shapes", "llava", "blip", "blip2", "openai"]
    assert request_kwargs(op, "vlm_bertscore", {}) == op["vlm_bertscore"]
    # an allowed browser option merges into the operator's, key by key
    merged = request_kwargs(op, "vlm_bertscore", {"num_captions": 2, "captioner_kwargs": {"temperature": 0.3}})
    assert merged == {**op["vlm_bertscore"], "num_captions": 2,
                      "captioner_kwargs": {**op["vlm_bertscore"]["captioner_kwargs"], "temperature": 0.3}}
    # another captioner: the operator's captioner kwargs (written for its endpoint) are not carried over
    assert request_kwargs(op, "vlm_bertscore", {"captioner": "shapes"}) == \
        {"captioner": "shapes", "bertscore_model": "/models/deberta"}
    for options in ({"captioner_kwargs": {"base_url": "http://evil/v1"}}, {"captioner_kwargs": {"api_key_env": "X"}},
                    {"bertscore_model": "/tmp/x"}):
        with pytest.raises(UIError, match="cannot be set from the browser"):
            request_kwargs(op, "vlm_bertscore", options)
    # null would keep the operator's "openai" without its endpoint, i.e. with the default URL and key variable
    with pytest.raises(UIError, match="captioner None is not offered"):
        request_kwargs(op, "vlm_bertscore", {"captioner": None})
    with pytest.raises(UIError, match=r"remote.url cannot be set from the browser; remote takes no options"):
        request_kwargs(op, "remote", {"url": "http://evil"})
    jobs = reward_jobs(op, [], "{}", "remote: 1, jpeg_compressibility: 0.5", "none")
    assert jobs["compose"][1]["kwargs"] == {"remote": op["remote"]}


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a mapping of reward name -> options"),
    ("os:system: {}", "'os:system' is not a registered reward"),
    ("compose: {terms: {aesthetic: 1}}", "'compose' is not a registered reward"),
    ("aesthetic: 3", "aesthetic must map to a mapping of options"),
    ("aesthetic: {mlp_path: 2024-01-01}", "reward kwargs must be plain data"),
    ("vlm_bertscore: {captioner: [a]}", "captioner must be a captioner name"),
    ("remote: {url: [", "not valid YAML/JSON"),
])
def test_bad_reward_config_stops_the_launch(tmp_path, capsys, monkeypatch, text, message):
    import app as launcher
    import ddpo.ui

    monkeypatch.setattr(ddpo.ui, "build_app", lambda settings: pytest.fail("the app was built"))
    (tmp_path / "r.yaml").write_text(text)
    assert launcher.main(["--reward-config", str(tmp_path / "r.yaml")]) == 2
    assert message in capsys.readouterr().err
    assert launcher.main(["--reward-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_train_tab_uses_the_operators_reward_options_and_bounds(tmp_path):
    from ddpo.ui.settings import AppSettings, UIError
    from ddpo.ui.train_tab import field_overrides

    values = ["tiny-random", "remote", "simple_animals", "ddpo_is", 2, 1e-3, 4, 2]
    with pytest.raises(UIError, match="reward 'remote' is not one of"):
        field_overrides(AppSettings(runs_dir=tmp_path), values)
    operator = AppSettings(runs_dir=tmp_path, reward_config={"remote": {"url": "http://127.0.0.1:9", "token_env": "T"}})
    assert field_overrides(operator, values)[-1] == 'reward.kwargs={"url": "http://127.0.0.1:9", "token_env": "T"}'
    for i, bad, message in [(4, 0, "epochs"), (5, float("inf"), "learning rate"), (6, 1000, "denoising steps"),
                            (7, 65, "sample batch size"), (1, "os:system", "is not one of")]:
        with pytest.raises(UIError, match=message):
            field_overrides(operator, values[:i] + [bad] + values[i + 1:])


# ---------------------------------------------------------------------------------------------- host and login


def parse(*argv):
    import app as launcher

    return launcher.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_login(host, capsys):
    from app import launch_options

    options = launch_options(parse("--host", host), environ={})
    assert options["server_name"] == host and options["auth"] is None and options["share"] is False
    assert options["run_history"] is False and capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "::"], ["--host", "192.168.1.5"],
                                  ["--host", "gpu-box.example.org"], ["--share"]])
def test_beyond_loopback_needs_a_login(argv, tmp_path, capsys, monkeypatch):
    import app as launcher
    import ddpo.ui

    with pytest.raises(launcher.LaunchError, match=r"opens the app beyond this machine.*add --auth-file FILE .*"
                                                   r"or --auth-env VAR"):
        launcher.launch_options(parse(*argv), environ={})
    monkeypatch.setattr(ddpo.ui, "build_app", lambda settings: pytest.fail("the app was built"))
    assert launcher.main(argv) == 2 and "--auth-file" in capsys.readouterr().err
    (tmp_path / "logins").write_text("# who may log in\nalice:correct-horse\n\nbob:battery-staple\n")
    options = launcher.launch_options(parse(*argv, "--auth-file", str(tmp_path / "logins")), environ={})
    assert options["auth"] == [("alice", "correct-horse"), ("bob", "battery-staple")]
    assert "WARNING" in capsys.readouterr().err
    options = launcher.launch_options(parse(*argv, "--auth-env", "MY_LOGIN"), environ={"MY_LOGIN": "carol:pass-word"})
    assert options["auth"] == [("carol", "pass-word")]


@pytest.mark.parametrize("argv, environ, file_text, message", [
    (["--auth-env", "MY_LOGIN"], {}, None, "MY_LOGIN: that environment variable is not set"),
    (["--auth-env", "MY_LOGIN"], {"MY_LOGIN": "carol"}, None, "expected 'user:password'"),
    (["--auth-env", "MY_LOGIN"], {"MY_LOGIN": "carol:short"}, None, "at least 8 characters"),
    (["--auth-file", "{file}"], {}, "# nobody\n", "has no 'user:password' line"),
    (["--auth-file", "{file}"], {}, ":no-user-here\n", "line 1: expected 'user:password'"),
    (["--auth-file", "{file}-missing"], {}, "", "cannot read it"),
])
def test_bad_logins_are_refused(tmp_path, argv, environ, file_text, message):
    from app import LaunchError, launch_options

    if file_text is not None:
        (tmp_path / "logins").write_text(file_text)
    argv = [a.replace("{file}", str(tmp_path / "logins")) for a in argv]
    with pytest.raises(LaunchError, match=re.escape(message)):
        launch_options(parse("--host", "0.0.0.0", *argv), environ=environ)
