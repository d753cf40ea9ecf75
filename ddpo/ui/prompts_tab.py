"""Tab 4, Prompts: browse the built-in grammars, sample prompts, see what is held out."""

from __future__ import annotations

import gradio as gr

from ddpo.ui.settings import AppSettings, UIError, check_int
from ddpo.ui.widgets import SPLITS, grammar_choices, load_builtin_grammar, readable_errors


def prompt_rows(prompts: list) -> tuple[list[str], list[list]]:
    """(headers, rows): the prompt text, then one column per metadata field."""
    keys: list[str] = []
    for p in prompts:
        keys += [k for k in p.metadata if k not in keys]
    return ["prompt", *keys], [[p.text, *(str(p.metadata.get(k, "")) for k in keys)] for p in prompts]


def grammar_info(name: str, max_rows: int) -> tuple[str, dict]:
    """(markdown: sizes and held-out rule, held-out prompts table)."""
    g = load_builtin_grammar(name)
    if g.is_finite:
        sizes = f"{g.count(None)} prompts: {g.count('train')} train, {g.count('heldout')} held out."
        headers, rows = prompt_rows(g.enumerate("heldout")[:max_rows])
        table = {"headers": headers, "data": rows or [[""] * len(headers)]}
    else:
        sizes = "Infinite grammar (recursive rules): prompts are sampled, not enumerated."
        table = {"headers": ["prompt"], "data": [["(not enumerable)"]]}
    return f"**{name}**: {sizes}\n\n{g.heldout_description}", table


def build(settings: AppSettings) -> None:
    lim = settings.limits
    grammars = grammar_choices()
    first = grammars[0] if grammars else None
    about0, heldout0 = grammar_info(first, lim.max_prompts_shown) if first else ("No grammars found.", None)
    with gr.Row():
        with gr.Column(scale=1):
            grammar = gr.Dropdown(grammars, value=first, label="Grammar", elem_id="prompts-grammar")
            split = gr.Radio(list(SPLITS), value="all", label="Split")
            n = gr.Slider(1, 100, value=10, step=1, label="Prompts to sample")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=lim.max_seed)
            sample = gr.Button("Sample", variant="primary", elem_id="prompts-sample")
            about = gr.Markdown(about0, elem_id="prompts-about")
        with gr.Column(scale=2):
            sampled = gr.Dataframe(label="Sampled prompts", interactive=False, elem_id="prompts-sampled")
            heldout = gr.Dataframe(heldout0, label="Held-out prompts", interactive=False, elem_id="prompts-heldout")

    @readable_errors
    def on_sample(name, split_name, count, seed_value):
        if split_name not in SPLITS:
            raise UIError(f"split {split_name!r} is not one of {', '.join(SPLITS)}")
        count = check_int("prompts to sample", count, 1, 100)
        seed_value = check_int("seed", seed_value, 0, lim.max_seed)
        headers, rows = prompt_rows(load_builtin_grammar(name).sample(count, seed=seed_value, split=SPLITS[split_name]))
        return {"headers": headers, "data": rows}

    sample.click(on_sample, [grammar, split, n, seed], sampled, api_name="sample_prompts")
    grammar.change(readable_errors(lambda name: grammar_info(name, lim.max_prompts_shown)), grammar,
                   [about, heldout], api_name="grammar_info")
    # a sample of the previous grammar would pass for one of this grammar
    grammar.change(lambda: None, None, sampled, api_name=False, queue=False, show_progress="hidden")
    seed.submit(on_sample, [grammar, split, n, seed], sampled, api_name=False)
