"""Failing at once when a reward's Hugging Face weights are neither on disk nor downloadable.

Without this, `from_pretrained` on a machine without internet retries the hub for about 50 s before it fails. A
model name that is a local folder, or a hub name whose files are in the local cache, passes without any network
access; otherwise the hub is probed once per process (a few seconds at most) unless offline mode is on.
"""

from __future__ import annotations

import os
import threading

PROBE_TIMEOUT_S = 3.0
OFFLINE_REWARDS = ("rewards that need no download: jpeg_compressibility, jpeg_incompressibility, and "
                   "vlm_bertscore with the shipped Shapes captioner (captioner: shapes)")
_TRUE = {"1", "ON", "YES", "TRUE"}
_probe: dict[str, str | None] = {}  # hub endpoint -> why it is unreachable (None: reachable)
_probe_lock = threading.Lock()


def offline_mode() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read now (huggingface_hub reads its own copy once, at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(os.environ.get(var, "").upper() in _TRUE
                                           for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (probed once per process and endpoint), or None if it answers."""
    import requests
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    with _probe_lock:
        if endpoint not in _probe:
            try:
                requests.head(endpoint, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
                _probe[endpoint] = None
            except requests.RequestException as err:
                _probe[endpoint] = f"the hub ({endpoint}) cannot be reached ({type(err).__name__})"
        return _probe[endpoint]


def require_weights(model: str, what: str, fix: str, filename: str = "config.json") -> None:
    """Return if `model` (a local folder or a hub name) can be loaded; else FileNotFoundError saying `fix`.

    `filename`: a file the hub repo must have (config.json for transformers models).
    """
    if os.path.isdir(os.path.expanduser(model)):
        return
    if model.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{what} folder {model!r} does not exist. {fix}")
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(model, filename), str):
            return
    except Exception:  # not a valid repo name: from_pretrained gives the precise error
        return
    reason = "offline mode is on (HF_HUB_OFFLINE)" if offline_mode() else hub_unreachable()
    if reason is not None:
        raise FileNotFoundError(f"{what} {model!r} is not in the local Hugging Face cache and {reason}. {fix}")
