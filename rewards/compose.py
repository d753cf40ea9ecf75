"""A weighted sum of named rewards: build_reward("compose", terms={"aesthetic": 1.0, "jpeg_compressibility": 0.1}).

    total_i = sum_t  weight_t * norm_t(raw_t,i)

norm_t is the identity (normalize=False), a z-score over the batch (normalize="batch" or True), or a fixed
(raw - mean) / std from config (normalize={"aesthetic": {"mean": 5.5, "std": 0.5}}; terms not named stay raw).
info carries each term's raw scores as info[term] and the term's own info as info[f"{term}/{key}"].
A term key is a reward name, optionally with a "#label" suffix to use one reward twice with different kwargs
("vlm_bertscore#colour", "vlm_bertscore#count").
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-6


class ComposeReward:
    def __init__(self, terms: dict[str, float], kwargs: dict[str, dict] | None = None,
                 normalize: bool | str | dict[str, dict[str, float]] = False):
        from rewards import build_reward

        if not terms:
            raise ValueError('compose needs at least one term, e.g. terms={"aesthetic": 1.0}')
        kwargs = kwargs or {}
        unknown = sorted(set(kwargs) - set(terms))
        if unknown:
            raise ValueError(f"compose kwargs name {unknown}, which are not terms; terms are {sorted(terms)}")
        if normalize is True:
            normalize = "batch"
        if not (normalize is False or normalize == "batch" or isinstance(normalize, dict)):
            raise ValueError(f"compose normalize={normalize!r}; use false, 'batch', or {{term: {{mean, std}}}}")
        if isinstance(normalize, dict):
            for term, stats in normalize.items():
                if term not in terms or set(stats) != {"mean", "std"} or not stats["std"] > 0:
                    raise ValueError(f"compose normalize[{term!r}]={stats!r}; expected a term name with "
                                     "{'mean': float, 'std': float > 0}")
        self.weights = {term: float(weight) for term, weight in terms.items()}
        self.normalize = normalize
        # Sub-rewards are cheap to build (models load on first call), so a typo fails here, before any sampling.
        self.rewards = {term: build_reward(term.split("#")[0], **kwargs.get(term, {})) for term in terms}

    def _normalized(self, term: str, raw: np.ndarray) -> np.ndarray:
        if self.normalize == "batch":
            # nan-aware, so one unscorable sample does not turn the whole batch into NaN
            return (raw - np.nanmean(raw)) / (np.nanstd(raw) + EPS)
        if isinstance(self.normalize, dict) and term in self.normalize:
            stats = self.normalize[term]
            return (raw - stats["mean"]) / stats["std"]
        return raw

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        total = np.zeros(len(prompts), dtype=np.float64)
        info: dict[str, list] = {}
        reasons: list[str | None] = [None] * len(prompts)
        for term, reward in self.rewards.items():
            raw, term_info = reward(images, prompts, metadata)
            total += self.weights[term] * self._normalized(term, raw.astype(np.float64))
            info[term] = raw.tolist()
            for key, values in term_info.items():
                info[f"{term}/{key}"] = values
            for i, reason in enumerate(term_info.get("unscorable", [])):
                if reason:
                    reasons[i] = f"{reasons[i]}; {term}: {reason}" if reasons[i] else f"{term}: {reason}"
        info["unscorable"] = reasons
        return total.astype(np.float32), info
