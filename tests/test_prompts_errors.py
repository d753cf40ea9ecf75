"""Bad grammars fail when they load, with the file, line and name of what is wrong."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest

from prompts import GrammarError, check_prompt_lengths, load_grammar
from prompts.lengths import PromptLengthWarning


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# (grammar text, line, name, a fragment of the message); lines count from 1 in the dedented text.
BAD_GRAMMARS = {
    "undefined rule": ("""
        rules:
          prompt: ["a(n) {animal} {activity}"]
          animal: [cat]
        """, 2, "prompt", "undefined rule 'activity'"),
    "cycle with no way out": ("""
        rules:
          prompt: ["{a}", "plain"]
          a: ["x {b}"]
          b: ["y {a}"]
        """, 3, "a", "cycle a -> b -> a"),
    "empty rule": ("""
        rules:
          prompt: ["{animal}"]
          animal: []
        """, 3, "animal", "no alternatives"),
    "empty alternative": ("""
        rules:
          prompt:
            - "{animal}"
            - "  "
          animal: [cat]
        """, 4, "prompt", "empty alternative"),
    "zero weight": ("""
        rules:
          prompt:
            - {text: cat, weight: 0}
        """, 3, "prompt", "weight must be a positive number, got 0"),
    "negative weight": ("""
        rules:
          prompt:
            - dog
            - {text: cat, weight: -1.5}
        """, 4, "prompt", "got -1.5"),
    "text weight": ("""
        rules:
          prompt:
            - {text: cat, weight: heavy}
        """, 3, "prompt", "got 'heavy'"),
    "duplicate rule": ("""
        rules:
          prompt: ["{animal}"]
          animal: [cat]
          animal: [dog]
        """, 4, "animal", "duplicate name 'animal'"),
    "duplicate alternative": ("""
        rules:
          prompt:
            - cat
            - dog
            - cat
        """, 5, "prompt", "duplicate alternative 'cat'"),
    "missing word file": ("""
        rules:
          prompt: ["{animal}"]
          animal: {words: no_such_file.txt}
        """, 3, "animal", "word file"),
    "metadata key shadows a rule": ("""
        rules:
          prompt: ["{animal}"]
          animal: [cat]
        metadata:
          animal: "{animal}"
        """, 5, "animal", "must be a new name"),
    "unknown field": ("""
        rules:
          prompt: ["{animal.plural}"]
          animal: [cat]
        """, 2, "prompt", "has no field 'plural'"),
    "inconsistent fields": ("""
        rules:
          prompt: ["{n}"]
          n:
            - {text: one, value: 1}
            - {text: two, vaule: 2}
        """, 5, "n", "same fields"),
    "dangling article": ("""
        rules:
          prompt: ["{animal} eats a(n)"]
          animal: [cat]
        """, 2, "prompt", "a(n)"),
    "unbalanced brace": ("""
        rules:
          prompt: ["{animal"]
        """, 2, "prompt", "unbalanced"),
    "heldout value that cannot occur": ("""
        rules:
          prompt: ["a {color} {shape}"]
          color: [red, purple]
          shape: [circle]
        heldout:
          combinations:
            - {color: purpel, shape: circle}
        """, 7, "color", "'purpel' is not a value of rule 'color'"),
    "heldout key that is not metadata": ("""
        rules:
          prompt: ["a {color}"]
          color: [red]
        heldout:
          combinations:
            - {colour: red}
        """, 6, "colour", "not a metadata key"),
    "recursion that grows": ("""
        rules:
          prompt: ["{list}"]
          list:
            - cat
            - {text: "{list} and {list}", weight: 2}
        """, 3, "list", "grow without end"),
    "unknown top-level key": ("""
        rules:
          prompt: [cat]
        held_out: {fraction: 0.5}
        """, 3, "held_out", "unknown key 'held_out'"),
    "fraction out of range": ("""
        rules:
          prompt: [cat, dog]
        heldout: {fraction: 1.5}
        """, 3, None, "between 0 and 1"),
}


@pytest.mark.parametrize("case", list(BAD_GRAMMARS))
def test_bad_grammar_fails_at_load_with_file_line_and_name(tmp_path, case):
    text, line, name, fragment = BAD_GRAMMARS[case]
    path = write(tmp_path, text)
    with pytest.raises(GrammarError) as info:
        load_grammar(path)
    error = info.value
    assert (error.file, error.line, error.name) == (str(path), line, name), str(error)
    assert fragment in error.message
    assert str(error).startswith(f"{path}:{line}: ")


def test_word_file_errors_name_the_word_file_line(tmp_path):
    (tmp_path / "words.txt").write_text("cat | cats\n# a comment\ndog\n")
    path = write(tmp_path, """
        rules:
          prompt: ["{animal.plural}"]
          animal: {words: words.txt, fields: [plural]}
        """)
    with pytest.raises(GrammarError) as info:
        load_grammar(path)
    assert (info.value.file, info.value.line, info.value.name) == (str(tmp_path / "words.txt"), 3, "animal")
    assert "expected 2 column(s)" in info.value.message
    (tmp_path / "words.txt").write_text("cat | 1\ndog | 0\n")
    path.write_text("rules:\n  prompt: ['{animal}']\n  animal: {words: words.txt, fields: [weight]}\n")
    with pytest.raises(GrammarError, match=r"words.txt:2: 'animal': weight must be a positive"):
        load_grammar(path)
    (tmp_path / "words.txt").write_text("# only comments\n\n")
    with pytest.raises(GrammarError, match="no alternatives"):
        load_grammar(path)


def test_yaml_syntax_error_and_unknown_name(tmp_path):
    path = write(tmp_path, "rules:\n  prompt: [cat\n  other: dog\n")
    with pytest.raises(GrammarError, match="not valid YAML") as info:
        load_grammar(path)
    assert info.value.file == str(path) and info.value.line is not None
    with pytest.raises(GrammarError, match="built-in grammars: .*shapes"):
        load_grammar("no_such_grammar")
    with pytest.raises(GrammarError, match="start rule 'prompt' is not defined"):
        load_grammar(write(tmp_path, "rules:\n  animal: [cat]\n", "nostart.yaml"))


def test_unused_rule_is_a_warning_not_an_error(tmp_path):
    grammar = load_grammar(write(tmp_path, "rules:\n  prompt: [cat]\n  spare: [dog]\n"))
    assert grammar.warnings == [f"{tmp_path / 'bad.yaml'}:3: rule 'spare' is never used"]


def test_sample_and_enumerate_arguments(tmp_path):
    grammar = load_grammar("shapes")
    with pytest.raises(ValueError, match="n must be"):
        grammar.sample(-1, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        grammar.sample(2.5, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        grammar.sample(3, seed="zero")
    assert grammar.sample(0, seed=0) == []
    empty_heldout = load_grammar(write(tmp_path, """
        rules:
          prompt: ["{a} {b}"]
          a: [x, y]
          b: [u, v]
        exclude:
          - {a: x, b: u}
        heldout:
          combinations:
            - {a: x, b: u}
        """))
    assert empty_heldout.count("heldout") == 0 and empty_heldout.count() == 3
    with pytest.raises(GrammarError, match="split 'heldout'.*empty or very rare"):
        empty_heldout.sample(1, seed=0, split="heldout")


class CharTokenizer:
    """A stand-in for CLIP's tokenizer: one token per character, plus start and end tokens."""

    model_max_length = 77

    def __call__(self, texts, truncation=False):
        assert truncation is False
        return {"input_ids": [[0] + [1] * len(text) + [2] for text in texts]}


def test_long_prompts_are_reported_not_cut():
    short, long = "a cat", "a " + "very " * 20 + "long cat"  # 5 + 2 and 85 + 2 tokens
    with pytest.warns(PromptLengthWarning, match=r"1 prompt\(s\) are longer than the text encoder's 77 tokens"):
        too_long = check_prompt_lengths([short, long, long], CharTokenizer())
    assert too_long == [(long, len(long) + 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_prompt_lengths([short], CharTokenizer()) == []
    with pytest.raises(ValueError, match="max_length"):
        check_prompt_lengths([short], object())


def _chain(tmp_path: Path, name: str, n: int, template: str) -> Path:
    """rules d0 .. d{n}: each d{i} expands `template` with {next} = {d{i+1}}; d{n} is a word."""
    lines = ["rules:", "  prompt: '{d0}'"]
    lines += [f"  d{i}: '{template.format(next='{d%d}' % (i + 1))}'" for i in range(n)]
    path = tmp_path / name
    path.write_text("\n".join(lines + [f"  d{n}: word", ""]))
    return path


def test_a_rule_that_doubles_41_times_is_refused_at_load_naming_the_rule(tmp_path):
    # dN: "{dN+1} {dN+1}" is a valid grammar whose only prompt has 2**41 words; d30's text is the first past 10000
    # characters (d41 = "word", 4 characters; each level doubles and adds a space: 5 * 2**11 - 1 = 10239).
    path = _chain(tmp_path, "double.yaml", 41, "{next} {next}")
    with pytest.raises(GrammarError) as info:
        load_grammar(path)
    assert (info.value.file, info.value.line, info.value.name) == (str(path), 33, "d30")
    assert "can expand to 1.02e+04 characters in one prompt; the limit is 10000" in info.value.message
    assert load_grammar(_chain(tmp_path, "ok.yaml", 10, "{next} {next}")).sample(1, seed=0)[0].text.count("word") == 1024


def test_a_2000_rule_chain_is_a_grammar_error_not_a_recursion_error(tmp_path):
    path = _chain(tmp_path, "chain.yaml", 2000, "x {next}")
    with pytest.raises(GrammarError) as info:
        load_grammar(path)
    assert info.value.name == "d1800" and "can go 201 rules deep; the limit is 200" in info.value.message
    assert len(load_grammar(_chain(tmp_path, "short.yaml", 150, "x {next}")).sample(1, seed=0)[0].text.split()) == 151


def test_ddpo_prompts_check_refuses_the_doubling_grammar(tmp_path, capsys):
    from ddpo.cli import main

    path = _chain(tmp_path, "double.yaml", 41, "{next} {next}")
    assert main(["prompts", "check", str(path)]) == 1
    assert "'d30': this rule can expand to" in capsys.readouterr().err


def test_sampling_a_recursive_grammar_stops_at_the_size_limits(tmp_path, monkeypatch):
    import prompts.grammar

    # Each use of `l` doubles with probability 1/3 (on average 0.67 uses per use: it passes the load check), and
    # `w` is 4000 characters: three copies are past the limit.
    wide = write(tmp_path, "rules:\n  prompt: '{l}'\n  l:\n    - '{w}'\n    - {text: '{l} {l}', weight: 0.5}\n"
                           f"  w: [{'x' * 4000}]\n", "wide.yaml")
    with pytest.raises(GrammarError, match=r"'l': a derivation produced 12002 characters, more than the 10000"):
        load_grammar(wide).sample(20, seed=0)
    many = write(tmp_path, "rules:\n  prompt: '{l}'\n  l:\n    - a\n    - {text: '{l}{l}{l}{l}', weight: 0.3}\n", "many.yaml")
    grammar = load_grammar(many)
    sizes = [len(p.text) for p in grammar.sample(200, seed=0)]
    monkeypatch.setattr(prompts.grammar, "MAX_RULE_USES", max(sizes))  # below the largest draw's rule uses
    with pytest.raises(GrammarError, match=rf"a derivation used more than {max(sizes)} rules"):
        grammar.sample(200, seed=0)
