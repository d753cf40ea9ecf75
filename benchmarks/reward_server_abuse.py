"""A bounded abuse run against `ddpo serve-reward` on 127.0.0.1: pixel bombs, large legitimate requests, an EPS
payload, half-sent bodies, 200 concurrent clients and a hung reward. Prints one row per case (statuses, connection
resets, latency, the server's peak memory from /proc) and writes them as JSON. Results: docs/rewards.md.

    python benchmarks/reward_server_abuse.py [--out benchmarks/results/reward_server_abuse.json]
    python benchmarks/reward_server_abuse.py --checkout /path/to/old/tree   # the same run against another version

The server runs with its default limits except --read-timeout 5 and --reward-timeout 2, so the run takes about a
minute; the served reward (`slow_reward` below) costs nothing but sleeps 20 ms per request, or HANG_S on "hang".
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

HANG_S = 6.0
NEW_FLAGS = ["--read-timeout", "5", "--reward-timeout", "2"]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


def slow_reward(**_):
    """The served reward: the prompt's length after 20 ms, or after HANG_S on the prompt "hang"."""
    def reward(images, prompts, metadata):
        time.sleep(HANG_S if "hang" in prompts else 0.02)
        return np.array([len(p) for p in prompts], dtype=np.float32), {}
    return reward


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def memory_mb(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


class ThreadPeak:
    """The most threads the server process had while the block ran (sampled every 20 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._done = pid, 0, threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            status = Path(f"/proc/{self.pid}/status").read_text()
            self.peak = max(self.peak, int(status.split("Threads:")[1].split()[0]))

    def __enter__(self) -> "ThreadPeak":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class Client:
    def __init__(self, url: str):
        self.url = url

    def post(self, payload: dict, timeout: float = 60) -> tuple[str, float]:
        """(status or 'reset' / 'timeout', seconds)."""
        start = time.monotonic()
        try:
            status = str(requests.post(self.url + "/score", json=payload, timeout=timeout).status_code)
        except requests.Timeout:
            status = "timeout"
        except requests.ConnectionError:
            status = "reset"
        return status, time.monotonic() - start

    def health(self) -> str:
        try:
            return str(requests.get(self.url + "/health", timeout=5).status_code)
        except requests.RequestException as err:
            return type(err).__name__


def counts(statuses: list[str]) -> str:
    return ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses)))


def concurrent(client: Client, payload: dict, n: int, timeout: float = 60) -> tuple[str, list[float]]:
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda _: client.post(payload, timeout), range(n)))
    return counts([s for s, _ in outcomes]), sorted(t for _, t in outcomes)


def half_sent(client: Client, address: tuple[str, int], n: int, wait: float) -> dict:
    sockets = []
    for _ in range(n):
        sock = socket.create_connection(address, timeout=wait)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"images\": [")
        sockets.append(sock)
    start = time.monotonic()
    during = client.post({"images": [png_b64(Image.new("RGB", (16, 16)))], "prompts": ["ok"]}, timeout=10)
    closed = 0
    for sock in sockets:
        sock.settimeout(max(0.1, start + wait - time.monotonic()))
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except OSError:
            pass
        sock.close()
    return {"during": during, "closed_by_server": closed, "seconds": time.monotonic() - start}


def run(checkout: Path, new: bool) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(checkout)])}
    code = "import sys; from rewards.cli import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--reward", "reward_server_abuse:slow_reward", "--port", "0",
                             *(NEW_FLAGS if new else [])], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=checkout)
    url = proc.stdout.readline().split(" on ")[1].split()[0]
    client, rows = Client(url), []
    small = {"images": [png_b64(Image.new("RGB", (16, 16), "red"))], "prompts": ["ok"]}
    client.post(small)
    base = memory_mb(proc.pid)["VmRSS"]

    def row(case: str, result: str, latency: list[float] | float | None = None, **extra) -> None:
        latency = [latency] if isinstance(latency, float) else latency
        mem = memory_mb(proc.pid)
        rows.append({"case": case, "result": result, **extra, "latency_s": None if not latency else {
            "p50": round(float(np.percentile(latency, 50)), 3), "max": round(max(latency), 3)},
            "peak_rss_growth_mb": round(mem["VmHWM"] - base, 1), "health": client.health()})
        print(json.dumps(rows[-1]), flush=True)

    try:
        flat = png_b64(Image.new("RGB", (4096, 4096), (9, 9, 9)))
        bomb = {"images": [flat] * 16, "prompts": ["x"] * 16}
        status, t = client.post(bomb)
        row("16 one-colour 4096x4096 PNGs, one request", status, t, body_mb=round(len(json.dumps(bomb)) / 2**20, 2))
        result, times = concurrent(client, bomb, 3)
        row("the same, 3 requests at once", result, times)
        result, times = concurrent(client, {"images": [flat] * 4, "prompts": ["x"] * 4}, 3)
        row("4 x 4096x4096 (64 Mpx, the per-request limit), 3 requests at once", result, times)
        status, t = client.post({"images": [base64.b64encode(EPS).decode()], "prompts": ["x"]})
        row("an EPS payload", status, t)
        with ThreadPeak(proc.pid) as threads:
            outcome = half_sent(client, proc_address(url), 50, wait=12)
        row("50 clients send half a body", f"during: {outcome['during'][0]}; server closed "
            f"{outcome['closed_by_server']}/50 in {outcome['seconds']:.1f} s", outcome["during"][1],
            peak_threads=threads.peak)
        with ThreadPeak(proc.pid) as threads:
            result, times = concurrent(client, small, 200)
        row("200 concurrent clients, one small image each", result, times, peak_threads=threads.peak)
        status, t = client.post({"images": small["images"], "prompts": ["hang"]}, timeout=HANG_S + 20)
        health, refused = client.health(), client.post(small)[0]
        start = time.monotonic()
        while client.health() != "200" and time.monotonic() - start < HANG_S + 5:
            time.sleep(0.1)
        row(f"a reward call that hangs {HANG_S:g} s", f"{status}; then /health {health}, /score {refused}; healthy "
            f"again after {time.monotonic() - start:.1f} s", t)
        row("afterwards, one small request", client.post(small)[0])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return rows


def proc_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the source tree whose server to run (default: this one)")
    parser.add_argument("--old", action="store_true", help="the server predates the limit flags: pass none")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = run(args.checkout, new=not args.old)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
