"""Which rewards can score on this machine, said before a click: weights that are not downloaded (offline, nothing
in the Hugging Face cache) and optional packages that are not installed.

Uses the rewards package's own fast checks (`rewards.hub.require_weights`: a cache lookup, offline mode, at most
one quick hub probe per process) on the reward as the operator configured it (`--reward-config`). Nothing loads a
model. This module does not import gradio.
"""

from __future__ import annotations

import os
import threading

OFFLINE_ALTERNATIVE = "jpeg_compressibility, jpeg_incompressibility, or vlm_bertscore with captioner shapes"
_cache: dict[tuple[str, str], str | None] = {}
_lock = threading.Lock()


def one_line(err: BaseException | str, limit: int = 240) -> str:
    """The first sentence of an error's first line (no download instructions, no URLs), at most `limit` chars."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for stop in (". Download", ". Install", "; rewards that need", " (see http", ". See http", ": `pip", " (or `pip"):
        text = text.split(stop)[0]
    text = text.split(" https://")[0].split(" http://")[0].rstrip(" .:;,")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _check(name: str, kwargs: dict) -> str | None:
    """Why reward `name` built with `kwargs` cannot score here, or None."""
    from rewards import build_reward
    from rewards.hub import require_weights

    try:
        reward = build_reward(name, **kwargs)  # cheap: models load on the first call; packages are checked here
    except Exception as err:
        return one_line(err)
    inner = getattr(reward, "fn", None) or getattr(reward, "reward", None) or reward
    needs: list[tuple[str, str, str]] = []  # (hub name or folder, what, file the repo must have)
    if name == "aesthetic":
        needs.append((inner.clip_model, "CLIP model", "config.json"))
        if inner.mlp_path is None:
            needs.append((inner.mlp_repo, "aesthetic MLP repo", inner.mlp_filename))
        elif not os.path.isfile(inner.mlp_path):
            return f"the aesthetic MLP file {os.path.basename(inner.mlp_path)!r} is missing"
    elif name == "pickscore":
        needs += [(inner.processor_name, "PickScore processor", "config.json"),
                  (inner.model_name, "PickScore model", "config.json")]
    for model, what, filename in needs:
        try:
            require_weights(model, what, "", filename=filename)
        except FileNotFoundError as err:
            return one_line(err)
    return None


def unavailable_rewards(names: list[str], reward_config: dict[str, dict]) -> dict[str, str]:
    """reward name -> one-line reason, for the names that cannot score here (checked once per process)."""
    import json

    out = {}
    for name in names:
        if name in ("compose", "remote"):
            continue
        key = (name, json.dumps(reward_config.get(name, {}), sort_keys=True, default=str))
        with _lock:
            if key not in _cache:
                _cache[key] = _check(name, dict(reward_config.get(name, {})))
        if _cache[key]:
            out[name] = _cache[key]
    return out


def availability_note(missing: dict[str, str]) -> str:
    """Markdown: one line per reward that cannot score here, and what works offline."""
    if not missing:
        return ""
    lines = [f"- **{name}** not available here: {why}" for name, why in missing.items()]
    return "\n".join([*lines, f"- works offline: {OFFLINE_ALTERNATIVE}"])
