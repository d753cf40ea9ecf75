"""POSTing JSON with timeouts and retries with exponential backoff (the OpenAI-compatible captioner, `remote`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import requests

logger = logging.getLogger(__name__)

# Worth retrying: the server is restarting, overloaded or rate-limiting. Other 4xx are the caller's bug, and a 500
# is the model failing on this input (the reward server's reply when a reward raises): retrying would repeat it.
RETRY_STATUS = {408, 425, 429, 502, 503, 504}


class HTTPError(RuntimeError):
    """A request failed for good: a non-retryable status, or the retry budget ran out."""


def post_json(url: str, payload: Any, *, headers: dict[str, str] | None = None, timeout: float = 60.0,
              retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0, what: str = "server") -> Any:
    """POST payload as JSON and return the decoded JSON reply.

    Tries 1 + retries times, sleeping backoff * 2**attempt (capped at max_backoff) between tries, on connection
    errors, timeouts and RETRY_STATUS; raises HTTPError naming the url and the last error after that.
    """
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            delay = min(backoff * 2 ** (attempt - 1), max_backoff)
            logger.warning("%s at %s: %s; retry %d/%d in %.1fs", what, url, last_error, attempt, retries, delay)
            time.sleep(delay)
        try:
            reply = requests.post(url, json=payload, headers=headers, timeout=timeout)
        except requests.Timeout:
            last_error = f"no reply within {timeout}s"
            continue
        except requests.ConnectionError as err:
            last_error = f"cannot connect ({type(err).__name__})"
            continue
        if reply.status_code in RETRY_STATUS:
            last_error = f"HTTP {reply.status_code}: {reply.text[:200]}"
            continue
        if reply.status_code != 200:
            raise HTTPError(f"{what} at {url} refused the request: HTTP {reply.status_code}: {reply.text[:500]}")
        try:
            return reply.json()
        except ValueError:
            raise HTTPError(f"{what} at {url} replied with non-JSON: {reply.text[:200]!r}") from None
    raise HTTPError(f"{what} at {url} failed after {retries + 1} attempts; last error: {last_error}. "
                    "Is it running and reachable?")
