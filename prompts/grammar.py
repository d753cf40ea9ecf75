"""A loaded, checked grammar: deterministic sampling, enumeration, counting and the train / held-out split.

A prompt is one derivation from the start rule. Its metadata records, for every rule the derivation
used, the text that rule produced (`{"animal": "dolphin", "activity": "riding a bike"}`); a rule used
twice gives `rule` and `rule#2`. Metadata templates of the grammar add computed keys (e.g. the
counting task's question and answer).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import random
from itertools import accumulate
from typing import Any, NamedTuple

from prompts.articles import finish_text
from prompts.checks import MAX_DEPTH, MAX_PROMPT_CHARS, MAX_RULE_USES, metadata_keys, recursive_cycle, template_refs
from prompts.spec import Alternative, GrammarError, GrammarSpec, Ref

SPLITS = (None, "train", "heldout")
# MAX_DEPTH, MAX_PROMPT_CHARS and MAX_RULE_USES are checked at load time (exactly for finite grammars) and
# again while sampling: loading only refuses recursions that grow on average, not an unlucky long draw.
MAX_TRIES = 10_000  # rejected draws (constraints, split) allowed per sampled prompt
MAX_ENUMERATE = 1_000_000  # enumerated prompts are cached, so this bounds memory too

# One step of a derivation: (rule name, the text it produced, the alternative it took).
Event = tuple[str, str, Alternative]


class Prompt(NamedTuple):
    text: str
    metadata: dict[str, Any]


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _copy(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, list) else value for key, value in metadata.items()}


def _fill(parts: tuple, first: dict[str, tuple[str, Alternative]]) -> Any:
    """A metadata template filled from the first use of each rule; a lone `{rule.field}` keeps its type."""

    def value(ref: Ref) -> Any:
        rule_text, alt = first[ref.rule]
        return rule_text if ref.field is None else alt.fields[ref.field]

    if len(parts) == 1 and isinstance(parts[0], Ref):
        return value(parts[0])
    return finish_text("".join(str(value(p)) if isinstance(p, Ref) else p for p in parts))


class Grammar:
    """Use `prompts.load_grammar` to build one; it checks the grammar first."""

    def __init__(self, spec: GrammarSpec):
        self.spec = spec
        self.name = spec.name
        self.description = spec.description
        self.warnings = spec.warnings
        self.metadata_keys = metadata_keys(spec)
        self._cycle = recursive_cycle(spec)
        self._heldout_cache: frozenset[str] | None = None
        self._enumerated: list[Prompt] | None = None  # every allowed prompt, once enumerated
        self._cumulative = {name: list(accumulate(alt.weight for alt in rule.alternatives))
                            for name, rule in spec.rules.items()}

    def __repr__(self) -> str:
        return f"Grammar({self.name!r}, file={self.spec.file!r})"

    @property
    def is_finite(self) -> bool:
        return self._cycle is None

    @property
    def has_heldout(self) -> bool:
        return self.spec.heldout is not None

    @property
    def heldout_description(self) -> str:
        """One paragraph for people (the UI, `ddpo prompts list`) saying which prompts are held out."""
        heldout = self.spec.heldout
        if heldout is None:
            return "No held-out split: every prompt is a training prompt."
        lead = heldout.description.strip() + ("\n" if heldout.description.strip() else "")
        if heldout.combinations:
            combos = ", or ".join(" and ".join(f"{k}={v}" for k, v in c.values.items()) for c in heldout.combinations)
            return lead + f"Held out: every prompt with {combos}."
        by = f"values of ({', '.join(heldout.by)})" if heldout.by else "prompts"
        if not self.is_finite:
            return lead + f"Held out: about {heldout.fraction:.0%} of the {by}, chosen by a hash with seed {heldout.seed}."
        self.enumerate()  # fills self._enumerated
        total = len({self._split_key(p) for p in self._enumerated})
        return lead + (f"Held out: {len(self._heldout_keys())} of the {total} {by} (fraction {heldout.fraction:g}), "
                       f"chosen by a hash with seed {heldout.seed}.")

    # -- sampling --------------------------------------------------------------------------------

    def sample(self, n: int, seed: int, split: str | None = None) -> list[Prompt]:
        """`n` prompts drawn by the weights, the same for the same (n, seed, split) on any machine.

        The first k of `sample(n, seed)` equal `sample(k, seed)`. Prompts that break a constraint
        or fall outside `split` are redrawn, so a split keeps the grammar's relative weights.
        """
        self._check_split(split)
        if split == "heldout" and self.spec.heldout is None:
            raise GrammarError("this grammar has no held-out split; add a `heldout:` section (combinations or "
                               "fraction) to its file", self.spec.file, None, self.name)
        n, seed = _integer(n, "n"), _integer(seed, "seed")  # numpy integers are welcome
        if n < 0:
            raise ValueError(f"n must be 0 or more, got {n}")
        rng = random.Random(seed)
        prompts = []
        for _ in range(n):
            for _ in range(MAX_TRIES):
                events: list = []
                text, _alt = self._derive(self.spec.start, rng, 0, events)
                prompt = self._prompt(text, events)
                if self._allowed(prompt.metadata) and self._in_split(prompt, split):
                    prompts.append(prompt)
                    break
            else:
                raise GrammarError(f"no prompt of split {split!r} that satisfies the constraints in {MAX_TRIES} "
                                   "draws: the split is empty or very rare; run `ddpo prompts check` on it",
                                   self.spec.file, None, self.name)
        return prompts

    def _derive(self, name: str, rng: random.Random, depth: int, events: list) -> tuple[str, Alternative]:
        if depth > MAX_DEPTH:
            raise GrammarError(f"a derivation went deeper than {MAX_DEPTH} rules (recursion through "
                               f"{' -> '.join(self._cycle or [name])}); give the alternatives that end the "
                               "recursion more weight", self.spec.file, self.spec.rules[name].line, name)
        if len(events) >= MAX_RULE_USES:
            raise GrammarError(f"a derivation used more than {MAX_RULE_USES} rules (recursion through "
                               f"{' -> '.join(self._cycle or [name])}); give the alternatives that end the "
                               "recursion more weight", self.spec.file, self.spec.rules[name].line, name)
        rule, cumulative = self.spec.rules[name], self._cumulative[name]
        index = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(cumulative) - 1)
        alt = rule.alternatives[index]
        slot = len(events)
        events.append(None)  # this rule's event goes before its children's (pre-order, as in enumerate)
        pieces = []
        for part in alt.parts:
            if isinstance(part, Ref):
                child_text, child_alt = self._derive(part.rule, rng, depth + 1, events)
                pieces.append(child_text if part.field is None else str(child_alt.fields[part.field]))
            else:
                pieces.append(part)
        text = finish_text("".join(pieces))
        if len(text) > MAX_PROMPT_CHARS:
            raise GrammarError(f"a derivation produced {len(text)} characters, more than the {MAX_PROMPT_CHARS} a "
                               "prompt may have; give the alternatives that end the recursion more weight",
                               self.spec.file, self.spec.rules[name].line, name)
        events[slot] = (name, text, alt)
        return text, alt

    # -- enumeration -----------------------------------------------------------------------------

    def enumerate(self, split: str | None = None) -> list[Prompt]:
        """Every prompt of a finite grammar (in the order of the alternatives), filtered by `split`.

        A grammar without a held-out split has no held-out prompts: `enumerate("heldout")` is empty.
        """
        self._check_split(split)
        if self._cycle is not None:
            raise GrammarError(f"the grammar is infinite (recursion {' -> '.join(self._cycle)}), so it cannot be "
                               "enumerated or counted; use sample()", self.spec.file, None, self.name)
        if self._enumerated is None:
            derivations = self._all(self.spec.start, {})
            prompts = (self._prompt(text, list(events)) for text, _alt, events in derivations)
            self._enumerated = [p for p in prompts if self._allowed(p.metadata)]
        # Copies, so that a caller editing a prompt's metadata cannot change this grammar's cache.
        return [Prompt(p.text, _copy(p.metadata)) for p in self._enumerated if self._in_split(p, split)]

    def count(self, split: str | None = None) -> int:
        self.enumerate(split=None)  # fills the cache, or raises for an infinite grammar
        return sum(self._in_split(p, split) for p in self._enumerated)

    def _all(self, name: str, cache: dict) -> list[tuple[str, Alternative, tuple]]:
        """Every (text, alternative, events) derivation of rule `name`; memoised per rule."""
        if name in cache:
            return cache[name]
        derivations = []
        for alt in self.spec.rules[name].alternatives:
            partial: list[tuple[tuple[str, ...], tuple]] = [((), ())]
            for part in alt.parts:
                if not isinstance(part, Ref):
                    partial = [(pieces + (part,), events) for pieces, events in partial]
                    continue
                children = self._all(part.rule, cache)
                if len(partial) * len(children) > MAX_ENUMERATE:
                    raise GrammarError(f"more than {MAX_ENUMERATE} prompts: too many to enumerate; use sample()",
                                       alt.file, alt.line, name)
                partial = [(pieces + (text if part.field is None else str(child.fields[part.field]),), events + sub)
                           for pieces, events in partial for text, child, sub in children]
            for pieces, events in partial:
                text = finish_text("".join(pieces))
                derivations.append((text, alt, ((name, text, alt),) + events))
            if len(derivations) > MAX_ENUMERATE:
                raise GrammarError(f"more than {MAX_ENUMERATE} prompts: too many to enumerate; use sample()",
                                   alt.file, alt.line, name)
        cache[name] = derivations
        return derivations

    # -- metadata, constraints, splits -----------------------------------------------------------

    def _prompt(self, text: str, events: list[Event]) -> Prompt:
        metadata: dict[str, Any] = {}
        first: dict[str, tuple[str, Alternative]] = {}
        uses: dict[str, int] = {}
        for name, rule_text, alt in events:
            first.setdefault(name, (rule_text, alt))
            if name == self.spec.start or not self.spec.rules[name].recorded:
                continue
            uses[name] = uses.get(name, 0) + 1
            metadata[name if uses[name] == 1 else f"{name}#{uses[name]}"] = rule_text
        for template in self.spec.metadata.values():
            if all(ref.rule in first for ref in template_refs(template)):  # else a rule it needs was not used
                values = [_fill(parts, first) for parts in template.templates]
                metadata[template.key] = values if template.is_list else values[0]
        return Prompt(text, metadata)

    def _allowed(self, metadata: dict[str, Any]) -> bool:
        for names, _line in self.spec.distinct:
            values = [str(metadata[k]) for k in names if k in metadata]
            if len(set(values)) != len(values):
                return False
        return not any(condition.matches(metadata) for condition in self.spec.exclude)

    def is_heldout(self, prompt: Prompt) -> bool:
        """True when `prompt` (from this grammar) belongs to the held-out split."""
        heldout = self.spec.heldout
        if heldout is None:
            return False
        if heldout.combinations:
            return any(condition.matches(prompt.metadata) for condition in heldout.combinations)
        key = self._split_key(prompt)
        if self.is_finite:
            return key in self._heldout_keys()
        return self._key_hash(key) < heldout.fraction  # infinite: each key is held out with that probability

    def _split_key(self, prompt: Prompt) -> str:
        by = self.spec.heldout.by
        return prompt.text if by is None else json.dumps([prompt.metadata.get(k) for k in by])

    def _key_hash(self, key: str) -> float:
        digest = hashlib.sha256(f"{self.spec.heldout.seed}\0{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _heldout_keys(self) -> frozenset[str]:
        """The `fraction` of a finite grammar's keys with the smallest seeded hashes.

        Ranked by hash rather than shuffled: adding a word to the grammar moves at most one other
        key across the line, so the held-out prompts of a grammar barely change as it grows.
        """
        if self._heldout_cache is None:
            self.enumerate()  # fills self._enumerated
            keys = sorted({self._split_key(p) for p in self._enumerated}, key=lambda k: (self._key_hash(k), k))
            size = min(max(round(self.spec.heldout.fraction * len(keys)), 1), max(len(keys) - 1, 0))
            self._heldout_cache = frozenset(keys[:size])
        return self._heldout_cache

    def _in_split(self, prompt: Prompt, split: str | None) -> bool:
        return split is None or self.is_heldout(prompt) == (split == "heldout")

    def _check_split(self, split: str | None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
