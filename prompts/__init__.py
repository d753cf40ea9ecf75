"""Prompt distributions for DDPO: grammars that sample prompts with metadata, and held-out splits.

Contract used by the trainer and the UI (keep it stable):

    grammar = load_grammar("animals_activities")      # a built-in name or a file path; checks everything
    grammar.sample(n, seed=0, split="train")           # -> list[Prompt], deterministic for (n, seed, split)
    grammar.enumerate(split="heldout")                 # -> list[Prompt] (finite grammars)
    grammar.count(split=None)                          # -> int
    grammar.heldout_description                        # -> str, which prompts are held out, for people
    list_grammars()                                    # -> built-in names
    check_prompt_lengths(prompts, tokenizer)           # warns about prompts the text encoder would cut

`split` is None (everything), "train" or "heldout". The language is documented in docs/prompts.md.
This package never imports the trainer.
"""

from __future__ import annotations

import os
from pathlib import Path

from prompts.checks import check_spec
from prompts.grammar import Grammar, Prompt
from prompts.lengths import check_prompt_lengths
from prompts.loader import read_spec
from prompts.spec import GrammarError

GRAMMAR_DIR = Path(__file__).parent / "grammars"

__all__ = ["Grammar", "GrammarError", "Prompt", "check_prompt_lengths", "list_grammars", "load_grammar"]


def list_grammars() -> list[str]:
    """Names of the built-in grammars (files `prompts/grammars/<name>.yaml`)."""
    return sorted(path.stem for path in GRAMMAR_DIR.glob("*.yaml"))


def load_grammar(name_or_path: str | os.PathLike) -> Grammar:
    """Load a built-in grammar by name, or a grammar YAML file by path, and check all of it now.

    Every problem (undefined rule, a rule that never finishes, empty alternatives, bad weights,
    duplicate names, a missing word file, ...) raises GrammarError here, naming file, line and rule.
    """
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) not in list_grammars():
            raise GrammarError(f"no grammar file or built-in grammar named {str(name_or_path)!r}; built-in "
                               f"grammars: {', '.join(list_grammars())}")
        path = GRAMMAR_DIR / f"{name_or_path}.yaml"
    spec = read_spec(path)
    check_spec(spec)
    return Grammar(spec)
