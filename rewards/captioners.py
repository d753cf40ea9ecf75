"""Captioners: what `vlm_bertscore` asks to describe an image. Any object with this method is a captioner:

    class Captioner(Protocol):
        def caption(self, images: list[PIL.Image.Image], question: str) -> list[str]: ...
        # optional: why a prompt cannot be scored (e.g. outside the captioner's vocabulary), or None
        def unscorable_reason(self, prompt: str) -> str | None: ...
        # optional: every answer it could give, with its probability (vlm_bertscore's expected=true)
        def caption_distribution(self, images: list[PIL.Image.Image], question: str) -> list[list[tuple[str, float]]]: ...

Backends: "llava", "blip", "blip2" (transformers), "openai" (any OpenAI-compatible chat endpoint: vLLM, SGLang,
TGI), "shapes" (ddpo.shapes.captioner:ShapesCaptioner), or "package.module:Class" for your own.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from PIL import Image

BACKENDS: dict[str, str] = {
    "llava": "rewards.captioners:LlavaCaptioner",
    "blip": "rewards.captioners:BlipCaptioner",
    "blip2": "rewards.captioners:Blip2Captioner",
    "openai": "rewards.openai_captioner:OpenAICaptioner",
    "shapes": "ddpo.shapes.captioner:ShapesCaptioner",
}


@runtime_checkable
class Captioner(Protocol):
    def caption(self, images: list[Image.Image], question: str) -> list[str]:
        """RGB PIL images (B) and one question -> B answers ("" for a failed answer)."""
        ...


def captioner_class(backend: str) -> type:
    """A backend name or "package.module:Class" -> the class, imported but not built (no model loads)."""
    from rewards import import_object

    if backend not in BACKENDS and ":" not in backend:
        raise ValueError(f"unknown captioner backend {backend!r}; valid: {', '.join(BACKENDS)}, "
                         "or 'package.module:Class' for your own")
    return import_object(BACKENDS.get(backend, backend))


def build_captioner(backend: str, *, default_device: str = "cpu", **kwargs: Any) -> Captioner:
    """A backend name or "package.module:Class" -> captioner instance, built with kwargs.

    kwargs["device"] defaults to `default_device` (the reward's device) for classes whose __init__ takes a
    `device` argument (or **kwargs).
    """
    cls = captioner_class(backend)
    parameters = inspect.signature(cls).parameters.values()
    if any(p.name == "device" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        kwargs.setdefault("device", default_device)
    captioner = cls(**kwargs)
    if not callable(getattr(captioner, "caption", None)):
        raise TypeError(f"captioner {backend!r} has no caption(images, question) method; see docs/rewards.md")
    return captioner


class _TransformersCaptioner:
    """Shared loading and batched greedy generation for the transformers backends."""

    model_class = ""  # name of the transformers class
    default_model = ""

    def __init__(self, model: str | None = None, device: str = "cpu", dtype: str = "float32",
                 max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0):
        import torch

        self.model_name = model or self.default_model
        self.device, self.dtype = device, getattr(torch, dtype)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.do_sample, self.temperature = do_sample, temperature
        self._model = self._processor = None

    def _load(self) -> None:
        import transformers
        from transformers import AutoProcessor

        from rewards.hub import require_weights

        require_weights(self.model_name, "captioner model", (
            f"Download {self.default_model} where there is internet (`huggingface-cli download {self.default_model}`)"
            " and pass "
            "captioner_kwargs={\"model\": \"/local/folder\"}, or, offline, use the shipped Shapes captioner "
            "(vlm_bertscore with captioner: shapes, for Shapes prompts), which needs no download"))
        cls = getattr(transformers, self.model_class)
        try:
            model = cls.from_pretrained(self.model_name, dtype=self.dtype)
            self._processor = AutoProcessor.from_pretrained(self.model_name)
        except OSError as err:
            raise FileNotFoundError(
                f"captioner model {self.model_name!r} not found ({err}). Download it "
                f"(`huggingface-cli download {self.default_model}`) or pass model=/local/folder "
                "(for vlm_bertscore: captioner_kwargs={\"model\": \"/local/folder\"}), or use the shipped Shapes "
                "captioner (captioner: shapes), which needs no download") from None
        self._model = model.to(self.device).eval().requires_grad_(False)
        tokenizer = getattr(self._processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right end

    def _prompt(self, question: str) -> str | None:
        raise NotImplementedError

    def _answers(self, sequences: Any, prompt_length: int, prompt: str | None) -> list[str]:
        """Strip the prompt from generated sequences: decoder-only models echo it as the first tokens."""
        texts = self._processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def caption(self, images: list[Image.Image], question: str) -> list[str]:
        import torch

        if self._model is None:
            self._load()
        prompt = self._prompt(question)
        answers: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            text = None if prompt is None else [prompt] * len(chunk)
            inputs = self._processor(images=chunk, text=text, return_tensors="pt", padding=text is not None)
            inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            sample = {"do_sample": True, "temperature": self.temperature} if self.do_sample else {"do_sample": False}
            with torch.no_grad():
                sequences = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sample)
            prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
            answers += self._answers(sequences.cpu(), prompt_length, prompt)
        return answers


class LlavaCaptioner(_TransformersCaptioner):
    """LLaVA (LlavaForConditionalGeneration). prompt_template must contain <image> and {question}."""

    model_class = "LlavaForConditionalGeneration"
    default_model = "llava-hf/llava-1.5-7b-hf"

    def __init__(self, model: str | None = None, prompt_template: str = "USER: <image>\n{question} ASSISTANT:",
                 **kwargs: Any):
        super().__init__(model, **kwargs)
        if "<image>" not in prompt_template or "{question}" not in prompt_template:
            raise ValueError(f"LLaVA prompt_template {prompt_template!r} must contain '<image>' and '{{question}}'")
        self.prompt_template = prompt_template

    def _prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)


class Blip2Captioner(_TransformersCaptioner):
    """BLIP-2 (Blip2ForConditionalGeneration), asked "Question: {question} Answer:" by default."""

    model_class = "Blip2ForConditionalGeneration"
    default_model = "Salesforce/blip2-opt-2.7b"

    def __init__(self, model: str | None = None, prompt_template: str = "Question: {question} Answer:",
                 **kwargs: Any):
        super().__init__(model, **kwargs)
        self.prompt_template = prompt_template

    def _prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)


class BlipCaptioner(_TransformersCaptioner):
    """BLIP captioning (BlipForConditionalGeneration). BLIP does not answer questions: it ignores `question` and
    captions each image, optionally continuing `text_prefix` (e.g. "a picture of")."""

    model_class = "BlipForConditionalGeneration"
    default_model = "Salesforce/blip-image-captioning-large"

    def __init__(self, model: str | None = None, text_prefix: str = "", **kwargs: Any):
        super().__init__(model, **kwargs)
        self.text_prefix = text_prefix

    def _prompt(self, question: str) -> str | None:
        return self.text_prefix or None

    def _answers(self, sequences: Any, prompt_length: int, prompt: str | None) -> list[str]:
        # BLIP's decoder returns [bos, prefix tokens, caption]; the (lower-cased) prefix is removed as text.
        texts = [t.strip() for t in self._processor.batch_decode(sequences, skip_special_tokens=True)]
        prefix = (prompt or "").strip().lower()
        return [t[len(prefix):].strip() if prefix and t.lower().startswith(prefix) else t for t in texts]
