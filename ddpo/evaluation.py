"""Evaluation during training: the fixed evaluation prompts sampled deterministically every `prompts.eval_every`
epochs, scored by the training reward and, with `reward.eval_name`, by a second reward (an independent judge).

Metrics (metrics.jsonl, TensorBoard):
- `eval_reward_mean`: the training reward's mean over the evaluation prompts (as before);
- `eval_score_mean`: the evaluation reward's (`reward.eval_name`, e.g. `shapes_accuracy`, the Shapes evaluator);
- `eval_reward_heldout` / `eval_reward_train` and `eval_score_heldout` / `eval_score_train`: the same means over the
  held-out and the training prompts, when the evaluation covers both (`prompts.eval_split=all` on a grammar with a
  held-out split). A reward that keeps rising while `eval_score_*` falls is over-optimisation in view.
Every mean is over the evaluation's images in their `evaluation_images` order (each distinct prompt
`prompts.eval_images_per_prompt` times, so also the mean of the prompts' means), the same on any number of processes;
the grid shows each prompt's first image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpo.metrics import save_grid
from ddpo.reward_pool import RewardPool
from ddpo.rollout import evaluate, evaluation_images


class Evaluator:
    """Owns the optional evaluation-reward pool (inline: a judge is cheap or owns its own device); `close()` it."""

    def __init__(self, config, grammar, reward_pool: RewardPool):
        self.config, self.grammar, self.reward_pool = config, grammar, reward_pool
        r = config.reward
        judged = r.eval_name and config.prompts.eval_every  # without evaluations the judge has nothing to judge
        self.judge = RewardPool(r.eval_name, r.eval_kwargs, "inline", r.timeout_s) if judged else None
        prompts = evaluation_images(grammar, config) if config.prompts.eval_every else []
        self.num_prompts = len(prompts) // config.prompts.eval_images_per_prompt  # distinct prompts
        by_split = config.prompts.eval_split == "all" and grammar.has_heldout
        self.heldout = np.array([grammar.is_heldout(p) for p in prompts], dtype=bool) if by_split else None
        self.prompts = prompts

    def due(self, epoch: int) -> bool:
        """Whether the evaluation runs after 0-based epoch `epoch`."""
        every = self.config.prompts.eval_every
        return bool(every) and (epoch + 1) % every == 0

    def run(self, family, unet, accelerator, grid_path: Path) -> dict[str, float]:
        """The evaluation metrics (all processes take part; the main process saves the images' grid)."""
        from accelerate.utils import gather_object

        policy = accelerator.unwrap_model(unet)
        policy.eval()
        result = evaluate(family, policy, self.grammar, self.reward_pool, self.config, accelerator.process_index,
                          accelerator.num_processes, accelerator.device, accelerator.autocast)
        scores = np.full(len(result.positions), np.nan, dtype=np.float32)
        if self.judge is not None and len(result.positions):
            metadata = [dict(self.prompts[i].metadata) for i in result.positions]
            scores = self.judge.result(self.judge.submit(result.images, result.prompts, metadata)).scores
        first = [k for k, i in enumerate(result.positions) if i < self.num_prompts]  # each prompt's first image
        if accelerator.is_main_process and self.config.logging.sample_grid and first:
            images = (result.images[first].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            save_grid(images, [f"{result.prompts[k]} | r={result.rewards[k]:.3f}" for k in first], grid_path)
        rows = dict(gather_object([(i, (float(r), float(s)))
                                   for i, r, s in zip(result.positions, result.rewards, scores)]))
        table = np.array([rows[i] for i in sorted(rows)], dtype=np.float64)  # (n_images, 2): reward, score
        return self._means(table)

    def _means(self, table: np.ndarray) -> dict[str, float]:
        names = ["eval_reward"] + (["eval_score"] if self.judge is not None else [])
        out = {}
        for column, name in enumerate(names):
            out[f"{name}_mean"] = float(np.nanmean(table[:, column]))
            if self.heldout is not None:
                for split, mask in (("heldout", self.heldout), ("train", ~self.heldout)):
                    out[f"{name}_{split}"] = float(np.nanmean(table[mask, column])) if mask.any() else float("nan")
        return out

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()
