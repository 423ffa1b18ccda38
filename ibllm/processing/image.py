"""Image loading and the CLIP transforms ImageBind's vision encoder expects, with PIL + torch only.

The geometry reproduces torchvision on PIL input: ``Resize(size, bicubic)`` (short side to ``size``,
long side ``int(size * long / short)``), ``CenterCrop`` (offsets ``int(round((H - size) / 2))``),
``ToTensor`` and ``Normalize``, and ``RandomResizedCrop`` (10 attempts, then the central fallback crop).

Bounds on the work per image (module constants a caller may change; ``None`` switches one off):

- :data:`MAX_IMAGE_PIXELS` (8192 x 8192): an image whose header declares more pixels is refused before
  any pixel is decoded. PIL's own ``PIL.Image.MAX_IMAGE_PIXELS`` is honoured too when it is lower.
- :data:`MAX_ASPECT_RATIO` (100): the eval transform resizes the short side to ``size``, so a 20000 x 1
  image would become 4.5 million pixels wide (gigabytes). An image more elongated than this ratio is first
  centre-cropped along its long side to the ratio; the centre crop of the result is then taken as usual.
  Images within the ratio are transformed exactly as before.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import MediaError, central_span, open_source

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | Path | bytes | Image.Image

WHITE = (255, 255, 255)

MAX_IMAGE_PIXELS: int | None = 8192 * 8192
"""Largest image (width x height, from the file header) that is decoded; ``None``: no limit of ours."""
MAX_ASPECT_RATIO: float | None = 100.0
"""Long side / short side above which the eval transform centre-crops before resizing (``None``: never)."""


def pixel_limit() -> int | None:
    """The pixel limit in force: the lower of :data:`MAX_IMAGE_PIXELS` and PIL's ``Image.MAX_IMAGE_PIXELS``."""
    limits = [n for n in (MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS) if n is not None]
    return min(limits) if limits else None


def check_declared_size(img: Image.Image, source: object, modality: str, limit: int | None,
                        constant: str = "ibllm.processing.image.MAX_IMAGE_PIXELS") -> None:
    """Refuse a lazily opened image whose header declares more than ``limit`` pixels (``None``: no limit)
    before its pixels are decoded; ``constant`` names the limit in the message."""
    w, h = img.size
    if limit is not None and w * h > limit:
        raise MediaError(modality, source, f"declared size {w}x{h} = {w * h:,} pixels is over the limit of "
                                           f"{limit:,} pixels ({constant})")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Integer (``I``, ``I;16*``) or float (``F``) single-channel images to 8-bit ``L``.

    Integer images are read as 16-bit (0..65535 -> 0..255, rounded); float images as [0,1] when their
    maximum is at most 1, else as [0,255]. Values outside the range are clipped.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        out = np.nan_to_num(arr * scale)
    else:
        out = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _composite(img: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    rgba = img.convert("RGBA")
    if background is None:
        return rgba.convert("RGB")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def open_rgb(source: ImageSource, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Open an image (path, bytes or PIL image) as 8-bit RGB.

    - ``L``/``1``/``CMYK``/``YCbCr``/``LAB``/``HSV``: PIL's conversion to RGB.
    - Transparency (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, and ``P`` or ``L``/``RGB`` with a
      ``transparency`` entry): composited over ``background`` (white by default). ``background=None``
      drops the alpha channel instead, which is what the official ``Image.open(p).convert("RGB")`` does.
    - 16-bit/32-bit integer (``I;16``, ``I``) and float (``F``) images are rescaled to 8 bits (PIL's own
      conversion would saturate them at 255).

    EXIF orientation is not applied (the official pipeline does not apply it either). A file whose header
    declares more than :func:`pixel_limit` pixels raises :class:`MediaError` before decoding.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        opened = open_source(source, "image")
        try:
            img = Image.open(opened)  # lazy: reads the header only
        except Image.DecompressionBombError as e:  # PIL's own check, at twice its Image.MAX_IMAGE_PIXELS
            raise MediaError("image", source, f"image too large: {e}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError("image", source, f"cannot decode image: {e}") from e
        check_declared_size(img, source, "image", pixel_limit())
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError("image", source, f"cannot decode image: {e}") from e
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _sixteen_bit_to_l(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        return _composite(img, background)
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> float tensor ``[3,H,W]`` in [0,1] (torchvision ``ToTensor``)."""
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """Per-channel ``(x - mean) / std`` on the channel dim -3 (``[...,C,H,W]``)."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is ``size`` and the long side ``int(size * long / short)``."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), Image.BICUBIC)


def crop_aspect(img: Image.Image, max_ratio: float | None) -> Image.Image:
    """Centre-crop the long side so that long / short is at most ``max_ratio`` (unchanged when it is)."""
    w, h = img.size
    span = central_span(max(w, h), min(w, h), max_ratio)
    if span is None:
        return img
    start, length = span
    return img.crop((start, 0, start + length, h) if w > h else (0, start, w, start + length))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to ``size x size`` with torchvision's rounding (image must be at least that large)."""
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample ``(top, left, h, w)`` like torchvision's ``RandomResizedCrop.get_params``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_transform(
    img: Image.Image, train: bool, size: int = 224, generator: torch.Generator | None = None
) -> Tensor:
    """CLIP transform of one RGB image -> normalised ``[3,size,size]`` float32.

    ``train=True``: RandomResizedCrop(scale=(0.9,1.0), ratio=(3/4,4/3), bicubic), drawing from
    ``generator`` (or the global RNG). ``train=False``: short side bicubic-resized to ``size``, centre crop;
    an image more elongated than :data:`MAX_ASPECT_RATIO` is centre-cropped to that ratio first, so the
    resized image stays small (the random crop's work is bounded by the image itself).
    """
    if img.mode != "RGB":
        img = open_rgb(img)
    if train:
        top, left, h, w = random_resized_crop_params(img.width, img.height, generator=generator)
        img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    else:
        img = center_crop(resize_short_side(crop_aspect(img, MAX_ASPECT_RATIO), size), size)
    return normalize(to_tensor(img))


def load_image(
    source: ImageSource, train: bool = False, size: int = 224, generator: torch.Generator | None = None
) -> Tensor:
    """Open ``source`` (path, bytes or PIL image) as RGB and apply :func:`image_transform` -> ``[3,size,size]``."""
    return image_transform(open_rgb(source), train=train, size=size, generator=generator)

