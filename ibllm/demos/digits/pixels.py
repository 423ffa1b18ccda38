"""The digits demo's images: scikit-learn's 1,797 real handwritten 8x8 digits, the fixed train / held-out
split, and the exact tensor form of what the stage-1 pipeline sees.

An 8x8 digit (values 0–16) becomes 8-bit grey on black and is upscaled with NEAREST to 224x224 (one
original pixel = 28x28 px). :func:`render_digits` computes that view, or a stage-1 training crop of it
(PIL's crop + bicubic resize, rounded like PIL), as matrix products, so stage 0 can train on thousands of
crops without PIL; :func:`grey_vision_embed` is an exactly equivalent shortcut through the vision stem.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ibllm.models.imagebind import ImageBindModel
from ibllm.processing.image import CLIP_MEAN, CLIP_STD

NUM_DIGITS = 1797
IMAGE_SIDE = 224
# The stage-1 training crop: RandomResizedCrop with these area and aspect ranges.
CROP_SCALE: tuple[float, float] = (0.9, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def digit_split(seed: int = 0, heldout_fraction: float = 0.2, n: int = NUM_DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """The demo's one train / held-out split of the digits -> ``(train_idx, heldout_idx)``, sorted int64.

    ``numpy.random.default_rng(seed).permutation(n)``: the first ``ceil(n * heldout_fraction)`` indices
    (360 for the defaults) are held out, the rest train. Stage 0, the caption shards and the instructions
    all use it, so no held-out image is seen in training.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_held = math.ceil(round(n * heldout_fraction, 9))
    return np.sort(order[n_held:]).astype(np.int64), np.sort(order[:n_held]).astype(np.int64)


def load_digit_pixels() -> tuple[Tensor, Tensor]:
    """scikit-learn digits as 8-bit grey levels ``round(v / 16 * 255)``: ``(float [1797,8,8], labels int64 [1797])``."""
    from sklearn.datasets import load_digits  # scikit-learn takes about a second to import: only when needed

    data = load_digits()
    grey = np.clip(np.rint(data.images.astype(np.float64) * 255.0 / 16.0), 0, 255)
    return torch.from_numpy(grey).float(), torch.from_numpy(data.target.astype(np.int64))


def digit_image(grey8: Tensor | np.ndarray, side: int = IMAGE_SIDE) -> Image.Image:
    """An 8x8 grey digit (0–255, from :func:`load_digit_pixels`) as an RGB PIL image, NEAREST-upscaled to ``side``."""
    grey = np.asarray(grey8, dtype=np.float32).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((side, side), Image.NEAREST).convert("RGB")


def nearest_upscale_matrix(small: int = 8, size: int = IMAGE_SIDE) -> Tensor:
    """``U [size, small]`` with ``U[r, r * small // size] = 1``: ``U @ x @ U.T`` is PIL's NEAREST upscale."""
    u = torch.zeros(size, small)
    u[torch.arange(size), torch.arange(size) * small // size] = 1.0
    return u


def _pil_bicubic(x: Tensor, a: float = -0.5) -> Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def crop_resize_weights(start: Tensor, length: Tensor, size: int = IMAGE_SIDE, in_size: int = IMAGE_SIDE,
                        small: int | None = None) -> Tensor:
    """PIL's bicubic resize of the crops ``[start, start + length)`` to ``size``, as matrices.

    Row ``i`` holds the normalised weights PIL (``ImagingResample``: bicubic a=-0.5, support 2, at most 5
    taps) gives the source pixels for output pixel ``i``; crops are at most ``in_size`` long (upsampling).
    Returns ``[B, size, in_size]``, or, with ``small``, the weights summed per NEAREST-upscale bin
    (source pixel ``r`` -> ``r * small // in_size``): ``[B, size, small]``, i.e. ``weights @ U``.
    """
    start = start.double()[:, None, None]
    length = length.double()[:, None, None]
    center = (torch.arange(size, dtype=torch.float64)[None, :, None] + 0.5) * length / size
    xmin = (center - 1.5).trunc().clamp_min(0)
    xmax = torch.minimum((center + 2.5).trunc(), length)
    taps = xmin + torch.arange(5, dtype=torch.float64)  # [B, size, 5], positions within the crop
    w = torch.where(taps < xmax, _pil_bicubic(taps - center + 0.5), torch.zeros(()))
    w = w / w.sum(dim=2, keepdim=True)
    source = (start + taps).clamp(0, in_size - 1).long()
    columns = source * small // in_size if small is not None else source
    out = torch.zeros(w.shape[0], size, small or in_size, dtype=torch.float64)
    return out.scatter_add_(2, columns, w).float()


def sample_crops(n: int, generator: torch.Generator, size: int = IMAGE_SIDE, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO, attempts: int = 10) -> Tensor:
    """``n`` RandomResizedCrop boxes ``[n, 4]`` (top, left, h, w) with torchvision's rule, vectorised.

    Up to ``attempts`` draws of (area fraction, log aspect) per sample; the first that fits wins, else the
    whole (square) image.
    """
    area = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator) * size * size
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((n,), -1))
    rows = torch.arange(n)
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(size)))
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(size)))
    u = torch.rand(n, 2, generator=generator)
    top = (u[:, 0] * (size - h + 1)).floor()
    left = (u[:, 1] * (size - w + 1)).floor()
    return torch.stack([top, left, h, w], dim=1).long()


def render_digits(pixels: Tensor, crops: Tensor | None = None, size: int = IMAGE_SIDE) -> Tensor:
    """8x8 grey digits ``[B,8,8]`` (0-255) -> ``[B,size,size]`` grey in [0,1], as the stage-1 pipeline sees them.

    Without ``crops``: the NEAREST upscale (= the inference view, since resize/centre-crop are identities at
    224). With ``crops`` ``[B,4]`` (top, left, h, w): PIL's crop + bicubic resize of that upscaled image, in
    two passes (horizontal then vertical) each rounded and clipped to 8 bits like PIL.
    """
    u = nearest_upscale_matrix(pixels.shape[-1], size)
    if crops is None:
        return (u @ pixels @ u.t()) / 255.0
    top, left, h, w = crops.unbind(dim=1)
    small = pixels.shape[-1]
    cols = crop_resize_weights(left, w, size, small=small)  # [B, size, 8] = A_w @ U
    rows = crop_resize_weights(top, h, size, small=small)
    horizontal = (pixels @ cols.transpose(1, 2) + 0.5).floor().clamp(0, 255)  # [B, 8, size]
    return ((rows @ horizontal + 0.5).floor().clamp(0, 255)) / 255.0


def grey_to_clip(grey: Tensor) -> Tensor:
    """``[B,H,W]`` grey in [0,1] -> CLIP-normalised RGB ``[B,3,H,W]``."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (grey[:, None] - mean) / std


def grey_vision_tokens(model: ImageBindModel, grey: Tensor) -> Tensor:
    """The vision preprocessor's output for grey images ``[B,H,W]`` in [0,1], computed cheaply.

    Equal (up to float rounding) to ``preprocessor(grey_to_clip(grey))``: the Conv3d over the repeated frame
    and the three CLIP-normalised copies of one grey channel folds into one ``[D, p*p]`` matrix and a bias.
    """
    pre = model.modality_preprocessors["vision"]
    conv = pre.rgbt_stem.proj[1]
    weight = conv.weight.sum(dim=2)  # frames are repeats: [D, 3, p, p]
    std = torch.tensor(CLIP_STD, dtype=weight.dtype).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=weight.dtype).view(1, 3, 1, 1)
    w_eff = (weight / std).sum(dim=1)  # [D, p, p]
    b_eff = -(weight * (mean / std)).sum(dim=(1, 2, 3))  # [D]
    b, height, width = grey.shape
    p = w_eff.shape[-1]
    gh, gw = height // p, width // p
    patches = grey.reshape(b, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(b, gh * gw, p * p)
    tokens = patches.to(w_eff.dtype) @ w_eff.reshape(w_eff.shape[0], -1).t() + b_eff
    tokens = torch.cat([pre.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
    return tokens + pre.pos_embedding_helper((1, gh, gw))


def grey_vision_embed(model: ImageBindModel, grey: Tensor) -> Tensor:
    """Unit-norm vision embeddings of grey images ``[B,H,W]`` (fast path of ``model.encode('vision', rgb)``)."""
    tokens = grey_vision_tokens(model, grey)
    x = model.modality_trunks["vision"](tokens)
    return F.normalize(model.modality_heads["vision"](x).float(), dim=-1)
