"""The `sd3` family's text tokens on `shapes-flow`: 16 CLIP tokens + 256 zero tokens (the full sequence, diffusers'
standard attention) against 16 + 1 counted 256 times (ddpo/families/attention.py). Prints one JSON object.

    python benchmarks/flow_text_tokens.py [--repeats 15]

Two calls of `family.predict` at shapes_flow_alignment's sizes, LoRA rank 8 on the preset's targets attached:
- `sample`: no gradient, 16 latents with CFG (guidance 2): one transformer call of 32 rows, as each sampling step;
- `train`: forward + backward of 16 latents x 3 timesteps with CFG (96 rows), as the preset's one call per
  micro-batch (`train.timesteps_per_call: 3`, `train.cfg: true`).
One torch thread. The two variants alternate (ABBA order per repeat) so that a shared machine's load falls on both;
`ratio` is the median of the per-repeat ratios full / repeated, the figure to quote on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PROMPTS = ["a red square on a blue background", "a green circle on a white background",
           "a purple triangle on a yellow background", "a black square on an orange background"]


def setup():
    """The family with LoRA, and per variant (cond, negative) for 48 latents (the training call's rows)."""
    from ddpo.families import load_family
    from ddpo.pipeline import prepare_denoiser

    family = load_family("shapes-flow")
    prepare_denoiser(family.denoiser, use_lora=True, rank=8, alpha=8, target_modules=LORA_TARGETS,
                     gradient_checkpointing=False, attention="sdpa")
    prompts = PROMPTS * 12
    conds = {}
    for variant in ("repeated", "full"):
        family.repeated_tokens = variant == "repeated"
        conds[variant] = family.encode(prompts, "cpu"), family.encode([""], "cpu").expand(len(prompts))
    return family, conds


def sample_call(family, cond, negative, latents, times) -> None:
    with torch.no_grad():
        family.predict(family.denoiser, latents[:16], times[:16], cond.rows(torch.arange(16)),
                       negative.rows(torch.arange(16)), 2.0)


def train_call(family, cond, negative, latents, times) -> None:
    family.denoiser.zero_grad(set_to_none=True)
    family.predict(family.denoiser, latents, times, cond, negative, 2.0).square().mean().backward()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(family, conds, fn, repeats: int) -> dict:
    latents = torch.randn(48, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    times = torch.linspace(100.0, 1000.0, 48)
    for variant in conds:  # warm-up: first-call allocations, the processors installed
        fn(family, *conds[variant], latents, times)
    seconds: dict[str, list[float]] = {"repeated": [], "full": []}
    ratios = []
    for r in range(repeats):
        order = ("repeated", "full", "full", "repeated") if r % 2 == 0 else ("full", "repeated", "repeated", "full")
        pair = {"repeated": 0.0, "full": 0.0}
        for variant in order:
            elapsed = timed(fn, family, *conds[variant], latents, times)
            seconds[variant].append(elapsed)
            pair[variant] += elapsed
        ratios.append(pair["full"] / pair["repeated"])
    return {"median_s": {k: round(statistics.median(v), 5) for k, v in seconds.items()},
            "ratio_full_over_repeated": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    family, conds = setup()
    load_before = os.getloadavg()[0]
    result = {
        "model": "shapes-flow", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "text_tokens": {k: int(c[0]["embeds"].shape[1]) for k, c in conds.items()}, "repeats": args.repeats,
        "sample_forward_16x2_rows": measure(family, conds, sample_call, args.repeats),
        "train_forward_backward_16x3x2_rows": measure(family, conds, train_call, args.repeats),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
