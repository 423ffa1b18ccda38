"""Media preprocessing: one small function per modality from a file path / bytes to the tensor ImageBind
expects, plus :func:`load_modality`, which batches any of them.

Per-item shapes: image ``[3,224,224]``, video ``[15,3,2,224,224]``, audio ``[3,1,128,204]``, text ``[77]``
(int64), depth/thermal ``[1,224,224]``, imu ``[6,2000]``, point ``[8192,3]``. Decoders for video (PyAV),
audio (soundfile) and PLY (plyfile) are imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .audio import kaldi_fbank, load_audio, resample
from .clip_tokenizer import ClipTokenizer, default_tokenizer, tokenize
from .errors import MediaError
from .image import CLIP_MEAN, CLIP_STD, image_transform, load_image, open_rgb
from .point import load_point_cloud
from .sensors import load_depth, load_imu, load_thermal
from .video import clip_timepoints, load_video

ITEM_SHAPES: dict[str, tuple[int, ...]] = {
    "image": (3, 224, 224),
    "video": (15, 3, 2, 224, 224),
    "audio": (3, 1, 128, 204),
    "text": (77,),
    "depth": (1, 224, 224),
    "thermal": (1, 224, 224),
    "imu": (6, 2000),
    "point": (8192, 3),
}
MODALITIES = tuple(ITEM_SHAPES)


def _text_item(item: Any) -> Tensor:
    if isinstance(item, Path):
        try:
            item = item.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MediaError("text", item, f"cannot read text file: {e}") from e
    elif isinstance(item, (bytes, bytearray)):
        try:
            item = bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MediaError("text", item, f"not UTF-8 text: {e}") from e
    if not isinstance(item, str):
        raise MediaError("text", item, f"expected a string, got {type(item).__name__}")
    return default_tokenizer()(item)[0]


def _loader(modality: str, train: bool) -> Callable[[Any], Tensor]:
    return {
        "image": lambda s: load_image(s, train=train),
        "video": load_video,
        "audio": load_audio,
        "text": _text_item,
        "depth": load_depth,
        "thermal": load_thermal,
        "imu": load_imu,
        "point": load_point_cloud,
    }[modality]


def load_modality(modality: str, items: Sequence[str | Path | bytes | Tensor] | Tensor, train: bool = False
                  ) -> Tensor:
    """Load and stack a batch of one modality -> ``[B, *ITEM_SHAPES[modality]]``.

    ``modality`` is one of image, video, audio, text, depth, thermal, imu, point (case-insensitive).
    Items are paths/bytes (for text: the string itself, a ``Path`` to a UTF-8 file, or UTF-8 bytes) or
    already-preprocessed tensors of the per-item shape, which pass through (dtype-cast; int64 for text).
    A whole batch tensor ``[B, *shape]`` also passes through. ``train`` only affects images
    (RandomResizedCrop). A failing item raises :class:`MediaError` naming the modality, index and file.
    """
    modality = modality.lower()
    if modality not in ITEM_SHAPES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    shape = ITEM_SHAPES[modality]
    dtype = torch.long if modality == "text" else torch.float32
    if isinstance(items, Tensor):
        if tuple(items.shape[1:]) != shape:
            raise MediaError(modality, items, f"expected a batch [B,{','.join(map(str, shape))}], "
                                              f"got {tuple(items.shape)}")
        return items.to(dtype)
    if isinstance(items, (str, bytes, Path)):
        items = [items]
    if len(items) == 0:
        raise ValueError(f"load_modality({modality!r}) got an empty batch")
    load = _loader(modality, train)
    out = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, Tensor):
                if tuple(item.shape) != shape:
                    raise MediaError(modality, item, f"expected a tensor of shape {shape}, got "
                                                     f"{tuple(item.shape)}")
                x = item
            else:
                x = load(item)
        except MediaError as e:
            raise e.with_index(i) from e
        except Exception as e:  # noqa: BLE001 - any unexpected loader failure still names the item
            raise MediaError(modality, item, f"{type(e).__name__}: {e}", index=i) from e
        out.append(x.to(dtype))
    return torch.stack(out)


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "ITEM_SHAPES", "MODALITIES", "ClipTokenizer", "MediaError", "clip_timepoints",
    "default_tokenizer", "image_transform", "kaldi_fbank", "load_audio", "load_depth", "load_image", "load_imu",
    "load_modality", "load_point_cloud", "load_thermal", "load_video", "open_rgb", "resample", "tokenize",
]
