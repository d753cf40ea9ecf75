"""The grammar language: determinism, articles, metadata, enumeration, splits and the built-in grammars."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from prompts import Grammar, GrammarError, Prompt, list_grammars, load_grammar
from prompts.articles import indefinite_article, resolve_articles

SHAPES_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
SHAPES_RARE = [(color, "square") for color in ["red", "yellow", "green", "blue", "purple", "white"]]


def write_grammar(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def builtins() -> dict[str, Grammar]:
    return {name: load_grammar(name) for name in list_grammars()}


# -- determinism ---------------------------------------------------------------------------------

def test_sampling_is_deterministic_per_seed_and_prefix_stable(builtins):
    grammar = builtins["animal_scenes"]
    first = grammar.sample(50, seed=3)
    assert first == load_grammar("animal_scenes").sample(50, seed=3)  # a fresh load, same prompts
    assert grammar.sample(20, seed=3) == first[:20]
    assert grammar.sample(50, seed=4) != first
    assert grammar.sample(30, seed=3, split="heldout") == grammar.sample(30, seed=3, split="heldout")


def test_sampling_is_identical_in_a_fresh_interpreter(builtins):
    """No dependence on PYTHONHASHSEED or process state: the trainer and the UI draw the same prompts."""
    code = "from prompts import load_grammar; import json; print(json.dumps(load_grammar('counting').sample(20, 7, 'train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).parents[1]).stdout
    here = builtins["counting"].sample(20, 7, "train")
    assert [tuple(p) for p in json.loads(out)] == [(p.text, p.metadata) for p in here]


def test_weights_shape_the_distribution(tmp_path):
    grammar = load_grammar(write_grammar(tmp_path, """
        rules:
          prompt: ["{animal}"]
          animal:
            - {text: cat, weight: 3}
            - dog
    """))
    counts = Counter(p.text for p in grammar.sample(4000, seed=0))
    assert set(counts) == {"cat", "dog"}
    assert 0.72 < counts["cat"] / 4000 < 0.78  # 3:1 -> 0.75; 4000 draws give a std of 0.007


# -- articles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("word, article", [
    ("elephant", "an"), ("owl", "an"), ("unicorn", "a"), ("umbrella", "an"), ("hour", "an"), ("horse", "a"),
    ("European", "a"), ("one-eyed", "a"), ("honest", "an"), ("8", "an"), ("18", "an"), ("1", "a"), ("yak", "a"),
    ("Iguana", "an"), ("uninvited", "an"), ("useful", "a"),
])
def test_indefinite_article(word, article):
    assert indefinite_article(word) == article


def test_article_marker_agrees_across_rules_and_keeps_capitals(tmp_path):
    assert resolve_articles("A(n) owl met a(n) cat") == "An owl met a cat"
    grammar = load_grammar(write_grammar(tmp_path, """
        rules:
          prompt: ["a(n) {size} {animal}", "a(n) {animal}"]
          size: [old, big]
          animal: [elephant, horse]
    """))
    texts = {p.text for p in grammar.enumerate()}
    assert texts == {"an old elephant", "an old horse", "a big elephant", "a big horse", "an elephant", "a horse"}


def test_builtin_articles_agree(builtins):
    for prompt in builtins["animals_activities"].enumerate():
        article, animal = prompt.text.split(" ")[:2]
        assert article == indefinite_article(animal), prompt.text
    texts = {p.text for p in builtins["animals_activities"].enumerate()}
    assert {"an ant riding a bike", "a dolphin riding a bike", "an ant washing the dishes"} <= texts


# -- metadata ------------------------------------------------------------------------------------

def test_metadata_matches_text(builtins):
    for prompt in builtins["animals_activities"].enumerate():
        assert prompt.text.endswith(f"{prompt.metadata['animal']} {prompt.metadata['activity']}")
    for prompt in builtins["animal_scenes"].sample(300, seed=1):
        for key in ("subject", "activity"):
            assert prompt.metadata[key] in prompt.text
        assert prompt.metadata["animal"] in prompt.metadata["subject"]
        if "instrument" in prompt.metadata:
            assert prompt.metadata["activity"] == f"playing {prompt.metadata['instrument']}"
        assert "_style" not in prompt.metadata  # helper rules stay out
        json.dumps(prompt.metadata)  # JSON-serialisable


def test_counting_fields_and_vqa_metadata(builtins):
    words = ["one", "two", "three", "four", "five", "six"]
    prompts = builtins["counting"].enumerate()
    assert len(prompts) == 6 * 45
    by_text = {p.text: p.metadata for p in prompts}
    assert by_text["three mice"] == {
        "animal": "mouse", "number": 3,
        "questions": ["How many mice are there in this image?", "What animal is in this image?"],
        "answers": ["three", "mouse"]}
    assert by_text["one goose"]["answers"] == ["one", "goose"]
    for text, meta in by_text.items():
        assert text.split(" ", 1)[0] == words[meta["number"] - 1] == meta["answers"][0]


def test_repeated_rule_gets_numbered_keys_and_recursion_samples(tmp_path):
    grammar = load_grammar(write_grammar(tmp_path, """
        rules:
          prompt: ["a photo of {group}"]
          group:
            - {text: "a(n) {animal}", weight: 2}
            - "a(n) {animal} and {group}"
          animal: [owl, cat]
    """))
    assert not grammar.is_finite
    with pytest.raises(GrammarError, match="infinite .*group -> group"):
        grammar.enumerate()
    prompts = grammar.sample(200, seed=0)
    longest = max(prompts, key=lambda p: len(p.text))
    n_animals = longest.text.count(" and ") + 1
    assert n_animals >= 3
    animals = [longest.metadata["animal"]] + [longest.metadata[f"animal#{i}"] for i in range(2, n_animals + 1)]
    assert longest.text == "a photo of " + " and ".join(indefinite_article(a) + " " + a for a in animals)


# -- enumeration and splits ----------------------------------------------------------------------

def test_enumeration_counts(builtins):
    assert builtins["simple_animals"].count() == 45
    assert builtins["imagenet_animals"].count() == 398
    assert builtins["animals_activities"].count() == 45 * 3
    assert builtins["counting"].count() == 45 * 6
    for grammar in builtins.values():
        assert grammar.count() == grammar.count("train") + grammar.count("heldout")
        assert len({p.text for p in grammar.enumerate()}) == grammar.count()  # no duplicate prompts


def test_imagenet_animals_are_the_398_classes(builtins):
    names = [p.metadata["animal"] for p in builtins["imagenet_animals"].enumerate()]
    assert names[0] == "tench" and names[1] == "goldfish" and names[397] == "pufferfish"
    assert len(set(names)) == 398


def test_shapes_grammar_is_exactly_the_shapes_world(builtins):
    grammar = builtins["shapes"]
    prompts = grammar.enumerate()
    assert len(prompts) == 8 * 3 * 7 == 168
    for prompt in prompts:
        meta = prompt.metadata
        assert set(meta) == {"color", "shape", "background"}
        assert meta["color"] in SHAPES_COLORS and meta["background"] in SHAPES_COLORS
        assert meta["color"] != meta["background"]
        assert prompt.text == f"a {meta['color']} {meta['shape']} on a {meta['background']} background"
    heldout = grammar.enumerate("heldout")
    assert len(heldout) == 42
    assert {(p.metadata["color"], p.metadata["shape"]) for p in heldout} == set(SHAPES_RARE)
    assert not {(p.metadata["color"], p.metadata["shape"]) for p in grammar.enumerate("train")} & set(SHAPES_RARE)


def test_splits_are_disjoint_and_sampling_respects_them(builtins):
    for name, grammar in builtins.items():
        train = {p.text for p in grammar.enumerate("train")}
        heldout = {p.text for p in grammar.enumerate("heldout")}
        assert train and heldout and not train & heldout, name
        assert {p.text for p in grammar.sample(100, seed=0, split="heldout")} <= heldout, name
        assert {p.text for p in grammar.sample(100, seed=0, split="train")} <= train, name


def test_fraction_split_holds_out_whole_keys(builtins):
    grammar = builtins["animals_activities"]
    heldout_animals = {p.metadata["animal"] for p in grammar.enumerate("heldout")}
    train_animals = {p.metadata["animal"] for p in grammar.enumerate("train")}
    assert len(heldout_animals) == round(0.2 * 45) and not heldout_animals & train_animals
    assert grammar.count("heldout") == 3 * len(heldout_animals)  # every activity of a held-out animal
    scenes = builtins["animal_scenes"]
    pairs = {(p.metadata["animal"], p.metadata["activity"]) for p in scenes.sample(500, 0, "heldout")}
    train_pairs = {(p.metadata["animal"], p.metadata["activity"]) for p in scenes.sample(500, 0, "train")}
    assert not pairs & train_pairs
    assert "9 of the 45 values of (animal)" in grammar.heldout_description


def test_fraction_split_is_stable_when_the_grammar_grows(tmp_path):
    """Ranking keys by a seeded hash: adding words moves at most a few old words across the split."""
    animals = [f"animal{i}" for i in range(40)]
    template = "rules:\n  prompt: ['{{animal}}']\n  animal: [{}]\nheldout: {{fraction: 0.25, seed: 1}}\n"
    small = load_grammar(write_grammar(tmp_path, template.format(", ".join(animals)), "small.yaml"))
    large = load_grammar(write_grammar(tmp_path, template.format(", ".join(animals + ["newt", "yak"])), "large.yaml"))
    old_heldout = {p.text for p in small.enumerate("heldout")}
    new_heldout = {p.text for p in large.enumerate("heldout")} - {"newt", "yak"}
    assert len(old_heldout) == 10 and len(old_heldout ^ new_heldout) <= 2


def test_split_arguments_are_checked(builtins, tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        builtins["shapes"].sample(2, seed=0, split="test")
    plain = load_grammar(write_grammar(tmp_path, "rules:\n  prompt: [cat, dog]\n"))
    assert plain.count("train") == 2 and plain.count("heldout") == 0 and not plain.has_heldout
    with pytest.raises(GrammarError, match="no held-out split"):
        plain.sample(1, seed=0, split="heldout")
    np = pytest.importorskip("numpy")
    assert plain.sample(3, seed=np.int64(5)) == plain.sample(np.int32(3), seed=5)


def test_constraints_distinct_and_exclude(tmp_path):
    grammar = load_grammar(write_grammar(tmp_path, """
        rules:
          prompt: ["a {fg} dot on {bg}"]
          fg: &c [red, blue, green]
          bg: *c
        distinct: [[fg, bg]]
        exclude:
          - {fg: red, bg: blue}
    """))
    pairs = {(p.metadata["fg"], p.metadata["bg"]) for p in grammar.enumerate()}
    assert pairs == {("red", "green"), ("blue", "red"), ("blue", "green"), ("green", "red"), ("green", "blue")}
    assert {(p.metadata["fg"], p.metadata["bg"]) for p in grammar.sample(200, seed=0)} == pairs


def test_every_builtin_loads_and_samples(builtins):
    assert set(list_grammars()) >= {"simple_animals", "imagenet_animals", "animals_activities", "counting",
                                    "shapes", "animal_scenes"}
    for name, grammar in builtins.items():
        assert grammar.name == name and not grammar.warnings
        prompts = grammar.sample(5, seed=0)
        assert len(prompts) == 5 and all(isinstance(p, Prompt) and p.text for p in prompts)
        assert grammar.heldout_description


def test_a_grammar_loads_by_path_with_word_files_beside_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "words.txt").write_text("# comment\nmouse | mice | 2\n\nox | oxen | 1\n")
    path = write_grammar(tmp_path / "sub", """
        name: herd
        rules:
          prompt: ["many {beast.plural}"]
          beast: {words: words.txt, fields: [plural, weight]}
    """)
    grammar = load_grammar(str(path))
    assert grammar.name == "herd"
    assert [p.text for p in grammar.enumerate()] == ["many mice", "many oxen"]
    assert [p.metadata for p in grammar.enumerate()] == [{"beast": "mouse"}, {"beast": "ox"}]
    assert Counter(p.text for p in grammar.sample(900, seed=0))["many mice"] > 500  # weight 2:1


def test_shapes_grammar_agrees_with_the_shapes_world(builtins):
    """The Shapes world (another package) renders and parses these prompts: same words, same rare pairs."""
    world = pytest.importorskip("ddpo.shapes.world")
    grammar = builtins["shapes"]
    assert world.COLORS == SHAPES_COLORS and world.RARE_PAIRS == SHAPES_RARE
    for prompt in grammar.enumerate():
        meta = prompt.metadata
        assert prompt.text == world.caption(meta["color"], meta["shape"], meta["background"])
        assert world.parse_caption(prompt.text) == (meta["color"], meta["shape"], meta["background"])
        assert grammar.is_heldout(prompt) == ((meta["color"], meta["shape"]) in world.RARE_PAIRS)


def test_mixed_word_sources_helpers_braces_and_optional_metadata(tmp_path):
    (tmp_path / "more.txt").write_text("yak\n")
    grammar = load_grammar(write_grammar(tmp_path, """
        rules:
          prompt: ["{_frame} a(n) {animal}", "{animal} {{{{raw}}}}"]
          _frame: [a photo of]
          animal: {alternatives: [owl], words: more.txt}
        metadata:
          caption: "framed: {_frame}"
    """))
    prompts = {p.text: p.metadata for p in grammar.enumerate()}
    assert prompts == {
        "a photo of an owl": {"animal": "owl", "caption": "framed: a photo of"},
        "a photo of a yak": {"animal": "yak", "caption": "framed: a photo of"},
        "owl {{raw}}": {"animal": "owl"},
        "yak {{raw}}": {"animal": "yak"},
    }
