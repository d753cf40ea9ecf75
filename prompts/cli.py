"""`ddpo prompts list | sample GRAMMAR -n 10 --seed 0 [--split train|heldout] | check FILE`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from prompts import Grammar, GrammarError, check_prompt_lengths, list_grammars, load_grammar

CHECK_SAMPLES = 1000  # prompts drawn to check an infinite grammar's splits and lengths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo prompts", description="List, sample and check prompt grammars.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,sample,check}")
    commands.add_parser("list", help="the built-in grammars, their sizes and held-out splits")
    sample = commands.add_parser("sample", help="print prompts sampled from a grammar")
    sample.add_argument("grammar", help="a built-in grammar name or a grammar file path")
    sample.add_argument("-n", type=int, default=10,
                        help="number of prompts (default: 10), drawn independently by the grammar's weights, i.e. with "
                             "replacement: a prompt can repeat (see --unique)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument("--split", choices=["train", "heldout"], default=None, help="sample from one split only")
    sample.add_argument("--unique", action="store_true",
                        help="n different prompts (the first n distinct ones of the same draws); an error if the "
                             "grammar or split has fewer")
    sample.add_argument("--json", action="store_true", help="one JSON object per line: text and metadata")
    check = commands.add_parser("check", help="validate a grammar file and report its size, splits and warnings")
    check.add_argument("file", help="a grammar file path (or a built-in name)")
    check.add_argument("--tokenizer", default=None,
                       help="a local tokenizer folder, or a diffusers pipeline folder, to find prompts over its limit")
    check.add_argument("--max-tokens", type=int, default=None,
                       help="the text encoder's limit (default: the tokenizer's model_max_length, 77 for CLIP)")
    return parser


def _size(grammar: Grammar, split: str | None = None) -> str:
    return str(grammar.count(split)) if grammar.is_finite else "infinite"


def _list() -> int:
    rows = []
    for name in list_grammars():
        grammar = load_grammar(name)
        heldout = _size(grammar, "heldout") if grammar.has_heldout else "-"
        rows.append((name, _size(grammar), heldout, grammar.description))
    width = max(len(row[0]) for row in rows)
    print(f"{'name':<{width}}  {'prompts':>7}  {'heldout':>7}  description")
    for name, size, heldout, description in rows:
        print(f"{name:<{width}}  {size:>7}  {heldout:>7}  {description}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    if args.n < 0:
        print("ddpo prompts sample: -n must be 0 or more", file=sys.stderr)
        return 2
    grammar = load_grammar(args.grammar)
    drawn = (_distinct(grammar, args.n, args.seed, args.split) if args.unique
             else grammar.sample(args.n, seed=args.seed, split=args.split))
    for prompt in drawn:
        print(json.dumps({"text": prompt.text, "metadata": prompt.metadata}) if args.json else prompt.text)
    return 0


def _distinct(grammar: Grammar, n: int, seed: int, split: str | None) -> list:
    """The first `n` distinct prompts of `grammar.sample(m, seed, split)` for growing m (the first k of a sample do
    not depend on m), so `--unique` keeps the weights' order of appearance. Raises if there are fewer than n."""
    where = f"the {split} split of {grammar.name!r}" if split else repr(grammar.name)
    if grammar.is_finite and grammar.count(split) < n:
        raise ValueError(f"--unique -n {n}: {where} has only {grammar.count(split)} different prompts")
    m = max(2 * n, 16)
    while True:
        seen: dict[str, object] = {}
        for prompt in grammar.sample(m, seed=seed, split=split):
            seen.setdefault(prompt.text, prompt)
            if len(seen) == n:
                return list(seen.values())
        if m >= max(100 * n, 10_000):  # rare prompts of an infinite grammar: give up rather than loop for long
            raise ValueError(f"--unique -n {n}: found only {len(seen)} different prompts of {where} in {m} draws")
        m *= 4


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer  # heavy: only when asked for

    folder = Path(path)
    if (folder / "tokenizer").is_dir():  # a diffusers pipeline folder
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise GrammarError(f"tokenizer folder {str(folder)!r} not found; give a local folder (no hub downloads here)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) == 0:  # offline, a folder without vocabulary files loads as an empty tokenizer
        raise GrammarError(f"{str(folder)!r} holds no tokenizer vocabulary")
    return tokenizer


def _check(args: argparse.Namespace) -> int:
    grammar = load_grammar(args.file)
    findings = list(grammar.warnings)
    print(f"{grammar.spec.file}: grammar {grammar.name!r} is valid")
    print(f"  rules: {len(grammar.spec.rules)}; metadata keys: {', '.join(grammar.metadata_keys)}")
    if grammar.is_finite:
        prompts = grammar.enumerate()
        duplicates = len(prompts) - len({p.text for p in prompts})
        print(f"  prompts: {len(prompts)}" + (f" ({duplicates} texts appear more than once)" if duplicates else ""))
    else:
        prompts = grammar.sample(CHECK_SAMPLES, seed=0)
        print(f"  prompts: infinite (recursive rules); checked {CHECK_SAMPLES} samples")
    if grammar.has_heldout:
        heldout = sum(grammar.is_heldout(p) for p in prompts)
        print(f"  split: {len(prompts) - heldout} train, {heldout} held out" + ("" if grammar.is_finite else " (of the samples)"))
        print("  " + grammar.heldout_description.replace("\n", "\n  "))
        if heldout in (0, len(prompts)):
            findings.append("one split is empty: the held-out split holds " + ("no" if heldout == 0 else "every") + " prompt")
    else:
        print("  split: none (add a `heldout:` section for held-out evaluation)")
    if args.tokenizer:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            too_long = check_prompt_lengths(prompts, _load_tokenizer(args.tokenizer), max_length=args.max_tokens)
        for text, n_tokens in too_long[:10]:
            findings.append(f"{n_tokens} tokens, over the text encoder's limit: {text!r}")
        if len(too_long) > 10:
            findings.append(f"... and {len(too_long) - 10} more prompts over the limit")
    for warning in findings:
        print(f"  warning: {warning}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return int(exc.code or 0)
    try:
        if args.command == "list":
            return _list()
        if args.command == "sample":
            return _sample(args)
        return _check(args)
    except (GrammarError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
