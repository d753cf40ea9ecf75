"""What BERTScore P/R/F values look like with the offline default model (all-MiniLM-L6-v2, 6 layers, no idf, no
baseline rescaling), for caption/reference pairs of the kinds `vlm_bertscore` sees. Results: docs/rewards.md.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/rewards_bertscore_ranges.py [--model PATH --num-layers N]
"""

from __future__ import annotations

import argparse
import time

import torch

PAIRS = [  # (kind, caption, reference)
    ("identical", "a dolphin riding a bike", "a dolphin riding a bike"),
    ("paraphrase", "a dolphin on a bicycle", "a dolphin riding a bike"),
    ("long VLM answer", "The image shows a dolphin riding a bicycle on a road near the beach on a sunny day.",
     "a dolphin riding a bike"),
    ("wrong subject", "a cat riding a bike", "a dolphin riding a bike"),
    ("wrong action", "a dolphin swimming in the sea", "a dolphin riding a bike"),
    ("unrelated", "a bowl of soup", "a dolphin riding a bike"),
    ("shapes, right", "two red circles and a blue square", "two red circles and a blue square"),
    ("shapes, wrong count", "three red circles and a blue square", "two red circles and a blue square"),
    ("shapes, wrong colour", "two green circles and a blue square", "two red circles and a blue square"),
]


def main() -> None:
    from rewards.alignment import default_bertscore_model, get_bertscorer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-layers", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    scorer = get_bertscorer(args.model or default_bertscore_model(), args.num_layers, "cpu")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    p, r, f = scorer.score([c for _, c, _ in PAIRS], [ref for _, _, ref in PAIRS])
    score_s = time.perf_counter() - start
    print("| pair | caption | reference | P | R | F1 |\n|---|---|---|---|---|---|")
    for (kind, caption, reference), pi, ri, fi in zip(PAIRS, p.tolist(), r.tolist(), f.tolist()):
        print(f"| {kind} | {caption} | {reference} | {pi:.3f} | {ri:.3f} | {fi:.3f} |")
    print(f"\nload {load_s:.1f}s, score {len(PAIRS)} pairs {score_s * 1000:.0f} ms (1 CPU thread)")


if __name__ == "__main__":
    main()
