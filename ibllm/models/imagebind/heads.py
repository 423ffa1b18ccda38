"""ImageBind heads and postprocessors.

Heads map trunk tokens ``[B, L, D]`` to one ``[B, out_embed_dim]`` vector. Postprocessors L2-normalise it
and, for every modality but vision, multiply by ``min(exp(log_logit_scale), 100)``; the text scale is a
Parameter, the others are persistent buffers (all 0-dim, key ``modality_postprocessors.{m}.1.log_logit_scale``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.config import ImageBindConfig

HEAD_LN_EPS = 1e-6
MAX_LOGIT_SCALE = 100.0
# modality -> (initial logit scale, learnable); vision has none.
LOGIT_SCALES: dict[str, tuple[float, bool]] = {
    "text": (1 / 0.07, True),
    "audio": (20.0, False),
    "depth": (5.0, False),
    "thermal": (10.0, False),
    "imu": (5.0, False),
    "point": (1.0, False),
}


class SelectElement(nn.Module):
    """``x[:, index]``: ``[B, L, D]`` -> ``[B, D]``."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.index]


class SelectEOSAndProject(nn.Module):
    """Text head: pick the token at ``seq_len`` (EOT) for each sample, then ``proj`` (LN + Linear)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor, seq_len: Tensor) -> Tensor:
        """``x`` ``[B, L, D]``, ``seq_len`` int ``[B]`` -> ``[B, out]``."""
        return self.proj(x[torch.arange(x.shape[0], device=x.device), seq_len])


class Normalize(nn.Module):
    """L2-normalise along ``dim`` (``F.normalize``, eps 1e-12)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=self.dim)


class LearnableLogitScaling(nn.Module):
    """Multiply by ``min(exp(log_logit_scale), max_logit_scale)``; the log-scale is a 0-dim param or buffer."""

    def __init__(self, logit_scale_init: float, learnable: bool, max_logit_scale: float = MAX_LOGIT_SCALE) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale
        value = torch.full((), math.log(logit_scale_init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value, persistent=True)
        self.learnable = learnable

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(self.log_logit_scale.exp(), max=self.max_logit_scale) * x

    def extra_repr(self) -> str:
        return f"learnable={self.learnable}, max_logit_scale={self.max_logit_scale}"


def build_head(name: str, cfg: ImageBindConfig) -> nn.Module:
    """The head of modality ``name``; its Sequential indices reproduce the official keys."""
    out = cfg.out_embed_dim
    if name == "point":
        if cfg.point is None:
            raise KeyError("config has no point encoder")
        dim = cfg.point.projection_dim
        return nn.Sequential(nn.LayerNorm(dim, eps=HEAD_LN_EPS), nn.Dropout(0.5), nn.Linear(dim, out, bias=False))
    dim = cfg.modality(name).embed_dim
    if name == "text":
        return SelectEOSAndProject(nn.Sequential(nn.LayerNorm(dim, eps=HEAD_LN_EPS), nn.Linear(dim, out, bias=False)))
    layers: list[nn.Module] = [nn.LayerNorm(dim, eps=HEAD_LN_EPS), SelectElement(0)]
    if name == "imu":
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(dim, out, bias=False))
    return nn.Sequential(*layers)


def build_postprocessor(name: str) -> nn.Module:
    """``Sequential(Normalize)`` for vision, ``Sequential(Normalize, LearnableLogitScaling)`` otherwise."""
    if name == "vision":
        return nn.Sequential(Normalize(dim=-1))
    if name not in LOGIT_SCALES:
        raise KeyError(f"no ImageBind postprocessor for modality {name!r}")
    init, learnable = LOGIT_SCALES[name]
    return nn.Sequential(Normalize(dim=-1), LearnableLogitScaling(init, learnable))
