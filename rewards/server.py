"""Serve any reward over HTTP: JSON in, JSON out, images as base64 PNG. Never pickle (unpickling runs code).

    POST /score   {"images": [b64 PNG/JPEG/WebP, ...], "prompts": [...], "metadata": [{...}, ...]}
               -> {"scores": [float | null, ...], "info": {key: [...]}}      (null = NaN, see info["unscorable"])
    GET  /health -> {"status": "ok", "reward": NAME, "max_batch": N, "max_request_bytes": M, ...the other limits}

Errors reply {"error": message} with 400 (bad request, an image that is not PNG/JPEG/WebP or cannot be decoded),
401 (missing/wrong bearer token), 413 (body, batch or pixels above the limits), 500 (the reward raised),
503 with Retry-After (busy, the pixel budget is in use, or an earlier reward call is stuck) or 504 (the reward did
not return within --reward-timeout; /health answers 503 until it does). Binds 127.0.0.1 unless told otherwise.
One request is scored at a time (models are not thread-safe; the GPU is the bottleneck anyway). The limits and
how they are enforced: rewards/serving.py.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

import numpy as np

from rewards.images import ImageRefused, b64_bytes, decode_image, peek_image
from rewards.serving import MPX, BoundedHTTPServer, Limits, PixelBudget, RewardRunner, RewardStuck, RewardTimeout

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
    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def parse_request(body: bytes, max_batch: int) -> tuple[list, list[str], list[dict]]:
    """Request body -> (base64 image strings, prompts, metadata); RequestError(400/413) says what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
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
    return images, prompts, metadata


def open_images(encoded: list, limits: Limits) -> tuple[list, int]:
    """base64 strings -> (lazily opened images, their total pixel count): headers read, no pixel decoded yet.

    Drops each string from `encoded` once read, so the request's memory shrinks as its images are opened.
    """
    images, total = [], 0
    for i in range(len(encoded)):
        name = f"image {i}"
        try:
            image = peek_image(b64_bytes(encoded[i], name), name, limits.max_image_pixels)
        except ImageRefused as err:
            raise RequestError(413 if err.too_large else 400, f"{err}" + (
                " (--max-image-mpix)" if err.too_large else "")) from None
        encoded[i] = None
        images.append(image)
        total += image.width * image.height
        if total > limits.max_request_pixels:
            raise RequestError(413, f"the first {i + 1} images have {total} pixels, above this server's limit of "
                                    f"{limits.max_request_pixels} per request ({limits.max_request_pixels / MPX:g} "
                                    "Mpx, --max-request-mpix); send fewer or smaller images")
    return images, total


def decode_all(images: list) -> list:
    try:
        return [decode_image(image, f"image {i}") for i, image in enumerate(images)]
    except ImageRefused as err:
        raise RequestError(400, str(err)) from None


def make_server(reward: Any, name: str, host: str = "127.0.0.1", port: int = 8085, token: str | None = None,
                limits: Limits | None = None, **limit_overrides: Any) -> BoundedHTTPServer:
    """An HTTP server (not yet serving; call .serve_forever()) around a reward callable. port=0 picks a free port.

    `limits` (or Limits fields as keywords, e.g. max_batch=8, workers=2) bound it; see rewards/serving.py.
    """
    limits = Limits(**limit_overrides) if limits is None else limits
    runner = RewardRunner(reward, name, limits.reward_timeout)
    budget = PixelBudget(limits.max_total_pixels)
    handler = type("RewardHandler", (RewardHandler,), {
        "reward_name": name, "token": token, "limits": limits, "runner": runner, "budget": budget,
        "timeout": limits.read_timeout})
    return BoundedHTTPServer((host, port), handler, limits)


class RewardHandler(BaseHTTPRequestHandler):
    """One request. The class attributes are set per server by make_server."""

    reward_name: str
    token: str | None
    limits: Limits
    runner: RewardRunner
    budget: PixelBudget
    server: BoundedHTTPServer

    def _reply(self, status: int, payload: dict, retry_after: int | None = None) -> None:
        body = json.dumps(jsonable(payload), allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.token is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def _discard_body(self) -> None:
        """Read and drop a body we will not use (up to twice the body limit, within the read deadline), so the
        client reads our reply instead of a connection reset."""
        self.close_connection = True
        try:
            remaining = min(int(self.headers.get("Content-Length") or 0), 2 * self.limits.max_request_bytes + 2**20)
        except ValueError:
            return
        while remaining > 0:
            chunk = self.rfile.read(min(2**20, remaining))
            if not chunk:
                break
            remaining -= len(chunk)

    def do_GET(self) -> None:
        self.server.clear_deadline(self.connection)
        if self.path != "/health":
            return self._reply(404, {"error": f"no route GET {self.path}; use POST /score or GET /health"})
        if not self._authorized():
            return self._reply(401, {"error": "missing or wrong bearer token"})
        health = {"reward": self.reward_name, **self.limits.as_dict()}
        running = self.runner.stuck_for()
        if running is not None:
            return self._reply(503, {"status": "stuck", "error": self.runner.stuck_message(running), **health},
                               retry_after=self.limits.retry_after)
        self._reply(200, {"status": "ok", **health})

    def do_POST(self) -> None:
        if self.path != "/score":
            self._discard_body()
            return self._reply(404, {"error": f"no route POST {self.path}; use POST /score"})
        if not self._authorized():
            self._discard_body()
            return self._reply(401, {"error": "missing or wrong bearer token"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._reply(400, {"error": "missing or invalid Content-Length header"})
        if length > self.limits.max_request_bytes:
            # Drained in chunks and dropped (never held), so the client reads the 413 instead of a reset.
            self._discard_body()
            return self._reply(413, {"error": f"request of {length} bytes is above the limit of "
                                              f"{self.limits.max_request_bytes} bytes (--max-request-mb)"})
        body = self.rfile.read(length)
        self.server.clear_deadline(self.connection)
        if len(body) < length:  # the client hung up, or the read deadline shut the socket
            self.close_connection = True
            logger.warning("%s sent %d of %d body bytes; dropped", self.address_string(), len(body), length)
            return
        try:
            encoded, prompts, metadata = parse_request(body, self.limits.max_batch)
            del body  # the parsed strings replace it; each is dropped in turn as its image is opened
            payload = self._score(encoded, prompts, metadata)
        except RequestError as err:
            return self._reply(err.status, {"error": str(err)}, retry_after=err.retry_after)
        self._reply(200, payload)

    def _score(self, encoded: list, prompts: list[str], metadata: list[dict]) -> dict:
        lazy, pixels = open_images(encoded, self.limits)
        release = self.budget.reserve(pixels)
        if release is None:
            raise RequestError(503, f"the server's pixel budget ({self.limits.max_total_pixels} pixels, "
                                    "--max-total-mpix) is in use by other requests; retry shortly",
                               retry_after=self.limits.retry_after)
        try:
            images = decode_all(lazy)
        except RequestError:
            release()
            raise
        del lazy
        return self._run(images, prompts, metadata, release)

    def _run(self, images: list, prompts: list[str], metadata: list[dict], release: Callable[[], None]) -> dict:
        name, retry = self.reward_name, self.limits.retry_after
        try:
            scores, info = self.runner(images, prompts, metadata, release)
        except RewardStuck as err:
            raise RequestError(503, str(err), retry_after=retry) from None
        except RewardTimeout as err:
            logger.error("%s", err)
            raise RequestError(504, str(err)) from None
        except Exception as err:  # the reward's own failure: report it, keep serving
            logger.error("reward %r failed on prompts %s", name, prompts, exc_info=err)
            raise RequestError(500, f"reward {name!r} raised {type(err).__name__}: {err}") from None
        return {"scores": np.asarray(scores, dtype=np.float64).tolist(), "info": info}

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)
