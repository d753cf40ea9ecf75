"""`ddpo serve-reward` under abuse (issue 17): pixel bombs, foreign formats, half-sent bodies, 200 concurrent
clients and a hung reward. One server process on 127.0.0.1 with small limits; its peak memory is read from /proc."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from rewards.serving import MPX, Limits

HANG_S = 2.0
SERVER_ARGS = ["--workers", "2", "--queue", "8", "--max-request-mb", "8", "--max-image-mpix", "16",
               "--max-request-mpix", "16", "--max-total-mpix", "32", "--read-timeout", "1", "--reward-timeout", "0.5"]
LIMITS = Limits(workers=2, queue=8, max_request_bytes=8 * 2**20, max_image_pixels=16 * MPX,
                max_request_pixels=16 * MPX, max_total_pixels=32 * MPX, read_timeout=1, reward_timeout=0.5)
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def sleepy(**_):
    """The prompt's length; on the prompt "hang" it sleeps HANG_S, past the server's --reward-timeout."""
    def reward(images, prompts, metadata):
        time.sleep(HANG_S if "hang" in prompts else 0.02)
        return np.array([len(p) for p in prompts], dtype=np.float32), {}
    return reward


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


SMALL = {"images": [b64(encoded(Image.new("RGB", (16, 16), "red")))], "prompts": ["ok"]}


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def fake_ghostscript(folder: Path) -> Path:
    """A `gs` that only leaves a marker file: PIL runs `gs` to decode EPS, so the marker shows whether it ran."""
    (folder / "bin").mkdir()
    marker = folder / "gs-ran"
    gs = folder / "bin" / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    return marker


class Server:
    def __init__(self, folder: Path):
        self.marker = fake_ghostscript(folder)
        tests = str(Path(__file__).parent)
        env = {**os.environ, "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}",
               "PYTHONPATH": os.pathsep.join([tests, str(Path(tests).parent), os.environ.get("PYTHONPATH", "")])}
        code = "import sys; from rewards.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))"
        self.log = open(folder / "server.log", "w")  # the server logs every request: never a pipe that can fill
        self.proc = subprocess.Popen([sys.executable, "-c", code, "--reward", "test_rewards_abuse:sleepy",
                                      "--port", "0", *SERVER_ARGS], stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        line = self.proc.stdout.readline()
        assert "on http://127.0.0.1:" in line, (line, (folder / "server.log").read_text()[-2000:])
        self.url = line.split(" on ")[1].split()[0]
        self.address = ("127.0.0.1", int(self.url.rsplit(":", 1)[1]))
        self.score(SMALL)  # warm: the first request imports what scoring needs
        self.baseline_kb = memory_kb(self.proc.pid)["VmRSS"]

    def score(self, payload: dict, timeout: float = 20) -> requests.Response:
        return requests.post(self.url + "/score", json=payload, timeout=timeout)

    def wait_healthy(self, within: float = 10) -> float:
        start = time.monotonic()
        while requests.get(self.url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() - start < within, "the server did not become healthy again"
            time.sleep(0.05)
        return time.monotonic() - start

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Server(tmp_path_factory.mktemp("abuse"))
    yield served
    served.close()


def test_pixel_bombs_are_refused_from_their_headers_and_memory_stays_in_budget(server):
    flat = b64(encoded(Image.new("RGB", (4096, 4096), (9, 9, 9))))  # 16 Mpx in a few tens of kB
    bomb = {"images": [flat] * 16, "prompts": ["x"] * 16}  # 268 Mpx: 805 MB once decoded
    assert len(json.dumps(bomb)) < 2 * 2**20
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: server.score(bomb), range(3)))
    for reply in replies:
        assert reply.status_code == 413 and "per request" in reply.json()["error"], reply.text
    wide = server.score({"images": [b64(encoded(Image.new("L", (4097, 4096))))], "prompts": ["x"]})
    assert wide.status_code == 413 and "4097x4096; the limit is 16777216 pixels" in wide.json()["error"]
    grown_mb = (memory_kb(server.proc.pid)["VmHWM"] - server.baseline_kb) / 1024
    assert grown_mb < 40, f"{grown_mb:.0f} MB: something was decoded (one 4096x4096 RGB image is 48 MB)"

    # Requests that fit one at a time share the process budget (32 Mpx: two such images): 200 or 503, never more.
    one = {"images": [flat], "prompts": ["x"]}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: server.score(one), range(4)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    peak_mb = (memory_kb(server.proc.pid)["VmHWM"] - server.baseline_kb) / 1024
    assert peak_mb < LIMITS.memory_budget() / 2**20, f"peak {peak_mb:.0f} MB above the stated budget"


def test_eps_and_other_formats_get_400_and_ghostscript_never_runs(server, tmp_path, monkeypatch, capsys):
    for data in (EPS, encoded(Image.new("RGB", (8, 8)), "GIF"), encoded(Image.new("RGB", (8, 8)), "TIFF"),
                 encoded(Image.new("RGB", (8, 8)), "BMP")):
        reply = server.score({"images": [b64(data)], "prompts": ["x"]})
        assert reply.status_code == 400 and "not a PNG, JPEG or WebP image" in reply.json()["error"]
    assert not server.marker.exists()
    truncated = encoded(Image.new("RGB", (64, 64), "red"))[:80]
    reply = server.score({"images": [b64(truncated)], "prompts": ["x"]})
    assert reply.status_code == 400 and "image 0 cannot be decoded" in reply.json()["error"]

    # The same file through `ddpo score`, with the fake gs on PATH; PIL itself would run it (the marker works).
    from PIL import EpsImagePlugin

    from rewards.cli import score_main

    marker = fake_ghostscript(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    (tmp_path / "page.eps").write_bytes(EPS)
    with pytest.raises(SystemExit) as exit_info:
        score_main(["--reward", "jpeg_compressibility", str(tmp_path / "page.eps")])
    assert exit_info.value.code == 2 and "it is not a PNG, JPEG or WebP image" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises((OSError, subprocess.CalledProcessError)), Image.open(tmp_path / "page.eps") as image:
        image.load()
    assert marker.exists()


def test_half_sent_bodies_are_dropped_and_the_server_keeps_answering(server):
    server.wait_healthy()
    clients = []
    for _ in range(50):
        sock = socket.create_connection(server.address, timeout=10)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"images\": [")
        clients.append(sock)
    start = time.monotonic()
    meanwhile = server.score(SMALL)  # 503 at once; or, if it found a place in the queue, 200 once they are dropped
    waited = time.monotonic() - start
    assert (meanwhile.status_code, waited < 1.0) == (503, True) or (meanwhile.status_code, waited < 3) == (200, True)
    for sock in clients:  # each is answered 503 or closed by the server, within the read timeout (1 s)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert received == b"" or received.startswith(b"HTTP/1.0 503"), received[:100]
        sock.close()
    assert time.monotonic() - start < LIMITS.read_timeout + 3
    assert server.score(SMALL).status_code == 200


def test_a_client_dripping_its_headers_is_cut_off_at_the_read_timeout(server):
    """A byte every 0.2 s never trips a per-read timeout; the whole request still has --read-timeout (1 s)."""
    server.wait_healthy()
    sock = socket.create_connection(server.address, timeout=5)
    sock.sendall(b"POST /score HTTP/1.1\r\n")
    start, closed = time.monotonic(), False
    while not closed and time.monotonic() - start < 5:
        try:
            sock.sendall(b"X")
            readable, _, _ = select.select([sock], [], [], 0.2)
            closed = bool(readable) and sock.recv(65536) == b""
        except OSError:  # reset by the server
            closed = True
    sock.close()
    assert closed and time.monotonic() - start < LIMITS.read_timeout + 1
    assert server.score(SMALL).status_code == 200


def test_200_concurrent_clients_get_200_or_503_never_a_reset(server):
    server.wait_healthy()

    def one(_):
        try:
            reply = server.score(SMALL, timeout=30)
        except requests.ConnectionError as err:
            return "reset", str(err)
        return reply.status_code, reply.headers.get("Retry-After")

    start = time.monotonic()
    with ThreadPoolExecutor(200) as pool:
        outcomes = list(pool.map(one, range(200)))
    statuses = [status for status, _ in outcomes]
    assert set(statuses) <= {200, 503}, [o for o in outcomes if o[0] not in (200, 503)][:3]
    assert statuses.count(503) > 0 and statuses.count(200) >= LIMITS.workers
    assert all(retry == str(LIMITS.retry_after) for status, retry in outcomes if status == 503)
    assert time.monotonic() - start < 20
    assert server.score(SMALL).status_code == 200


def test_a_hung_reward_answers_504_and_health_says_so_until_it_returns(server):
    server.wait_healthy()
    start = time.monotonic()
    hung = server.score({"images": SMALL["images"], "prompts": ["hang"]})
    assert hung.status_code == 504 and "did not return within --reward-timeout 0.5 s" in hung.json()["error"]
    assert time.monotonic() - start < HANG_S
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "stuck"
    refused = server.score(SMALL)
    assert refused.status_code == 503 and "has not returned" in refused.json()["error"]
    assert refused.headers["Retry-After"] == str(LIMITS.retry_after)
    server.wait_healthy()
    assert time.monotonic() - start >= HANG_S - 0.1
    assert server.score(SMALL).json()["scores"] == [2.0]
