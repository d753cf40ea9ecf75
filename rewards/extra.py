"""More rewards users ask for: PickScore (through transformers), ImageReward and HPSv2 (optional packages).

ImageReward and HPSv2 need `pip install ddpo[rewards-extra]`; without them, building the reward raises
RewardUnavailable with that instruction (and `ddpo score` skips the column with the message).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from rewards.images import to_pil


class RewardUnavailable(ImportError):
    """An optional reward's package is not installed."""


def _require(module: str, reward: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RewardUnavailable(f"reward {reward!r} needs the package {package!r}, which is not installed: "
                                f"`pip install -c constraints.txt {package}` (or `pip install ddpo[rewards-extra]`)")


def _features(out: Any) -> Any:
    """transformers >= 5 returns an output object from get_*_features; older versions a tensor."""
    import torch

    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


class PickScoreReward:
    """PickScore (Kirstain et al. 2023): logit_scale * cos(CLIP-H image embedding, text embedding), ~18-23."""

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str = "float32"):
        self.model_name, self.processor_name, self.device, self.dtype = model, processor, device, dtype
        self._model = None

    def _load(self) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from rewards.hub import OFFLINE_REWARDS, require_weights

        for name, what in ((self.processor_name, "PickScore processor"), (self.model_name, "PickScore model")):
            require_weights(name, what, (f"Download it where there is internet (`huggingface-cli download {name}`) "
                                         f"and pass model=/folder processor=/folder; {OFFLINE_REWARDS}"))
        try:
            self._image_processor = AutoImageProcessor.from_pretrained(self.processor_name)
            self._tokenizer = AutoTokenizer.from_pretrained(self.processor_name)
            model = AutoModel.from_pretrained(self.model_name, dtype=getattr(torch, self.dtype))
        except OSError as err:
            raise FileNotFoundError(f"PickScore files not found ({err}); download {self.model_name} and "
                                    f"{self.processor_name}, or pass model=/folder processor=/folder") from None
        self._model = model.to(self.device).eval().requires_grad_(False)

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        import torch

        if self._model is None:
            self._load()
        pixels = self._image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        text = self._tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            image_emb = _features(self._model.get_image_features(
                pixel_values=pixels.to(self.device, self._model.dtype)))
            text_emb = _features(self._model.get_text_features(**text.to(self.device)))
            scores = self._model.logit_scale.exp().float() * (image_emb * text_emb).sum(-1)
        scores = scores.cpu().numpy().astype(np.float32)
        return scores, {"pickscore": scores.tolist()}


class ImageRewardReward:
    """ImageReward (Xu et al. 2023) through its own package."""

    def __init__(self, model: str = "ImageReward-v1.0", device: str = "cpu"):
        _require("ImageReward", "imagereward", "image-reward")
        self.model_name, self.device, self._model = model, device, None

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        if self._model is None:
            import ImageReward

            self._model = ImageReward.load(self.model_name, device=self.device)
        scores = [float(self._model.score(p, [im])) for p, im in zip(prompts, to_pil(images))]
        return np.asarray(scores, dtype=np.float32), {"imagereward": scores}


class HPSv2Reward:
    """Human Preference Score v2 (Wu et al. 2023) through the hpsv2 package."""

    def __init__(self, hps_version: str = "v2.1"):
        _require("hpsv2", "hpsv2", "hpsv2")
        self.hps_version = hps_version

    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        import hpsv2

        scores = [float(np.asarray(hpsv2.score([im], p, hps_version=self.hps_version)).reshape(-1)[0])
                  for p, im in zip(prompts, to_pil(images))]
        return np.asarray(scores, dtype=np.float32), {"hpsv2": scores}
