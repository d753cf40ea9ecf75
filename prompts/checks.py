"""Whole-grammar checks, run when a grammar loads so that a broken grammar never fails mid-training.

Errors: undefined rules or fields, a rule that can never finish (a cycle with no way out), duplicate
alternatives, inconsistent fields, an `a(n)` with nothing after it, and constraints or held-out
combinations that name keys or values the grammar cannot produce. Warnings: rules never used.
"""

from __future__ import annotations

import re

from prompts.articles import finish_text, has_dangling_marker
from prompts.spec import Condition, GrammarError, GrammarSpec, MetadataTemplate, Ref, Rule

_REPEAT_KEY = re.compile(r"^(.+)#([2-9]|[1-9][0-9]+)$")


def refs(parts: tuple) -> list[Ref]:
    return [part for part in parts if isinstance(part, Ref)]


def template_refs(template: MetadataTemplate) -> list[Ref]:
    return [ref for parts in template.templates for ref in refs(parts)]


def reachable_rules(spec: GrammarSpec) -> list[str]:
    """Rules reachable from the start rule, in first-visit order."""
    order, stack = [], [spec.start]
    while stack:
        name = stack.pop()
        if name in order:
            continue
        order.append(name)
        for alt in reversed(spec.rules[name].alternatives):
            stack.extend(ref.rule for ref in reversed(refs(alt.parts)) if ref.rule not in order)
    return order


def recursive_cycle(spec: GrammarSpec) -> list[str] | None:
    """A cycle of rules reachable from the start rule (the grammar is then infinite), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for alt in spec.rules[name].alternatives:
            for ref in refs(alt.parts):
                if state.get(ref.rule) == 1:
                    return path[path.index(ref.rule):] + [ref.rule]
                if ref.rule not in state and (cycle := visit(ref.rule, path + [ref.rule])):
                    return cycle
        state[name] = 2
        return None

    return visit(spec.start, [spec.start])


def _check_rule(spec: GrammarSpec, rule: Rule) -> None:
    field_names = set(rule.alternatives[0].fields)
    seen: dict[str, int] = {}
    for alt in rule.alternatives:
        if set(alt.fields) != field_names:
            raise GrammarError(f"alternative {alt.text!r} has fields {sorted(alt.fields)} but the rule's first "
                               f"alternative has {sorted(field_names)}; give every alternative the same fields",
                               alt.file, alt.line, rule.name)
        if alt.text in seen:
            raise GrammarError(f"duplicate alternative {alt.text!r} (also on line {seen[alt.text]}); "
                               "give it a larger weight instead", alt.file, alt.line, rule.name)
        seen[alt.text] = alt.line
        for key, value in alt.fields.items():
            if not (value is None or isinstance(value, (str, int, float, bool))):
                raise GrammarError(f"field {key!r} of {alt.text!r} must be a text or a number (metadata is JSON), "
                                   f"got {type(value).__name__}", alt.file, alt.line, rule.name)
        if has_dangling_marker(alt.text):
            raise GrammarError(f"`a(n)` at the end of {alt.text!r}: the article must be followed by a word or a "
                               "reference in the same alternative", alt.file, alt.line, rule.name)
        for ref in refs(alt.parts):
            _check_ref(spec, ref, alt.file, alt.line, rule.name)


def _check_ref(spec: GrammarSpec, ref: Ref, file: str, line: int, name: str) -> None:
    if ref.rule not in spec.rules:
        raise GrammarError(f"undefined rule {ref.rule!r}; defined rules: {', '.join(spec.rules)}", file, line, name)
    if ref.field is not None:
        for alt in spec.rules[ref.rule].alternatives:
            if ref.field not in alt.fields:
                raise GrammarError(f"{{{ref.rule}.{ref.field}}}: alternative {alt.text!r} of rule {ref.rule!r} "
                                   f"({alt.file}:{alt.line}) has no field {ref.field!r}", file, line, name)


def _check_termination(spec: GrammarSpec) -> None:
    """Every rule needs an alternative whose references all finish (a least fixed point over the rules)."""
    finishing: set[str] = set()
    changed = True
    while changed:
        changed = False
        for rule in spec.rules.values():
            if rule.name not in finishing and any(all(r.rule in finishing for r in refs(alt.parts))
                                                  for alt in rule.alternatives):
                finishing.add(rule.name)
                changed = True
    for rule in spec.rules.values():
        if rule.name not in finishing:
            path, name = [rule.name], rule.name
            while True:  # follow references to other non-finishing rules until the loop closes
                name = next(r.rule for alt in spec.rules[name].alternatives for r in refs(alt.parts) if r.rule not in finishing)
                if name in path:
                    break
                path.append(name)
            cycle = " -> ".join(path[path.index(name):] + [name])
            raise GrammarError(f"rule can never finish: every alternative leads back into the cycle {cycle}; "
                               "add an alternative that does not refer to these rules", rule.file, rule.line, rule.name)


def _check_expected_size(spec: GrammarSpec, cycle: list[str]) -> None:
    """A recursive grammar must shrink on average: the mean number of rule uses that one use of a rule
    leads to (a branching process) must have spectral radius below 1, or sampling may never stop."""
    import numpy as np  # only recursive grammars pay for the import

    names = reachable_rules(spec)
    index = {name: i for i, name in enumerate(names)}
    mean = np.zeros((len(names), len(names)))
    for name in names:
        alternatives = spec.rules[name].alternatives
        total = sum(alt.weight for alt in alternatives)
        for alt in alternatives:
            for ref in refs(alt.parts):
                mean[index[name], index[ref.rule]] += alt.weight / total
    radius = float(max(abs(np.linalg.eigvals(mean))))
    if radius >= 0.999:
        rule = spec.rules[cycle[0]]
        raise GrammarError(f"the recursion {' -> '.join(cycle)} would grow without end: on average each use leads "
                           f"to {radius:.2f} more (it must be below 1); give the alternatives that end the "
                           "recursion more weight", rule.file, rule.line, rule.name)


def metadata_keys(spec: GrammarSpec) -> list[str]:
    """The keys a prompt's metadata can have (a rule used twice in one prompt also gives `rule#2`, ...)."""
    rules = [name for name in reachable_rules(spec) if name != spec.start and spec.rules[name].recorded]
    return rules + list(spec.metadata)


def _check_condition(spec: GrammarSpec, condition: Condition, keys: list[str], what: str) -> None:
    for key, value in condition.values.items():
        repeat = _REPEAT_KEY.match(key)
        base = repeat.group(1) if repeat else key
        if base not in keys:
            raise GrammarError(f"{what} names {key!r}, which is not a metadata key of this grammar; "
                               f"metadata keys: {', '.join(keys)}", spec.file, condition.line, key)
        rule = spec.rules.get(base)
        if rule is not None and rule.is_word_list:
            values = [finish_text("".join(alt.parts)) for alt in rule.alternatives]  # as the rule produces them
            if value not in values:
                shown = ", ".join(values[:20]) + (", ..." if len(values) > 20 else "")
                raise GrammarError(f"{what}: {value!r} is not a value of rule {base!r} ({shown})",
                                   spec.file, condition.line, key)


def check_spec(spec: GrammarSpec) -> None:
    """Raise GrammarError for the first problem found; append non-fatal findings to `spec.warnings`."""
    if spec.start not in spec.rules:
        raise GrammarError(f"start rule {spec.start!r} is not defined; set `start:` or define a rule "
                           f"named {spec.start!r}", spec.file, None, spec.start)
    for rule in spec.rules.values():
        _check_rule(spec, rule)
    _check_termination(spec)
    cycle = recursive_cycle(spec)
    if cycle is not None:
        _check_expected_size(spec, cycle)
    for template in spec.metadata.values():
        for ref in template_refs(template):
            _check_ref(spec, ref, spec.file, template.line, template.key)
    keys = metadata_keys(spec)
    for names, line in spec.distinct:
        for name in names:
            if name not in keys:
                raise GrammarError(f"`distinct` names {name!r}, which is not a metadata key; metadata keys: "
                                   f"{', '.join(keys)}", spec.file, line, name)
    for condition in spec.exclude:
        _check_condition(spec, condition, keys, "`exclude`")
    if spec.heldout is not None:
        for condition in spec.heldout.combinations:
            _check_condition(spec, condition, keys, "`heldout.combinations`")
        for name in spec.heldout.by or []:
            if name not in keys:
                raise GrammarError(f"`heldout.by` names {name!r}, which is not a metadata key; metadata keys: "
                                   f"{', '.join(keys)}", spec.file, spec.heldout.line, name)
    used = set(reachable_rules(spec)) | {r.rule for t in spec.metadata.values() for r in template_refs(t)}
    for rule in spec.rules.values():
        if rule.name not in used:
            spec.warnings.append(f"{rule.file}:{rule.line}: rule {rule.name!r} is never used")
