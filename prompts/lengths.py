"""Warn about prompts longer than the text encoder accepts, instead of letting the pipeline cut them silently.

The tokenizer is the caller's (the trainer passes its pipeline's CLIP tokenizer), so loading a grammar
never needs one.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable


class PromptLengthWarning(UserWarning):
    """A prompt has more tokens than the text encoder reads; the tokens past the limit would be dropped."""


def check_prompt_lengths(prompts: Iterable[Any], tokenizer: Any, max_length: int | None = None,
                         shown: int = 5) -> list[tuple[str, int]]:
    """Return (text, number of tokens) for every distinct prompt over the limit, and warn once if any.

    prompts: strings or `Prompt`s. tokenizer: a Hugging Face tokenizer; its `model_max_length`
    (77 for CLIP, counting the start and end tokens) is the limit unless `max_length` is given.
    """
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or not 0 < limit < 1_000_000:
        raise ValueError(f"the tokenizer gives no usable model_max_length ({limit!r}); pass max_length=77 for CLIP (`--max-tokens 77` on the command line)")
    texts = list(dict.fromkeys(p if isinstance(p, str) else p.text for p in prompts))
    if not texts:
        return []
    input_ids = tokenizer(texts, truncation=False)["input_ids"]
    too_long = [(text, len(ids)) for text, ids in zip(texts, input_ids) if len(ids) > limit]
    if too_long:
        examples = "; ".join(f"{text!r} ({n} tokens)" for text, n in too_long[:shown])
        more = f" and {len(too_long) - shown} more" if len(too_long) > shown else ""
        warnings.warn(f"{len(too_long)} prompt(s) are longer than the text encoder's {limit} tokens and will be "
                      f"cut to {limit}: {examples}{more}. Shorten them in the grammar.", PromptLengthWarning,
                      stacklevel=2)
    return too_long
