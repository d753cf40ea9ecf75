"""The Shapes captioner: the VLM's stand-in for the `vlm_bertscore` reward.

A small CNN reads a 64x64 image and answers in the world's phrasing, "a {color} {shape} on a {background}
background", whatever the question. It follows the captioner protocol of rewards/captioners.py:

    captioner = ShapesCaptioner()                       # the shipped weights, verified against the manifest
    captioner.caption(images, "What is in this image?") # -> ["a red circle on a blue background", ...]
    captioner.unscorable_reason("a pink dolphin")        # -> "... outside the Shapes world's vocabulary ..."

It is trained on rendered images and their VAE reconstructions, so it also reads generated images. Accuracy
numbers in the docs come from the rule-based evaluator (ddpo.shapes.evaluator), never from this model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ddpo.shapes.world import COLORS, IMAGE_SIZE, SHAPES, VOCABULARY, caption, parse_caption

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class CaptionerNet(nn.Module):
    """(B, 4, 64, 64) from `images_to_input` -> logits (B, 8) colour, (B, 3) shape, (B, 8) background."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.width = width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(),
                                 nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.SiLU())

        # 64 -> 32 -> 16 -> 8, then global average and max pooling: a shape is the same shape anywhere, and
        # position-invariant features learned shapes far faster than a flattened (position-specific) map.
        self.features = nn.Sequential(block(4, width // 2), block(width // 2, width), block(width, width))
        self.head = nn.Sequential(nn.Linear(2 * width, 128), nn.SiLU())
        self.color = nn.Linear(128, len(COLORS))
        self.shape = nn.Linear(128, len(SHAPES))
        self.background = nn.Linear(128, len(COLORS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        h = self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))
        return self.color(h), self.shape(h), self.background(h)

    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps({"class": "CaptionerNet", "width": self.width,
                                                      "colors": COLORS, "shapes": SHAPES}, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CaptionerNet":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        if config.get("colors") != COLORS or config.get("shapes") != SHAPES:
            raise ValueError(f"captioner in {folder} was trained for another world (colours/shapes differ)")
        net = cls(width=config["width"])
        net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        return net.eval()


def images_to_input(images01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 4, 64, 64) in [-1, 1]: RGB plus a silhouette channel.

    The silhouette is each pixel's distance from the median border colour: it shows the shape the same way
    whatever its colours, which made shape learning several times faster than RGB alone.
    """
    if images01.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images01 = nn.functional.interpolate(images01, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                             antialias=True, align_corners=False)
    border = torch.cat([images01[..., 0, :], images01[..., -1, :], images01[..., :, 0], images01[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
    silhouette = (images01 - background).norm(dim=1, keepdim=True).clamp(max=1.0)
    return torch.cat([images01, silhouette], dim=1) * 2 - 1


def pil_to_tensor(images: list) -> torch.Tensor:
    """RGB PIL images -> float (B, 3, H, W) in [0, 1] (resized to 64x64)."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class ShapesCaptioner:
    """Captioner protocol (rewards/captioners.py) for the Shapes world. `path`: a captioner folder, or the shipped one."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 256,
                 do_sample: bool = False, temperature: float = 1.0, seed: int = 0):
        """`do_sample`: draw each word from the network's softmax at `temperature` instead of taking the argmax,
        the way a VLM samples its answer. A drawn caption is right with the probability the network gives it, so
        the expected reward grades a shape by how sure the captioner is (a rounded square scores lower than a
        crisp one), where argmax gives both full marks. Draws are seeded by the image's pixels and `seed`, so the
        same image always gets the same caption: rewards are reproducible, also across a resume."""
        from ddpo.shapes import captioner_path

        if temperature <= 0:
            raise ValueError(f"ShapesCaptioner temperature={temperature}: must be > 0 (do_sample=false for argmax)")
        self.path = Path(path) if path is not None else captioner_path()
        self.net = CaptionerNet.from_pretrained(self.path).to(device).requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        self.do_sample, self.temperature, self.seed = do_sample, temperature, seed

    @torch.no_grad()
    def predict(self, images01: torch.Tensor) -> list[tuple[str, str, str]]:
        """(B, 3, H, W) in [0, 1] -> (color, shape, background) per image."""
        out = []
        generators = self._generators(images01) if self.do_sample else None
        for start in range(0, len(images01), self.batch_size):
            x = images_to_input(images01[start:start + self.batch_size].to(self.device).float())
            color, shape, background = (logits.float().cpu() for logits in self.net(x))
            gens = generators[start:start + self.batch_size] if generators else None
            c = self._choose(color, gens)
            # The world never paints a shape on its own colour: choose the background among the others.
            b = self._choose(background.scatter(1, c[:, None], float("-inf")), gens)
            out += [(COLORS[i], SHAPES[j], COLORS[k]) for i, j, k in
                    zip(c.tolist(), self._choose(shape, gens).tolist(), b.tolist())]
        return out

    def _choose(self, logits: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        """(B, K) logits -> (B,) indices: argmax, or one draw per row from softmax(logits / temperature)."""
        if generators is None:
            return logits.argmax(1)
        probs = (logits / self.temperature).softmax(1)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])

    def _generators(self, images01: torch.Tensor) -> list[torch.Generator]:
        """One generator per image, seeded by its 8-bit pixels and `seed`; the k-th copy of an image in the batch
        gets draw k, so repeated images (several captions of one image) get independent captions."""
        import hashlib

        pixels = (images01.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        copies: dict[bytes, int] = {}
        generators = []
        for image in pixels:
            digest = hashlib.sha256(image.tobytes()).digest()
            k = copies[digest] = copies.get(digest, -1) + 1
            key = hashlib.sha256(digest + f"{self.seed}:{k}".encode()).digest()
            generators.append(torch.Generator().manual_seed(int.from_bytes(key[:8], "little")))
        return generators

    @torch.no_grad()
    def caption_distribution(self, images: list, question: str = "",
                             min_prob: float = 1e-3) -> list[list[tuple[str, float]]]:
        """RGB PIL images -> per image, the captions the network would give with their probabilities.

        P(color, shape, background) = P(color) P(shape) P(background | background != color), each from the
        network's softmax at `temperature`: the distribution `do_sample` draws from. Captions under `min_prob` are
        dropped and the rest renormalised (the dropped mass is about 1e-3 x 168 captions at most).
        """
        if not images:
            return []
        out, x_all = [], pil_to_tensor(images)
        for start in range(0, len(x_all), self.batch_size):
            x = images_to_input(x_all[start:start + self.batch_size].to(self.device))
            color, shape, background = ((l.float().cpu() / self.temperature) for l in self.net(x))
            p_color, p_shape = color.softmax(1), shape.softmax(1)
            eye = torch.eye(len(COLORS), dtype=torch.bool)
            # (B, color, background): the background softmax with the shape's own colour masked out
            p_background = background[:, None, :].masked_fill(eye, float("-inf")).softmax(-1)
            joint = p_color[:, :, None, None] * p_shape[:, None, :, None] * p_background[:, :, None, :]
            for probs in joint:  # (color, shape, background)
                keep, total = (probs >= min_prob).nonzero().tolist(), float(probs[probs >= min_prob].sum())
                out.append([(caption(COLORS[i], SHAPES[j], COLORS[k]), float(probs[i, j, k]) / total)
                            for i, j, k in keep])
        return out

    def caption(self, images: list, question: str = "") -> list[str]:
        """RGB PIL images -> captions in the world's phrasing. The question is ignored: there is one thing to say."""
        return [caption(*p) for p in self.predict(pil_to_tensor(images))] if images else []

    def unscorable_reason(self, prompt: str) -> str | None:
        """None for a sentence of the Shapes world; otherwise why its captions cannot be compared with it."""
        if parse_caption(prompt) is not None:
            return None
        unknown = sorted({w for w in prompt.lower().rstrip(".").split() if w not in VOCABULARY})
        detail = f"unknown words {unknown}" if unknown else "not of the form 'a {color} {shape} on a {background} background'"
        return f"prompt {prompt!r} is outside the Shapes world's vocabulary ({detail}); the Shapes captioner cannot score it"
