"""Turning the two accepted image forms (PIL list, float tensor (B, 3, H, W) in [0, 1]) into what models need.

Grayscale, palette and RGBA images are converted to RGB (RGBA is composited on white, so transparent regions do not
turn black); images that cannot be meaningfully converted are refused with a message that says what to do.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

# Values this far outside [0, 1] are float rounding from a decoder, and are clamped; more is a caller's bug.
RANGE_TOLERANCE = 1e-3
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "La"}


def pil_to_rgb(image: Image.Image, index: int = 0) -> Image.Image:
    """One PIL image -> RGB. Alpha is composited on white; 16-bit and float modes are refused (ambiguous range)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index} is a {type(image).__name__}; expected a PIL image "
                        "(or pass all images as one float tensor (B, 3, H, W) in [0, 1])")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index} is empty ({image.width}x{image.height})")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"image {index} has PIL mode {image.mode!r}, whose value range is ambiguous; "
                         "convert it to 8-bit RGB first (e.g. scale to 0-255 and `.convert('RGB')`)")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_tensor(images: Any) -> Any:
    """Validate a float tensor (B, 3, H, W) in [0, 1]; grayscale (B, 1, H, W) is repeated to 3 channels.

    Returns a float32 CPU tensor (B, 3, H, W) clamped to [0, 1].
    """
    import torch

    if images.ndim != 4:
        raise ValueError(f"image tensor has shape {tuple(images.shape)}; expected (B, 3, H, W) "
                         "(for a single image use images[None])")
    if images.shape[1] not in (1, 3):
        hint = " (channels-last? use images.permute(0, 3, 1, 2))" if images.shape[-1] in (1, 3, 4) else ""
        raise ValueError(f"image tensor has {images.shape[1]} channels in shape {tuple(images.shape)}; "
                         f"expected (B, 3, H, W) RGB or (B, 1, H, W) grayscale{hint}")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"image tensor has empty spatial size {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"image tensor has dtype {images.dtype}; expected float in [0, 1] or uint8 in [0, 255]")
    images = images.detach().to("cpu", torch.float32)
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bad.any():
        raise ValueError(f"image tensor has NaN or infinite values in images {bad.nonzero().flatten().tolist()}")
    low, high = images.min().item(), images.max().item()
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        hint = " (images in [-1, 1]? pass (images + 1) / 2)" if low >= -1 - RANGE_TOLERANCE else ""
        raise ValueError(f"image tensor values span [{low:.3f}, {high:.3f}]; expected [0, 1]{hint}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0, 1)


def to_pil(images: Any) -> list[Image.Image]:
    """A list of PIL images or a tensor (B, 3, H, W) in [0, 1] -> list of RGB PIL images."""
    import torch

    if isinstance(images, (list, tuple)):
        return [pil_to_rgb(image, i) for i, image in enumerate(images)]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images is a {type(images).__name__}; expected a list of PIL images "
                        "or a float tensor (B, 3, H, W) in [0, 1]")
    tensor = check_tensor(images)
    array = (tensor.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def encode_png(image: Image.Image) -> str:
    """PIL image -> base64 PNG string (lossless, so remote scores match local ones)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: str, index: int = 0, max_pixels: int = 4096 * 4096) -> Image.Image:
    """base64 PNG/JPEG string -> RGB PIL image; refuses oversized images before decoding their pixels."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    except Exception as err:  # binascii.Error, PIL.UnidentifiedImageError
        raise ValueError(f"image {index} is not a base64-encoded PNG or JPEG: {err}") from None
    if image.width * image.height > max_pixels:
        raise ValueError(f"image {index} is {image.width}x{image.height}, above the limit of {max_pixels} pixels")
    image.load()
    return pil_to_rgb(image, index)
