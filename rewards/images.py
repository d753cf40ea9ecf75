"""Decoding image files and turning the two accepted image forms (PIL list, float tensor (B, 3, H, W) in [0, 1])
into what models need. One conversion path serves every entry point: the Python API (`to_pil`), `ddpo score`, the
reward server and the app's uploads (`open_image`), so the same picture gets the same score everywhere.

- Files and request payloads are decoded only as PNG, JPEG or WebP (PIL is never asked to guess among its other
  formats: EPS would start Ghostscript), and their pixel count is checked from the header before any pixel is decoded.
- Grayscale, palette and RGBA images become RGB; alpha (and palette or PNG `tRNS` transparency) is composited on
  white, so transparent regions do not turn black. 16-bit grayscale (PIL `I;16`, what a 16-bit PNG opens as) is
  scaled to 8 bits (round(v / 257)); 32-bit integer and float modes are refused (their range is ambiguous).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Values this far outside [0, 1] are float rounding from a decoder, and are clamped; more is a caller's bug.
RANGE_TOLERANCE = 1e-3
# What `open_image` decodes; PIL's format names. Everything else is refused before a plugin reads past the header.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
# Per image, everywhere a file or payload is decoded: 4096 x 4096 (50 MB as RGB). Callers may pass less.
MAX_IMAGE_PIXELS = 4096 * 4096
WHITE = (255, 255, 255)
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE_MODES = {"1", "L", "P", "RGB", "CMYK", "YCbCr"} | _ALPHA | _SIXTEEN_BIT


class ImageRefused(ValueError):
    """An image we do not decode: not PNG/JPEG/WebP, too many pixels, or corrupt. `too_large` tells 413 from 400."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def pil_to_rgb(image: Image.Image, index: int | str = 0) -> Image.Image:
    """One PIL image -> RGB. Alpha and transparency are composited on white; 16-bit grayscale is scaled to 8 bits;
    32-bit integer and float modes are refused (ambiguous range). `index` (or a name) labels errors."""
    label = index if isinstance(index, str) else f"image {index}"
    if not isinstance(image, Image.Image):
        raise TypeError(f"{label} is a {type(image).__name__}; expected a PIL image "
                        "(or pass all images as one float tensor (B, 3, H, W) in [0, 1])")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{label} is empty ({image.width}x{image.height})")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"{label} has PIL mode {image.mode!r}, whose value range is ambiguous; "
                         "convert it to 8-bit RGB first (e.g. scale to 0-255 and `.convert('RGB')`)")
    if image.mode in _SIXTEEN_BIT:
        # PIL's own convert() clips 16-bit values at 255; scale the full 0-65535 range instead.
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, WHITE)
        rgb.paste(rgba, (0, 0), rgba)  # the same numbers as alpha_composite on opaque white, with less memory
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")


def _describe(source: bytes | str | os.PathLike) -> str:
    return "image" if isinstance(source, (bytes, bytearray)) else f"{os.fspath(source)!r}"


def peek_image(source: bytes | str | os.PathLike, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
               max_side: int | None = None) -> Image.Image:
    """Open a PNG/JPEG/WebP file or byte string lazily: the header is read and checked, no pixel is decoded yet.

    Raises ImageRefused (a ValueError) for another format, a header above `max_pixels` (or `max_side`), or an
    unreadable file; OSError if a path cannot be opened. Decode the result with `decode_image`.
    """
    name = name or _describe(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"{name} is not a file")
    try:
        image = Image.open(source, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRefused(f"{name} is not a PNG, JPEG or WebP image (the only formats decoded here)") from None
    except Image.DecompressionBombError:
        raise ImageRefused(f"{name} has far more than {max_pixels} pixels", too_large=True) from None
    except (OSError, SyntaxError, ValueError) as err:  # a header PIL could not parse
        raise ImageRefused(f"{name} has a corrupt PNG, JPEG or WebP header ({err})") from None
    width, height = image.size
    if width * height > max_pixels or (max_side is not None and max(width, height) > max_side):
        limit = f"the largest side allowed is {max_side} px" if max_side is not None and \
            max(width, height) > max_side else f"the limit is {max_pixels} pixels"
        image.close()
        raise ImageRefused(f"{name} is {width}x{height}; {limit}", too_large=True)
    if width == 0 or height == 0:
        image.close()
        raise ImageRefused(f"{name} is empty ({width}x{height})")
    return image


def decode_image(image: Image.Image, name: str = "image") -> Image.Image:
    """Decode a lazily opened image (from `peek_image`) and convert it to RGB (see `pil_to_rgb`)."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
        raise ImageRefused(f"{name} cannot be decoded ({err})") from None
    try:
        rgb = pil_to_rgb(image, name)
    except ValueError as err:
        image.close()
        raise ImageRefused(str(err)) from None
    if rgb is image:  # already RGB: load() closed a single-frame file; an animation keeps its file open
        if not getattr(image, "is_animated", False):
            return rgb
        rgb = image.copy()
    image.close()
    return rgb


def open_image(source: bytes | str | os.PathLike, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
               max_side: int | None = None) -> Image.Image:
    """A PNG, JPEG or WebP file (path) or its bytes -> RGB PIL image, the one decoder of every entry point.

    The format and the pixel count are checked from the header before decoding; ImageRefused says what is wrong.
    """
    name = name or _describe(source)
    return decode_image(peek_image(source, name, max_pixels, max_side), name)


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


def b64_bytes(data: Any, name: str) -> bytes:
    """A base64 string from a request -> its bytes; ImageRefused if it is not base64."""
    if not isinstance(data, str):
        raise ImageRefused(f"{name} is a {type(data).__name__}; expected a base64-encoded PNG, JPEG or WebP string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRefused(f"{name} is not valid base64 ({err})") from None


def decode_png(data: str, index: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """base64 PNG/JPEG/WebP string -> RGB PIL image (what the reward server receives); see `open_image`."""
    name = f"image {index}"
    return open_image(b64_bytes(data, name), name, max_pixels)
