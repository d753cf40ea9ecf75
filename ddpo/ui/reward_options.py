"""What a browser may set on a reward: an allow-list per reward, merged over the operator's --reward-config.

A request may only choose among values the operator allowed: the rewards the app offers, the captioners it offers,
and the numbers, booleans and choices listed in REWARD_OPTIONS / CAPTIONER_OPTIONS, within their bounds. Everything
else a reward can take (a "package.module:attr" to import, a URL, the name of an environment variable holding a
key, a local path, a hub id, a device) comes only from the file the operator passes at launch
(`ddpo app --reward-config FILE`), and a request cannot change it. A reward or option missing from these tables
takes no options from the browser: new rewards are closed until someone lists what is safe to open.

This module does not import gradio.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ddpo.ui.settings import UIError

COMPOSE = "compose"
MAX_OPTIONS_CHARS = 10_000  # the reward options box; deeper JSON than this cannot be sent at all
MAX_TERMS = 16  # composed-reward terms
MAX_WEIGHT = 1e6
TERM_LABEL = re.compile(r"[A-Za-z0-9_-]{1,32}")  # "vlm_bertscore#count": one reward twice in a composition
NOT_FROM_BROWSER = ("imports, URLs, keys, paths, model ids and devices come only from the operator's "
                    "`ddpo app --reward-config FILE`")


@dataclass(frozen=True)
class Option:
    """One value a browser may set: an int or float in [low, high], a bool, or one of `choices` (texts: length)."""
    kind: str  # "int", "float", "bool", "choice" or "text"
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()

    def check(self, where: str, value: Any) -> Any:
        """`value` if it fits, else a UIError naming `where` and what would fit."""
        if self.kind == "bool" and isinstance(value, bool):
            return value
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and numeric and math.isfinite(value) and value == int(value) \
                and self.low <= value <= self.high:
            return int(value)
        if self.kind == "float" and numeric and math.isfinite(value) and self.low <= value <= self.high:
            return float(value)
        if self.kind == "choice" and value in self.choices:
            return value
        if self.kind == "text" and isinstance(value, str) and len(value) <= self.high and value.isprintable():
            return value
        raise UIError(f"reward options: {where}={value!r} is not allowed; it must be {self.describe()}")

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "text":
            return f"a line of text of at most {int(self.high)} characters"
        kind = "a whole number" if self.kind == "int" else "a number"
        return f"{kind} between {self.low:g} and {self.high:g}"


def _int(low: int, high: int) -> Option:
    return Option("int", low, high)


def _float(low: float, high: float) -> Option:
    return Option("float", low, high)


BOOL = Option("bool")
SEED = _int(0, 2**31 - 1)
_TRANSFORMERS = {"max_new_tokens": _int(1, 256), "batch_size": _int(1, 64), "do_sample": BOOL,
                 "temperature": _float(0.01, 5.0)}
# Captioner backend -> its kwargs a browser may set (rewards.captioners). Not: model (a hub id or path), device, dtype.
CAPTIONER_OPTIONS: dict[str, dict[str, Option]] = {
    "shapes": {"batch_size": _int(1, 1024), "do_sample": BOOL, "temperature": _float(0.01, 5.0), "seed": SEED},
    "llava": _TRANSFORMERS, "blip": _TRANSFORMERS, "blip2": _TRANSFORMERS,
    "openai": {"max_tokens": _int(1, 256), "temperature": _float(0.0, 2.0)},  # its endpoint: operator only
}
# Captioners a browser may pick without any operator config: models that run in this process. "openai" (an endpoint
# and a key) and "package.module:Class" captioners are offered only when the operator's config names them.
BROWSER_CAPTIONERS = ("shapes", "llava", "blip", "blip2")
DEFAULT_CAPTIONER = "llava"  # vlm_bertscore's, when neither the request nor the operator names one
# Reward -> the kwargs a browser may set. "captioner" and "captioner_kwargs" are checked against the offered
# captioners and CAPTIONER_OPTIONS. Not: bertscore_model, num_layers, reference_template, device, clip_model,
# mlp_path, url, token_env, ... (operator only), nor vlm_bertscore's batch_size: rewards.alignment keeps one BERTScore
# model per batch size for the life of the process, so each new value would load another.
REWARD_OPTIONS: dict[str, dict[str, Option]] = {
    "jpeg_compressibility": {},
    "jpeg_incompressibility": {},
    "aesthetic": {"batch_size": _int(1, 64)},
    "vlm_bertscore": {"question": Option("text", high=300), "metric": Option("choice", choices=("precision", "recall",
                                                                                                 "f1")),
                      "caption_retries": _int(0, 5), "num_captions": _int(1, 16), "expected": BOOL},
}
CAPTIONED = ("vlm_bertscore",)  # rewards with a "captioner" and its "captioner_kwargs"
OPERATOR_ONLY = ("remote",)  # offered only when the operator's config gives its url and token


class RewardConfigError(ValueError):
    """The operator's --reward-config file is not a mapping of offered reward names to plain-data kwargs."""


# ---------------------------------------------------------------------------------------------- operator config


def load_reward_config(path: str | Path) -> dict[str, dict]:
    """The operator's reward config: a YAML (or JSON) mapping reward name -> kwargs merged into every request."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise RewardConfigError(f"--reward-config {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise RewardConfigError(f"--reward-config {path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    return check_reward_config(data or {}, str(path))


def check_reward_config(data: Any, where: str = "reward config") -> dict[str, dict]:
    """`data` if it maps registered reward names (not compose) to mappings of plain data, else RewardConfigError."""
    from rewards import _check_plain, list_rewards

    registered = [r for r in list_rewards() if r != COMPOSE]
    if not isinstance(data, dict):
        raise RewardConfigError(f"{where}: expected a mapping of reward name -> options, e.g. "
                                "'remote: {url: http://127.0.0.1:8085, token_env: DDPO_REWARD_TOKEN}'")
    for name, kwargs in data.items():
        if name not in registered:
            raise RewardConfigError(f"{where}: {name!r} is not a registered reward; use one of "
                                    f"{', '.join(registered)} (compose is set per request with weights)")
        if not isinstance(kwargs, dict):
            raise RewardConfigError(f"{where}: {name} must map to a mapping of options, got {kwargs!r}")
        try:
            _check_plain(kwargs, name)
        except TypeError as err:
            raise RewardConfigError(f"{where}: {err}") from None
        if name in CAPTIONED and not isinstance(kwargs.get("captioner", ""), str):
            raise RewardConfigError(f"{where}: {name}.captioner must be a captioner name, got {kwargs['captioner']!r}")
    return data


def offered_rewards(operator: Mapping[str, dict]) -> list[str]:
    """The reward names a browser may tick or compose: the registry without compose, and without `remote` unless
    the operator configured it."""
    from rewards import list_rewards

    return [r for r in list_rewards() if r != COMPOSE and (r not in OPERATOR_ONLY or r in operator)]


def offered_captioners(operator: Mapping[str, dict], reward: str = "vlm_bertscore") -> list[str]:
    """The local captioners, plus the one the operator configured for `reward` (an endpoint or own class)."""
    own = operator.get(reward, {}).get("captioner")
    return [*BROWSER_CAPTIONERS, *([own] if own and own not in BROWSER_CAPTIONERS else [])]


# ---------------------------------------------------------------------------------------------- browser options


def request_kwargs(operator: Mapping[str, dict], term: str, browser: Any) -> dict[str, Any]:
    """The kwargs to build reward `term` ("name" or "name#label") with: the operator's config for that reward,
    overridden by the browser's options where REWARD_OPTIONS allows; any other browser key is a UIError."""
    name = check_name(operator, term)
    if not isinstance(browser, dict):
        raise UIError(f"reward options: {term} must map to an object of options, e.g. {{}}; got {browser!r}")
    own = operator.get(name, {})
    allowed = REWARD_OPTIONS.get(name, {})
    kwargs = {key: value for key, value in own.items() if key != "captioner_kwargs"}
    for key, value in browser.items():
        if key in allowed:
            kwargs[key] = allowed[key].check(f"{term}.{key}", value)
        elif name in CAPTIONED and key in ("captioner", "captioner_kwargs"):
            continue  # below: the captioner decides which kwargs are allowed
        else:
            keys = [*allowed, *(["captioner", "captioner_kwargs"] if name in CAPTIONED else [])]
            raise UIError(f"reward options: {term}.{key} cannot be set from the browser; {name} takes "
                          f"{', '.join(keys) or 'no options'} here ({NOT_FROM_BROWSER})")
    if name in CAPTIONED:
        kwargs.update(_captioner_kwargs(operator, name, term, browser))
    return kwargs


def _captioner_kwargs(operator: Mapping[str, dict], name: str, term: str, browser: dict) -> dict[str, Any]:
    """{"captioner": ..., "captioner_kwargs": ...}: an offered captioner, the operator's kwargs for it (only if it
    is the operator's captioner: they were written for that one), and the browser's allowed kwargs."""
    own = operator.get(name, {})
    offered = offered_captioners(operator, name)
    captioner = browser["captioner"] if "captioner" in browser else own.get("captioner")
    if "captioner" in browser and captioner not in offered:  # null too: it would leave the operator's captioner
        raise UIError(f"reward options: captioner {captioner!r} is not offered; choose one of {', '.join(offered)} "
                      f"({NOT_FROM_BROWSER})")
    effective = captioner or DEFAULT_CAPTIONER
    kwargs = dict(own.get("captioner_kwargs", {})) if effective == (own.get("captioner") or DEFAULT_CAPTIONER) else {}
    extra = browser.get("captioner_kwargs", {})
    if not isinstance(extra, dict):
        raise UIError(f"reward options: {term}.captioner_kwargs must be an object, got {extra!r}")
    allowed = CAPTIONER_OPTIONS.get(effective, {})  # none for the operator's own class: its kwargs are the operator's
    for key, value in extra.items():
        if key not in allowed:
            raise UIError(f"reward options: {term}.captioner_kwargs.{key} cannot be set from the browser; captioner "
                          f"{effective!r} takes {', '.join(allowed) or 'no options'} here "
                          f"({NOT_FROM_BROWSER})")
        kwargs[key] = allowed[key].check(f"{term}.captioner_kwargs.{key}", value)
    result: dict[str, Any] = {"captioner": captioner} if captioner is not None else {}
    return {**result, **({"captioner_kwargs": kwargs} if kwargs else {})}


def check_name(operator: Mapping[str, dict], term: str) -> str:
    """The reward name of `term` ("name" or "name#label") if the app offers it, else a UIError listing them."""
    name, sep, label = str(term).partition("#")
    offered = offered_rewards(operator)
    if name not in offered:
        raise UIError(f"reward {name!r} is not offered; choose one of {', '.join(offered)} (custom and remote "
                      "rewards are offered only through the operator's `ddpo app --reward-config FILE`)")
    if sep and not TERM_LABEL.fullmatch(label):
        raise UIError(f"composed term {term!r}: the label after '#' must be 1 to 32 letters, digits, '_' or '-'")
    return name


def parse_options(text: str | None) -> dict[str, dict]:
    """The "reward options" box: a JSON object {reward name: {option: value}} (checked by `reward_jobs`)."""
    text = (text or "").strip()
    if not text:
        return {}
    if len(text) > MAX_OPTIONS_CHARS:
        raise UIError(f"reward options have {len(text)} characters; the limit is {MAX_OPTIONS_CHARS}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UIError(f"reward options are not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                      'expected e.g. {"vlm_bertscore": {"captioner": "shapes"}}') from None
    except RecursionError:
        raise UIError("reward options are nested too deeply") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UIError("reward options must map reward names to objects of options, "
                      'e.g. {"vlm_bertscore": {"captioner": "shapes"}}')
    return data


def parse_weights(text: str | None) -> dict[str, float]:
    """The composed-reward box: "name: weight" pairs separated by commas or new lines ("" = no composed reward)."""
    weights: dict[str, float] = {}
    for item in (text or "").replace("\n", ",").split(","):
        if not item.strip():
            continue
        name, sep, raw = item.partition(":")
        try:
            weights[name.strip()] = float(raw) if sep else math.nan
        except ValueError:
            weights[name.strip()] = math.nan
        if not math.isfinite(weights[name.strip()]):
            raise UIError(f"composed reward term {item.strip()!r} is not 'name: weight' with a number, "
                          "e.g. 'jpeg_compressibility: 1.0, aesthetic: 0.1'")
        if abs(weights[name.strip()]) > MAX_WEIGHT:
            raise UIError(f"composed reward term {item.strip()!r}: weights must lie within ±{MAX_WEIGHT:g}")
    if len(weights) > MAX_TERMS:
        raise UIError(f"the composed reward has {len(weights)} terms; the limit is {MAX_TERMS}")
    return weights


def reward_jobs(operator: Mapping[str, dict], names: list[str] | None, options: str | None, weights: str | None,
                normalize: str) -> dict[str, tuple[str, dict]]:
    """Column -> (reward name, kwargs) for `rewards.build_reward`: every ticked reward, plus "compose" when weights
    are given. Every name, option and value is checked here, before any reward is built or any model loads."""
    by_term, terms, names = parse_options(options), parse_weights(weights), list(names or [])
    if not names and not terms:
        raise UIError("tick at least one reward (or give weights for a composed reward)")
    if normalize not in ("none", "batch"):
        raise UIError(f"normalise must be 'none' or 'batch', got {normalize!r}")
    checked = {term: request_kwargs(operator, term, value) for term, value in by_term.items()}
    jobs = {}
    for name in names:
        if "#" in name:
            raise UIError(f"reward {name!r}: 'name#label' is for composed terms; tick the reward itself")
        jobs[name] = (name, checked[name] if name in checked else request_kwargs(operator, name, {}))
    if terms:
        kwargs = {term: checked[term] if term in checked else request_kwargs(operator, term, {}) for term in terms}
        jobs[COMPOSE] = (COMPOSE, {"terms": terms, "normalize": "batch" if normalize == "batch" else False,
                                   "kwargs": {term: value for term, value in kwargs.items() if value}})
    return jobs


def default_options(operator: Mapping[str, dict]) -> str:
    """The reward options box at start: the VLM reward on the operator's captioner, else the shipped Shapes one
    (offline)."""
    captioner = operator.get("vlm_bertscore", {}).get("captioner", "shapes")
    return json.dumps({"vlm_bertscore": {"captioner": captioner}}, indent=1)
