"""`ddpo prompts list | sample | check`, called the way `ddpo` calls them (argv in, exit code out)."""

from __future__ import annotations

import json
import textwrap

from ddpo.cli import main as ddpo_main
from prompts import load_grammar
from prompts.cli import main


def test_list_shows_every_builtin_with_sizes(capsys):
    assert main(["list"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["shapes"] == ["168", "42"]
    assert rows["animals_activities"] == ["135", "27"]
    assert rows["imagenet_animals"][0] == "398" and rows["simple_animals"][0] == "45"
    assert {"counting", "animal_scenes"} <= set(rows)


def test_sample_prints_the_library_prompts(capsys):
    assert ddpo_main(["prompts", "sample", "shapes", "-n", "6", "--seed", "2", "--split", "heldout"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [p.text for p in load_grammar("shapes").sample(6, seed=2, split="heldout")]
    assert main(["sample", "counting", "-n", "3", "--seed", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["text"], r["metadata"]) for r in rows] == [tuple(p) for p in load_grammar("counting").sample(3, seed=0)]


def test_sample_is_with_replacement_and_unique_gives_distinct_prompts(capsys):
    assert main(["sample", "shapes", "-n", "3", "--seed", "0", "--split", "heldout"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert len(set(plain)) < 3  # with replacement: this draw repeats a prompt
    assert main(["sample", "shapes", "-n", "3", "--seed", "0", "--split", "heldout", "--unique"]) == 0
    unique = capsys.readouterr().out.splitlines()
    assert len(set(unique)) == 3 and unique[0] == plain[0]  # the first distinct prompts of the same draws
    assert main(["sample", "shapes", "-n", "42", "--split", "heldout", "--unique"]) == 0
    assert len(set(capsys.readouterr().out.splitlines())) == 42  # every held-out prompt
    assert main(["sample", "shapes", "-n", "43", "--split", "heldout", "--unique"]) == 1
    assert "the heldout split of 'shapes' has only 42 different prompts" in capsys.readouterr().err
    assert main(["sample", "--help"]) == 0
    assert "with replacement" in " ".join(capsys.readouterr().out.split())


def test_sample_errors_have_exit_codes(capsys):
    assert main(["sample", "no_such_grammar"]) == 1
    assert "built-in grammars:" in capsys.readouterr().err
    assert main(["sample", "shapes", "--split", "test"]) == 2
    assert main(["sample", "shapes", "-n", "-3"]) == 2
    assert main([]) == 2


def test_check_reports_size_split_and_warnings(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(textwrap.dedent("""
        rules:
          prompt: ["a(n) {animal} {place}"]
          animal: [owl, cat, yak, emu]
          place: [at home, in space]
          unused: [nothing]
        heldout:
          combinations:
            - {animal: owl}
    """))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "prompts: 8" in out and "split: 6 train, 2 held out" in out
    assert "rule 'unused' is never used" in out


def test_check_fails_on_a_bad_file_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  prompt: ['{animal} {activity}']\n  animal: [cat]\n")
    assert main(["check", str(path)]) == 1
    assert f"error: {path}:2: 'prompt': undefined rule 'activity'" in capsys.readouterr().err


def test_check_with_a_tokenizer_reports_long_prompts(tmp_path, capsys):
    from transformers import CLIPTokenizer

    from ddpo.tiny import write_tiny_tokenizer

    folder = write_tiny_tokenizer(tmp_path / "vocab")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(tmp_path / "nolimit")
    path = tmp_path / "long.yaml"  # the tiny tokenizer has one token per character
    path.write_text("rules:\n  prompt: ['{animal}']\n  animal: [owl, " + "x" * 80 + "]\n")
    assert main(["check", str(path), "--tokenizer", str(tmp_path / "pipe")]) == 0
    out = capsys.readouterr().out
    assert "warning: 82 tokens, over the text encoder's limit: 'xxxx" in out and "'owl'" not in out
    assert main(["check", str(path), "--tokenizer", str(tmp_path / "pipe"), "--max-tokens", "4"]) == 0
    assert "warning: 5 tokens, over the text encoder's limit: 'owl'" in capsys.readouterr().out
    assert main(["check", str(path), "--tokenizer", str(tmp_path / "nolimit")]) == 1
    assert "pass max_length=77" in capsys.readouterr().err
    assert main(["check", str(path), "--tokenizer", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
