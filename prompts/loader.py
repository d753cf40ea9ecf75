"""Read a grammar YAML file (and its word files) into a `GrammarSpec`, keeping file and line for every error.

PyYAML's `safe_load` forgets line numbers and silently keeps the last of two duplicate keys, so this
module walks the composed node tree itself. Checks that need the whole grammar live in `prompts.checks`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from prompts.spec import (Alternative, Condition, GrammarError, GrammarSpec, HeldOut, MetadataTemplate, Rule,
                          parse_template)

TOP_KEYS = ("name", "description", "start", "rules", "distinct", "exclude", "metadata", "heldout")
RULE_KEYS = ("words", "alternatives", "fields")
HELDOUT_KEYS = ("combinations", "fraction", "seed", "by", "description")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Reader:
    """Turns YAML nodes into values, with the grammar file's name and the node's line in every error."""

    def __init__(self, path: Path):
        self.path = path
        self.file = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GrammarError(f"cannot read the grammar file: {exc}", self.file) from exc
        self.loader = yaml.SafeLoader(text)
        try:
            self.root = self.loader.get_single_node()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise GrammarError(f"not valid YAML: {problem}", self.file, mark.line + 1 if mark else None) from exc
        finally:
            self.loader.dispose()

    def error(self, message: str, node: yaml.Node | None, name: str | None = None) -> GrammarError:
        return GrammarError(message, self.file, node.start_mark.line + 1 if node is not None else None, name)

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, name: str | None = None) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) in file order; keys must be strings and unique."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"{what} must be a mapping of `key: value` lines", node, name)
        seen: dict[str, int] = {}
        items = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.error(f"{what}: key {key!r} must be a name", key_node, name)
            if key in seen:
                raise self.error(f"duplicate name {key!r} in {what} (first defined on line {seen[key]})", key_node, key)
            seen[key] = key_node.start_mark.line + 1
            items.append((key, key_node, value_node))
        return items

    def known_keys(self, items: list, allowed: tuple[str, ...], what: str) -> None:
        for key, key_node, _ in items:
            if key not in allowed:
                raise self.error(f"unknown key {key!r} in {what}; valid keys: {', '.join(allowed)}", key_node, key)

    def string(self, node: yaml.Node, what: str, name: str | None = None) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.error(f"{what} must be a text value", node, name)
        return node.value  # the text as written: `- 3` is the word "3", `- no` the word "no"

    def names(self, node: yaml.Node, what: str, name: str | None = None) -> list[str]:
        if isinstance(node, yaml.ScalarNode):
            node_values = [node]
        elif isinstance(node, yaml.SequenceNode):
            node_values = node.value
        else:
            raise self.error(f"{what} must be a name or a list of names", node, name)
        values = [self.string(n, what, name) for n in node_values]
        for value, value_node in zip(values, node_values):
            if not NAME.match(value):
                raise self.error(f"{what}: {value!r} is not a valid name (letters, digits, _)", value_node, name)
        return values


def check_weight(weight: Any, file: str, line: int, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        hint = "; remove the alternative instead of giving it weight 0" if weight == 0 else ""
        raise GrammarError(f"weight must be a positive number, got {weight!r}{hint}", file, line, name)
    return float(weight)


def _alternative(reader: _Reader, node: yaml.Node, rule: str) -> Alternative:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        items = {key: value for key, _, value in reader.mapping(node, f"an alternative of rule {rule!r}", rule)}
        if "text" not in items:
            raise reader.error("an alternative written as a mapping needs a `text:` key", node, rule)
        text = reader.string(items.pop("text"), "`text`", rule)
        weight = check_weight(reader.value(items.pop("weight")), reader.file, line, rule) if "weight" in items else 1.0
        fields = {key: reader.value(value) for key, value in items.items()}
    else:
        text, weight, fields = reader.string(node, f"an alternative of rule {rule!r}", rule), 1.0, {}
    return _make_alternative(text, weight, fields, reader.file, line, rule)


def _make_alternative(text: str, weight: float, fields: dict, file: str, line: int, rule: str) -> Alternative:
    if not text.strip():
        raise GrammarError("empty alternative; every alternative must produce some text (to make a part "
                           "optional, give the parent rule one alternative with it and one without)", file, line, rule)
    return Alternative(text, parse_template(text, file, line, rule), weight, fields, file, line)


def read_word_file(path: Path, fields: list[str], grammar_file: str, line: int, rule: str) -> list[Alternative]:
    """One alternative per line; `#` comments and blank lines skipped; `text | field | ...` columns."""
    if not path.is_file():
        raise GrammarError(f"word file {str(path)!r} not found (paths are relative to the grammar file)",
                           grammar_file, line, rule)
    alternatives = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        columns = [column.strip() for column in raw.split("|")]
        if len(columns) != 1 + len(fields):
            expected = " | ".join(["text"] + fields)
            raise GrammarError(f"expected {1 + len(fields)} column(s) `{expected}`, got {len(columns)}: {raw!r}",
                               str(path), number, rule)
        values: dict[str, Any] = dict(zip(fields, columns[1:]))
        weight = 1.0
        if "weight" in values:
            text_weight = values.pop("weight")
            try:
                weight = float(text_weight)
            except ValueError:
                raise GrammarError(f"weight must be a number, got {text_weight!r}", str(path), number, rule) from None
            weight = check_weight(weight, str(path), number, rule)
        alternatives.append(_make_alternative(columns[0], weight, values, str(path), number, rule))
    return alternatives


def _rule(reader: _Reader, name: str, key_node: yaml.Node, node: yaml.Node) -> Rule:
    if not NAME.match(name):
        raise reader.error(f"rule name {name!r} must be letters, digits and _ (not starting with a digit)", key_node, name)
    if isinstance(node, yaml.ScalarNode):
        alternatives = [_alternative(reader, node, name)]
    elif isinstance(node, yaml.SequenceNode):
        alternatives = [_alternative(reader, item, name) for item in node.value]
    elif isinstance(node, yaml.MappingNode):
        items = reader.mapping(node, f"rule {name!r}", name)
        reader.known_keys(items, RULE_KEYS, f"rule {name!r}")
        parts = {key: value for key, _, value in items}
        fields = reader.names(parts["fields"], "`fields`", name) if "fields" in parts else []
        alternatives = []
        if "alternatives" in parts:
            value = parts["alternatives"]
            if not isinstance(value, yaml.SequenceNode):
                raise reader.error("`alternatives` must be a list", value, name)
            alternatives += [_alternative(reader, item, name) for item in value.value]
        if "words" in parts:
            words_node = parts["words"]
            path = reader.path.parent / reader.string(words_node, "`words` (a word file path)", name)
            alternatives += read_word_file(path, fields, reader.file, words_node.start_mark.line + 1, name)
        elif "fields" in parts:
            raise reader.error("`fields` names the columns of a word file; this rule has no `words:`", node, name)
    else:
        raise reader.error("a rule is a text, a list of alternatives, or a mapping with `words:`", node, name)
    if not alternatives:
        raise reader.error("rule has no alternatives; give it at least one", node, name)
    return Rule(name, alternatives, reader.file, key_node.start_mark.line + 1)


def _condition(reader: _Reader, node: yaml.Node, what: str) -> Condition:
    items = reader.mapping(node, what)
    if not items:
        raise reader.error(f"{what} is empty; list at least one `key: value`", node)
    values = {key: reader.string(value, f"the value of {key!r} in {what}", key) for key, _, value in items}
    return Condition(values, node.start_mark.line + 1)


def _conditions(reader: _Reader, node: yaml.Node, what: str) -> list[Condition]:
    if not isinstance(node, yaml.SequenceNode):
        raise reader.error(f"`{what}` must be a list of `{{key: value, ...}}` mappings", node)
    return [_condition(reader, item, f"an entry of `{what}`") for item in node.value]


def _heldout(reader: _Reader, node: yaml.Node) -> HeldOut:
    items = reader.mapping(node, "`heldout`")
    reader.known_keys(items, HELDOUT_KEYS, "`heldout`")
    parts = {key: value for key, _, value in items}
    heldout = HeldOut(line=node.start_mark.line + 1)
    if ("combinations" in parts) == ("fraction" in parts):
        raise reader.error("`heldout` needs exactly one of `combinations:` (a list) or `fraction:` (a number)", node)
    if "combinations" in parts:
        heldout.combinations = _conditions(reader, parts["combinations"], "combinations")
        if not heldout.combinations:
            raise reader.error("`combinations` is empty; list at least one combination", parts["combinations"])
    else:
        fraction = reader.value(parts["fraction"])
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise reader.error(f"`fraction` must be a number between 0 and 1 (exclusive), got {fraction!r}", parts["fraction"])
        heldout.fraction = float(fraction)
        heldout.by = reader.names(parts["by"], "`by`") if "by" in parts else None
    if "seed" in parts:
        seed = reader.value(parts["seed"])
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise reader.error(f"`seed` must be an integer, got {seed!r}", parts["seed"])
        heldout.seed = seed
    if "description" in parts:
        heldout.description = reader.string(parts["description"], "`description`")
    return heldout


def read_spec(path: str | Path) -> GrammarSpec:
    """Parse one grammar file into a `GrammarSpec` (per-item checks only; see `prompts.checks.check_spec`)."""
    reader = _Reader(Path(path))
    if reader.root is None:
        raise GrammarError("the grammar file is empty; it needs at least a `rules:` section", reader.file)
    items = reader.mapping(reader.root, "the grammar file")
    reader.known_keys(items, TOP_KEYS, "the grammar file")
    top = {key: value for key, _, value in items}
    if "rules" not in top:
        raise reader.error("the grammar file needs a `rules:` section", reader.root)
    rules = {name: _rule(reader, name, key_node, node) for name, key_node, node in reader.mapping(top["rules"], "`rules`")}
    metadata = {}
    for key, key_node, node in reader.mapping(top["metadata"], "`metadata`") if "metadata" in top else []:
        if not NAME.match(key) or key in rules:
            raise reader.error(f"metadata key {key!r} must be a new name (letters, digits, _), not a rule's", key_node, key)
        is_list = isinstance(node, yaml.SequenceNode)
        line = node.start_mark.line + 1
        texts = [reader.string(item, "a metadata template", key) for item in (node.value if is_list else [node])]
        templates = tuple(parse_template(text, reader.file, line, key) for text in texts)
        metadata[key] = MetadataTemplate(key, templates, is_list, line)
    distinct = []
    if "distinct" in top:
        if not isinstance(top["distinct"], yaml.SequenceNode):
            raise reader.error("`distinct` must be a list of lists of names, e.g. [[color, background]]", top["distinct"])
        for group in top["distinct"].value:
            names = reader.names(group, "an entry of `distinct`")
            if len(names) < 2 or len(set(names)) != len(names):
                raise reader.error(f"an entry of `distinct` needs two or more different names, got {names}", group)
            distinct.append((names, group.start_mark.line + 1))
    return GrammarSpec(
        name=reader.string(top["name"], "`name`") if "name" in top else reader.path.stem,
        file=reader.file,
        description=reader.string(top["description"], "`description`") if "description" in top else "",
        start=reader.string(top["start"], "`start`") if "start" in top else "prompt",
        rules=rules,
        distinct=distinct,
        exclude=_conditions(reader, top["exclude"], "exclude") if "exclude" in top else [],
        metadata=metadata,
        heldout=_heldout(reader, top["heldout"]) if "heldout" in top else None,
    )
