"""Whole-grammar checks, run when a grammar loads so that a broken grammar never fails mid-training.

Errors: undefined rules or fields, a rule that can never finish (a cycle with no way out), a rule that can
expand to more than MAX_PROMPT_CHARS characters or MAX_RULE_USES rule uses, or through more than MAX_DEPTH
nested rules, duplicate alternatives, inconsistent fields, an `a(n)` with nothing after it, and constraints or
held-out combinations that name keys or values the grammar cannot produce. Warnings: rules never used.
Every walk over the rules here is iterative, so a grammar of thousands of rules cannot exhaust Python's stack.
"""

from __future__ import annotations

import re

from prompts.articles import finish_text, has_dangling_marker
from prompts.spec import Condition, GrammarError, GrammarSpec, MetadataTemplate, Ref, Rule

_REPEAT_KEY = re.compile(r"^(.+)#([2-9]|[1-9][0-9]+)$")
# Bounds on one prompt, checked when a grammar loads (and again while sampling a recursive grammar, whose
# size is only bounded on average). Generous for prompts (CLIP reads 77 tokens), small for memory.
MAX_DEPTH = 200  # nested rules in one derivation
MAX_PROMPT_CHARS = 10_000  # characters of one prompt (of the text of any rule in it)
MAX_RULE_USES = 10_000  # rule expansions in one prompt


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


def _children(spec: GrammarSpec, name: str):
    return (ref.rule for alt in spec.rules[name].alternatives for ref in refs(alt.parts))


def recursive_cycle(spec: GrammarSpec) -> list[str] | None:
    """A cycle of rules reachable from the start rule (the grammar is then infinite), or None.

    A depth-first walk with an explicit stack (one iterator of references per rule on the current path)."""
    state: dict[str, int] = {spec.start: 1}  # 1: on the current path, 2: done
    path, stack = [spec.start], [_children(spec, spec.start)]
    while stack:
        for child in stack[-1]:
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state:
                state[child] = 1
                path.append(child)
                stack.append(_children(spec, child))
                break
        else:
            state[path.pop()] = 2
            stack.pop()
    return None


def _components(spec: GrammarSpec) -> list[list[str]]:
    """Strongly connected components of the rule graph (Tarjan's algorithm, iterative), each emitted after
    every component it refers to: the order in which sizes can be computed bottom-up."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in spec.rules:
        if root in index:
            continue
        work = [(root, _children(spec, root))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            name, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, _children(spec, child)))
                    break
                if child in on_stack:
                    low[name] = min(low[name], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[name])
                if low[name] == index[name]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == name:
                            break
                    components.append(component)
    return components


def _check_size(spec: GrammarSpec) -> None:
    """Refuse a rule that can expand to more than MAX_PROMPT_CHARS characters or MAX_RULE_USES rule uses, or
    through more than MAX_DEPTH nested rules: 41 rules `dN: "{dN+1} {dN+1}"` are a valid grammar whose one
    prompt has 2**40 words. Sizes are exact maxima for finite grammars; inside a recursion, references back into
    the recursion count as nothing (its size is bounded on average by `_check_expected_size`, and while sampling)."""
    chars: dict[str, int] = {}
    uses: dict[str, int] = {}
    depth: dict[str, int] = {}
    for component in _components(spec):
        members = set(component)
        for name in component:
            rule = spec.rules[name]
            chars[name] = uses[name] = depth[name] = 0
            for alt in rule.alternatives:
                outside = [ref for ref in refs(alt.parts) if ref.rule not in members]
                alt_chars = sum(len(part) for part in alt.parts if isinstance(part, str))
                alt_chars += sum(chars[r.rule] if r.field is None else _field_chars(spec, r) for r in outside)
                chars[name] = max(chars[name], alt_chars)
                uses[name] = max(uses[name], 1 + sum(uses[r.rule] for r in outside))
                depth[name] = max(depth[name], 1 + max((depth[r.rule] for r in outside), default=0))
            if depth[name] > MAX_DEPTH:
                raise GrammarError(f"a derivation from this rule can go {depth[name]} rules deep; the limit is "
                                   f"{MAX_DEPTH}. Shorten the chain of rules that refer to one another",
                                   rule.file, rule.line, name)
            for size, limit, what in [(chars[name], MAX_PROMPT_CHARS, "characters"),
                                      (uses[name], MAX_RULE_USES, "rule uses")]:
                if size > limit:
                    raise GrammarError(f"this rule can expand to {size:.3g} {what} in one prompt; the limit is "
                                       f"{limit}. A rule that uses another rule twice doubles its size: use fewer "
                                       "repeated references", rule.file, rule.line, name)


def _field_chars(spec: GrammarSpec, ref: Ref) -> int:
    return max(len(str(alt.fields[ref.field])) for alt in spec.rules[ref.rule].alternatives)


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
    """Every rule needs an alternative whose references all finish (a least fixed point over the rules, found
    with a work list: each alternative counts its references that are not known to finish yet)."""
    waiting: dict[tuple[str, int], set[str]] = {}  # (rule, alternative) -> referenced rules not known to finish
    users: dict[str, list[tuple[str, int]]] = {}  # rule -> the alternatives that refer to it
    ready: list[str] = []
    for rule in spec.rules.values():
        for i, alt in enumerate(rule.alternatives):
            waiting[rule.name, i] = {r.rule for r in refs(alt.parts)}
            for name in waiting[rule.name, i]:
                users.setdefault(name, []).append((rule.name, i))
            if not waiting[rule.name, i]:
                ready.append(rule.name)
    finishing: set[str] = set()
    while ready:
        name = ready.pop()
        if name in finishing:
            continue
        finishing.add(name)
        for user in users.get(name, []):
            waiting[user].discard(name)
            if not waiting[user] and user[0] not in finishing:
                ready.append(user[0])
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
    _check_size(spec)
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
