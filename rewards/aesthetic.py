"""The LAION improved aesthetic predictor: CLIP ViT-L/14 image embeddings, L2-normalised, into an MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 that predicts a 1-10 rating (trained on SAC + LOGOS + AVA ratings).

Real weights: the MLP is `sac+logos+ava1-l14-linearMSE.pth` from
https://github.com/christophschuhmann/improved-aesthetic-predictor (also mirrored on the Hugging Face hub);
the CLIP model is `openai/clip-vit-large-patch14`. Pass a local file with mlp_path=..., or a hub file with
mlp_repo=... and mlp_filename=... . `.pth` files are read with torch.load(weights_only=True) (tensors only,
no code runs); `.safetensors` files are read with safetensors.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from rewards.images import to_pil

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_MLP_REPO = "camenduru/improved-aesthetic-predictor"
DEFAULT_MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """(B, embed_dim) L2-normalised CLIP image embeddings -> (B,) ratings.

    The layer indices (layers.0/2/4/6/7) match the released state dict, so its weights load without renaming.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_mlp_state(mlp_path: str | None, mlp_repo: str | None, mlp_filename: str) -> dict[str, torch.Tensor]:
    """Read the MLP's state dict from a local file, or from a hub file (cached by huggingface_hub)."""
    if mlp_path is None:
        from huggingface_hub import hf_hub_download

        from rewards.hub import OFFLINE_REWARDS, require_weights

        require_weights(mlp_repo, "the aesthetic MLP repo", (
            "Download sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/"
            f"improved-aesthetic-predictor and pass mlp_path=/path/to/it; {OFFLINE_REWARDS}"), filename=mlp_filename)
        try:
            mlp_path = hf_hub_download(mlp_repo, mlp_filename)
        except Exception as err:
            raise FileNotFoundError(
                f"could not get the aesthetic MLP {mlp_filename!r} from the hub repo {mlp_repo!r} ({err}). "
                "Download sac+logos+ava1-l14-linearMSE.pth from "
                "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass "
                "mlp_path=/path/to/sac+logos+ava1-l14-linearMSE.pth") from None
    if not os.path.isfile(mlp_path):
        raise FileNotFoundError(
            f"aesthetic MLP weights not found at {mlp_path!r}. Download sac+logos+ava1-l14-linearMSE.pth from "
            "https://github.com/christophschuhmann/improved-aesthetic-predictor and put it there, "
            "or pass mlp_path=... with its location")
    if mlp_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(mlp_path)
    # weights_only: a .pth is a pickle; this refuses anything but tensors and plain containers.
    return torch.load(mlp_path, map_location="cpu", weights_only=True)


class AestheticReward:
    """Reward = predicted LAION aesthetic rating (about 1-10; SD 1.5 images score ~5-6)."""

    def __init__(self, clip_model: str = DEFAULT_CLIP, mlp_path: str | None = None,
                 mlp_repo: str = DEFAULT_MLP_REPO, mlp_filename: str = DEFAULT_MLP_FILENAME,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 32):
        self.clip_model, self.device, self.batch_size = clip_model, device, batch_size
        self.mlp_path, self.mlp_repo, self.mlp_filename = mlp_path, mlp_repo, mlp_filename
        self.dtype = getattr(torch, dtype)
        self._clip = self._processor = self._mlp = None

    def _load(self) -> None:
        from transformers import AutoImageProcessor, CLIPModel

        from rewards.hub import OFFLINE_REWARDS, require_weights

        require_weights(self.clip_model, "CLIP model", (
            f"Download {DEFAULT_CLIP} where there is internet (`huggingface-cli download {DEFAULT_CLIP}`) and pass "
            f"clip_model=/local/folder; {OFFLINE_REWARDS}"))
        try:
            clip = CLIPModel.from_pretrained(self.clip_model, dtype=self.dtype)
        except OSError as err:
            raise FileNotFoundError(
                f"CLIP model {self.clip_model!r} not found ({err}). Download {DEFAULT_CLIP} "
                "(e.g. `huggingface-cli download openai/clip-vit-large-patch14`) or pass clip_model=/local/folder"
            ) from None
        mlp = AestheticMLP(clip.config.projection_dim)
        mlp.load_state_dict(load_mlp_state(self.mlp_path, self.mlp_repo, self.mlp_filename))
        self._processor = AutoImageProcessor.from_pretrained(self.clip_model)
        self._clip = clip.to(self.device).eval().requires_grad_(False)
        self._mlp = mlp.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, images: list) -> torch.Tensor:
        """PIL images -> (B, projection_dim) float32 L2-normalised CLIP image embeddings."""
        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
        out = self._clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        # transformers >= 5 returns an output object whose pooler_output is the projected embedding.
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        features = features.float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: list[str], metadata: list[dict]):
        if self._clip is None:
            self._load()
        pil = to_pil(images)
        scores = []
        for start in range(0, len(pil), self.batch_size):
            embeddings = self.embed(pil[start:start + self.batch_size])
            scores.append(self._mlp(embeddings).cpu())
        scores = torch.cat(scores).numpy().astype(np.float32)
        return scores, {"aesthetic": scores.tolist()}
