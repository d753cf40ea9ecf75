"""The parsed form of a grammar file: rules, alternatives, template parts, constraints and the held-out split.

Everything here is plain data. `prompts.loader` builds it from YAML and validates it; `prompts.grammar`
samples and enumerates it. Every object remembers the file and line it came from, for error messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class GrammarError(ValueError):
    """A grammar file is invalid, or a grammar cannot do what was asked. Names the file, line and rule."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, name: str | None = None):
        self.message, self.file, self.line, self.name = message, file, line, name
        where = ":".join(str(x) for x in (file, line) if x is not None)
        prefix = (f"{where}: " if where else "") + (f"{name!r}: " if name else "")
        super().__init__(prefix + message)


@dataclass(frozen=True)
class Ref:
    """A `{rule}` or `{rule.field}` reference inside a template."""

    rule: str
    field: str | None = None


_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_REF = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?$")


def parse_template(text: str, file: str, line: int, name: str) -> tuple[str | Ref, ...]:
    """Split a template into literal strings and references; `{{` and `}}` are literal braces."""
    parts: list[str | Ref] = []
    literal, pos = "", 0
    for match in _TEMPLATE_TOKEN.finditer(text):
        literal += text[pos:match.start()]
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal += token[0]
            continue
        inner = match.group(1)
        if inner is None:
            raise GrammarError(f"unbalanced {token!r} in {text!r}; write {token * 2!r} for a literal brace", file, line, name)
        ref = _REF.match(inner.strip())
        if ref is None:
            raise GrammarError(f"bad reference {{{inner}}} in {text!r}; write {{rule}} or {{rule.field}}", file, line, name)
        if literal:
            parts.append(literal)
            literal = ""
        parts.append(Ref(ref.group(1), ref.group(2)))
    literal += text[pos:]
    if literal:
        parts.append(literal)
    return tuple(parts)


@dataclass(frozen=True)
class Alternative:
    """One way to expand a rule: a template, a positive weight, and optional fields (e.g. a plural form)."""

    text: str
    parts: tuple  # tuple[str | Ref, ...]
    weight: float
    fields: dict[str, Any]
    file: str
    line: int


@dataclass
class Rule:
    name: str
    alternatives: list[Alternative]
    file: str
    line: int

    @property
    def recorded(self) -> bool:
        """Rules named with a leading underscore are helpers and stay out of the metadata."""
        return not self.name.startswith("_")

    @property
    def is_word_list(self) -> bool:
        """True when no alternative refers to another rule (its values are known without expanding)."""
        return all(all(isinstance(p, str) for p in alt.parts) for alt in self.alternatives)


@dataclass(frozen=True)
class Condition:
    """A partial assignment {metadata key: value as text}; it matches a prompt whose metadata has all of them."""

    values: dict[str, str]
    line: int

    def matches(self, metadata: dict[str, Any]) -> bool:
        # Compared as text: `count: 2` in a file matches the number 2 from a field.
        return all(key in metadata and str(metadata[key]) == value for key, value in self.values.items())


@dataclass
class HeldOut:
    """The held-out split: listed combinations, or a seeded fraction of the values of some keys."""

    combinations: list[Condition] = field(default_factory=list)
    fraction: float | None = None
    seed: int = 0
    by: list[str] | None = None  # metadata keys whose joint value decides; None: the prompt text
    description: str = ""
    line: int = 0


@dataclass(frozen=True)
class MetadataTemplate:
    """A computed metadata key: one template, or a list of templates (gives a list, e.g. VQA questions)."""

    key: str
    templates: tuple  # tuple[tuple[str | Ref, ...], ...]
    is_list: bool
    line: int


@dataclass
class GrammarSpec:
    name: str
    file: str
    description: str
    start: str
    rules: dict[str, Rule]
    distinct: list[tuple[list[str], int]]  # (keys that must all differ, line)
    exclude: list[Condition]
    metadata: dict[str, MetadataTemplate]
    heldout: HeldOut | None
    warnings: list[str] = field(default_factory=list)
