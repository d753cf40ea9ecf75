"""Prompt distributions for DDPO: grammars that sample prompts with metadata, and held-out splits.

Contract used by the trainer and the UI (keep it stable):

    grammar = load_grammar("animals_activities")      # a built-in name or a file path
    grammar.sample(n, seed=0, split="train")           # -> list[Prompt], deterministic for (n, seed, split)
    grammar.enumerate(split="heldout")                 # -> list[Prompt] (finite grammars)
    grammar.count(split=None)                          # -> int
    list_grammars()                                    # -> built-in names

`split` is None (everything), "train" or "heldout". This package never imports the trainer.
NOTE: minimal placeholder until the grammar language lands (issue 4).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple


class Prompt(NamedTuple):
    text: str
    metadata: dict[str, Any]


_ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
            "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
            "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake",
            "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama",
            "camel", "bat", "gorilla", "hedgehog", "kangaroo"]


class _ListGrammar:
    def __init__(self, name: str, words: list[str]):
        self.name = name
        self._prompts = [Prompt(w, {"animal": w}) for w in words]

    def enumerate(self, split: str | None = None) -> list[Prompt]:
        return list(self._prompts)

    def count(self, split: str | None = None) -> int:
        return len(self._prompts)

    def sample(self, n: int, seed: int, split: str | None = None) -> list[Prompt]:
        rng = random.Random(seed)
        return [rng.choice(self._prompts) for _ in range(n)]


def list_grammars() -> list[str]:
    return ["simple_animals"]


def load_grammar(name_or_path: str) -> _ListGrammar:
    if name_or_path == "simple_animals":
        return _ListGrammar("simple_animals", _ANIMALS)
    raise ValueError(f"unknown grammar {name_or_path!r}; built-in grammars: {', '.join(list_grammars())}")
