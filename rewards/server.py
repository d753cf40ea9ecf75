"""Serve any reward over HTTP: JSON in, JSON out, images as base64 PNG. Never pickle (unpickling runs code).

    POST /score   {"images": [b64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}
               -> {"scores": [float | null, ...], "info": {key: [...]}}      (null = NaN, see info["unscorable"])
    GET  /health -> {"reward": NAME, "max_batch": N, "max_request_bytes": M}

Errors reply {"error": message} with 400 (bad request), 401 (missing/wrong bearer token), 413 (request or batch
too large) or 500 (the reward raised). Binds 127.0.0.1 unless told otherwise. One request is scored at a time
(models are not thread-safe; the GPU is the bottleneck anyway).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from rewards.images import decode_png

logger = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, max_batch: int) -> tuple[list, list[str], list[dict]]:
    """Request body -> (PIL images, prompts, metadata); RequestError(400/413) says what is wrong."""
    try:
        request = json.loads(body)
    except ValueError as err:
        raise RequestError(400, f"request body is not JSON: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list):
        raise RequestError(400, 'request must be {"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]}')
    images, prompts = request["images"], request.get("prompts")
    metadata = request.get("metadata") or [{} for _ in images]
    if len(images) > max_batch:
        raise RequestError(413, f"batch of {len(images)} images is above this server's limit of {max_batch}; "
                                "send smaller batches or restart the server with a larger --max-batch")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(images):
        raise RequestError(400, f"'prompts' must be a list of {len(images)} strings, one per image")
    if not isinstance(metadata, list) or len(metadata) != len(images) or not all(isinstance(m, dict) for m in metadata):
        raise RequestError(400, f"'metadata' must be a list of {len(images)} objects, one per image")
    try:
        pil = [decode_png(data, i) for i, data in enumerate(images)]
    except (ValueError, TypeError) as err:
        raise RequestError(400, str(err)) from None
    return pil, prompts, metadata


def make_server(reward: Any, name: str, host: str = "127.0.0.1", port: int = 8085, token: str | None = None,
                max_batch: int = 64, max_request_bytes: int = 64 * 2**20) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving; call .serve_forever()) around a reward callable. port=0 picks a free port."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(jsonable(payload), allow_nan=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if token is None:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._reply(404, {"error": f"no route GET {self.path}; use POST /score or GET /health"})
            if not self._authorized():
                return self._reply(401, {"error": "missing or wrong bearer token"})
            self._reply(200, {"reward": name, "max_batch": max_batch, "max_request_bytes": max_request_bytes})

        def do_POST(self) -> None:
            if self.path != "/score":
                return self._reply(404, {"error": f"no route POST {self.path}; use POST /score"})
            if not self._authorized():
                return self._reply(401, {"error": "missing or wrong bearer token"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                return self._reply(400, {"error": "missing or invalid Content-Length header"})
            if length > max_request_bytes:
                # The body is drained in chunks and dropped (never held in memory), so the client reads the 413
                # instead of a reset connection.
                self.close_connection = True
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(2**20, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                return self._reply(413, {"error": f"request of {length} bytes is above the limit of "
                                                  f"{max_request_bytes} bytes (--max-request-mb)"})
            try:
                images, prompts, metadata = parse_request(self.rfile.read(length), max_batch)
            except RequestError as err:
                return self._reply(err.status, {"error": str(err)})
            try:
                with lock:
                    scores, info = reward(images, prompts, metadata)
            except Exception as err:  # the reward's own failure: report it, keep serving
                logger.exception("reward %r failed on prompts %s", name, prompts)
                return self._reply(500, {"error": f"reward {name!r} raised {type(err).__name__}: {err}"})
            self._reply(200, {"scores": np.asarray(scores, dtype=np.float64).tolist(), "info": info})

        def log_message(self, format: str, *args: Any) -> None:
            logger.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer((host, port), Handler)
