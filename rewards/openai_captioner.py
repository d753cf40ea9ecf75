"""A captioner behind any OpenAI-compatible chat endpoint with image input (vLLM, SGLang, TGI, OpenAI).

Serve the VLM on other GPUs or machines, e.g. `vllm serve llava-hf/llava-1.5-7b-hf --port 8000`, then use
captioner="openai", captioner_kwargs={"base_url": "http://gpu-host:8000/v1", "model": "llava-hf/llava-1.5-7b-hf"}.
Each image is one chat request (the chat API takes one conversation per request); up to `concurrency` requests are
in flight at once so the server can batch them. Images travel as base64 PNG data URLs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from rewards.http import post_json
from rewards.images import encode_png


class OpenAICaptioner:
    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: str = "llava-hf/llava-1.5-7b-hf",
                 api_key_env: str = "OPENAI_API_KEY", max_tokens: int = 64, temperature: float = 0.0,
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.concurrency = concurrency
        self.retry = {"timeout": timeout, "retries": retries, "backoff": backoff, "max_backoff": max_backoff}
        # The key is read from the environment, never from config files that get logged and shared.
        api_key = os.environ.get(api_key_env, "")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _ask(self, image: Image.Image, question: str) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_png(image)}},
                {"type": "text", "text": question},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        reply = post_json(self.url, payload, headers=self.headers, what="captioner endpoint", **self.retry)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"captioner endpoint {self.url} replied without choices[0].message.content: "
                             f"{str(reply)[:300]}") from None
        return (content or "").strip()

    def caption(self, images: list[Image.Image], question: str) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(images)))) as pool:
            return list(pool.map(lambda image: self._ask(image, question), images))
