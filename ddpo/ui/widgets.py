"""Pieces shared by the tabs: readable errors, the prompt batch of a request, the generation inputs."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple

import gradio as gr

from ddpo.ui.settings import AppSettings, UIError, check_float, check_int

logger = logging.getLogger("ddpo.ui")
TYPED, FROM_GRAMMAR = "typed prompt (n seeds)", "n prompts from a grammar"
SPLITS = {"all": None, "train": "train", "heldout": "heldout"}


def readable_errors(fn: Callable) -> Callable:
    """Show any exception as a short message in the browser (gr.Error), the traceback only in the server log."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UIError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:
            logger.exception("request failed")
            raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from None

    return wrapper


class GenerationRequest(NamedTuple):
    prompts: list[str]
    metadata: list[dict]
    seed: int
    steps: int
    guidance: float


def check_generation(settings: AppSettings, source: str, prompt: str, grammar: str | None, split: str,
                     n: float, seed: float, steps: float, guidance: float) -> GenerationRequest:
    """Validate the inputs of a generation request (the same bounds as the sliders) and build its prompts."""
    lim = settings.limits
    n = check_int("number of images", n, 1, lim.max_images)
    seed = check_int("seed", seed, 0, lim.max_seed)
    steps = check_int("steps", steps, 1, lim.max_steps)
    guidance = check_float("guidance scale", guidance, 1.0, lim.max_guidance)
    if source == FROM_GRAMMAR:
        if split not in SPLITS:
            raise UIError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        sampled = load_builtin_grammar(grammar).sample(n, seed=seed, split=SPLITS[split])
        return GenerationRequest([p.text for p in sampled], [dict(p.metadata) for p in sampled], seed, steps, guidance)
    prompt = (prompt or "").strip()
    if not prompt:
        raise UIError("type a prompt, or choose 'n prompts from a grammar'")
    if len(prompt) > lim.max_prompt_chars:
        raise UIError(f"the prompt has {len(prompt)} characters; the limit is {lim.max_prompt_chars}")
    return GenerationRequest([prompt] * n, [{} for _ in range(n)], seed, steps, guidance)


def load_builtin_grammar(name: str | None):
    """A built-in grammar, read from the package's own file: a name from the browser never becomes a path (a
    grammar file may name word files, which can be any file the server can read)."""
    from prompts import GRAMMAR_DIR, load_grammar

    if not isinstance(name, str) or name not in grammar_choices():
        raise UIError(f"grammar {name!r} is not a built-in grammar; choose one of {', '.join(grammar_choices())}")
    return load_grammar(GRAMMAR_DIR / f"{name}.yaml")


def grammar_choices() -> list[str]:
    try:
        from prompts import list_grammars

        return list_grammars()
    except ImportError:
        return []


def reward_choices(settings: AppSettings) -> list[str]:
    """The rewards a browser may pick: registered ones, `remote` only when the operator configured it."""
    from ddpo.ui.reward_options import offered_rewards

    return offered_rewards(settings.reward_config)


def default_sampling(model: str) -> tuple[int, float]:
    """(steps, guidance) the model's preset trains with, else 20 and 5."""
    preset = {"shapes": "shapes_alignment", "tiny-random": "tiny_cpu"}.get(model)
    try:
        from ddpo.config import load_config

        sample = load_config(preset).sample if preset else None
    except Exception:  # the preset is not there yet: fall back
        sample = None
    return (sample.num_steps, sample.guidance_scale) if sample else (20, 5.0)


class GenerationInputs(NamedTuple):
    source: gr.Radio
    prompt: gr.Textbox
    grammar: gr.Dropdown
    split: gr.Dropdown
    n: gr.Slider
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider

    def as_list(self) -> list:
        return list(self)


def generation_inputs(settings: AppSettings, model: str, prefix: str) -> GenerationInputs:
    """The prompt / seed / steps / guidance inputs, bounded by the settings' limits."""
    lim = settings.limits
    steps, guidance = default_sampling(model)
    grammars = grammar_choices()
    source = gr.Radio([TYPED, FROM_GRAMMAR], value=TYPED, label="Prompts", elem_id=f"{prefix}-source")
    prompt = gr.Textbox(value=_default_prompt(model), label="Prompt (Enter generates)",
                        max_length=lim.max_prompt_chars, elem_id=f"{prefix}-prompt")
    with gr.Row():
        grammar = gr.Dropdown(grammars, value=_default_grammar(model, grammars), label="Grammar",
                              elem_id=f"{prefix}-grammar", visible=False)
        split = gr.Dropdown(list(SPLITS), value="all", label="Split", elem_id=f"{prefix}-split", visible=False)
    with gr.Row():
        n = gr.Slider(1, lim.max_images, value=min(4, lim.max_images), step=1, label="Images", elem_id=f"{prefix}-n")
        seed = gr.Number(0, label="Seed (image i uses seed + i)", precision=0, minimum=0, maximum=lim.max_seed,
                         elem_id=f"{prefix}-seed")
    with gr.Row():
        steps = gr.Slider(1, lim.max_steps, value=min(steps, lim.max_steps), step=1, label="Steps",
                          elem_id=f"{prefix}-steps")
        guidance = gr.Slider(1.0, lim.max_guidance, value=guidance, step=0.5, label="Guidance scale",
                             elem_id=f"{prefix}-guidance")
    # only the inputs of the chosen prompt source are shown
    source.change(lambda s: (gr.update(visible=s == TYPED), gr.update(visible=s == FROM_GRAMMAR),
                             gr.update(visible=s == FROM_GRAMMAR)), source, [prompt, grammar, split],
                  api_name=False, queue=False, show_progress="hidden")
    return GenerationInputs(source, prompt, grammar, split, n, seed, steps, guidance)


def _default_prompt(model: str) -> str:
    return "a red circle on a blue background" if model == "shapes" else "a cat"


def _default_grammar(model: str, grammars: list[str]) -> str | None:
    for name in ("shapes" if model == "shapes" else "simple_animals", "shapes", "simple_animals"):
        if name in grammars:
            return name
    return grammars[0] if grammars else None
