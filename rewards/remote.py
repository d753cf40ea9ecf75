"""The `remote` reward: score with a reward served by `ddpo serve-reward` (on another GPU or machine).

    build_reward("remote", url="http://127.0.0.1:8085", token_env="DDPO_REWARD_TOKEN")

Connection errors and 5xx replies (a restarting server) are retried with exponential backoff; after the retry
budget the call raises a clear error instead of hanging, so a training run stops with its last checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rewards.http import post_json
from rewards.images import encode_png, to_pil
from rewards.server import jsonable


class RemoteReward:
    def __init__(self, url: str = "http://127.0.0.1:8085", token_env: str = "DDPO_REWARD_TOKEN",
                 timeout: float = 300.0, retries: int = 6, backoff: float = 1.0, max_backoff: float = 30.0):
        self.url = url.rstrip("/") + "/score"
        # The token is read from the environment so it never sits in a logged config.
        token = os.environ.get(token_env, "")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retry = {"timeout": timeout, "retries": retries, "backoff": backoff, "max_backoff": max_backoff}

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        payload = {"images": [encode_png(image) for image in to_pil(images)], "prompts": prompts,
                   "metadata": jsonable(metadata)}
        reply = post_json(self.url, payload, headers=self.headers, what="reward server", **self.retry)
        scores = np.asarray([np.nan if s is None else s for s in reply["scores"]], dtype=np.float32)
        return scores, reply.get("info", {})
