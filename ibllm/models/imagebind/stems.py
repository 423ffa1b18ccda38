"""ImageBind modality preprocessors: patch stems, CLS tokens, positional embeddings.

Every preprocessor maps its raw input to ``(tokens [B, L, D], attn_mask | None, head_kwargs)``:
``attn_mask`` goes to the trunk, ``head_kwargs`` to the head (the text EOT position ``seq_len``).
Attribute names reproduce the official state-dict keys, e.g. ``rgbt_stem.proj.1.weight`` (vision),
``depth_stem.norm_layer.weight``, ``pos_embedding_helper.pos_embed``, ``text.mask``, ``imu.pos_embed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.config import ImageBindConfig

PreprocessorOutput = tuple[Tensor, Tensor | None, dict[str, Any]]
STEM_LN_EPS = 1e-5


class PadIm2Video(nn.Module):
    """Give an image ``[B, C, H, W]`` a time axis at ``time_dim`` and repeat a single frame ``ntimes``."""

    def __init__(self, ntimes: int, time_dim: int = 2) -> None:
        super().__init__()
        self.ntimes = ntimes
        self.time_dim = time_dim

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` or ``[B, C, T, H, W]`` -> ``[B, C, T', H, W]`` (T' = ntimes when T == 1)."""
        if x.ndim == 4:
            x = x.unsqueeze(self.time_dim)
        if x.shape[self.time_dim] == 1:
            reps = [1] * x.ndim
            reps[self.time_dim] = self.ntimes
            x = x.repeat(reps)
        return x


class PatchStem(nn.Module):
    """``proj`` (a conv or a Sequential ending in one) then, optionally, ``norm_layer`` on the tokens."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Image-like input -> ``(tokens [B, N, D], grid)``, tokens flattened in (T, H, W) order."""
        y = self.proj(x)
        grid = tuple(y.shape[2:])
        tokens = y.flatten(2).transpose(1, 2)
        if self.norm_layer is not None:
            tokens = self.norm_layer(tokens)
        return tokens, grid


class PosEmbeddingHelper(nn.Module):
    """Learnable ``pos_embed [1, num_cls + prod(grid), D]``, bicubically resized when the grid differs."""

    def __init__(self, grid: tuple[int, ...], num_cls: int, dim: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_cls = num_cls
        self.pos_embed = nn.Parameter(torch.empty(1, num_cls + math.prod(grid), dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, grid: tuple[int, ...]) -> Tensor:
        """Positional embedding for a token grid ``grid`` -> ``[1, num_cls + prod(grid), D]``."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, self.grid, grid, self.num_cls)


def interpolate_pos_embed(pos: Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...],
                          num_cls: int) -> Tensor:
    """Resize the patch part of ``pos`` ``[1, num_cls + prod(old_grid), D]`` to ``new_grid`` (bicubic, 2-D).

    Only the last two grid axes (H, W) may change; leading axes (time) must match. CLS entries are kept.
    """
    if len(old_grid) != len(new_grid) or old_grid[:-2] != new_grid[:-2]:
        raise ValueError(f"cannot resize positional embedding from grid {old_grid} to {new_grid}")
    cls_pos, patch_pos = pos[:, :num_cls], pos[:, num_cls:]
    dim = pos.shape[-1]
    lead = math.prod(old_grid[:-2])
    h0, w0 = old_grid[-2:]
    x = patch_pos.reshape(lead, h0, w0, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=tuple(new_grid[-2:]), mode="bicubic", align_corners=False).to(pos.dtype)
    x = x.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, x], dim=1)


class PatchPreprocessor(nn.Module):
    """Vision / audio / depth / thermal: stem -> prepend CLS -> add positional embedding."""

    def __init__(self, stem_name: str, stem: PatchStem, grid: tuple[int, ...], dim: int, num_cls: int = 1) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, num_cls, dim))
        nn.init.normal_(self.cls_token, std=dim ** -0.5)
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.pos_embedding_helper = PosEmbeddingHelper(grid, num_cls, dim)

    def forward(self, x: Tensor) -> PreprocessorOutput:
        """Image-like input ``[B, C, ...]`` -> ``([B, num_cls + N, D], None, {})``."""
        tokens, grid = getattr(self, self.stem_name)(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        return tokens + self.pos_embedding_helper(grid), None, {}


class TextPreprocessor(nn.Module):
    """Token embedding + positional embedding; carries the causal mask buffer ``mask [ctx, ctx]``."""

    def __init__(self, vocab_size: int, context: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, context, dim))
        self.register_buffer("mask", causal_mask(context), persistent=True)
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, text: Tensor) -> PreprocessorOutput:
        """``text`` int64 ``[B, L]`` (L <= context, normally 77) -> ``([B, L, D], mask [L, L], {seq_len: [B]})``.

        ``seq_len`` is the arg-max token position (the EOT token has the largest id).
        """
        length = text.shape[1]
        tokens = self.token_embedding(text) + self.pos_embed[:, :length]
        return tokens, self.mask[:length, :length], {"seq_len": text.argmax(dim=-1)}


class IMUPreprocessor(nn.Module):
    """IMU ``[B, C, T]``: unfold time into windows of ``kernel``, Linear + LN, prepend CLS, add ``pos_embed``."""

    def __init__(self, channels: int, length: int, kernel: int, dim: int, num_cls: int = 1) -> None:
        super().__init__()
        self.kernel = kernel
        self.pos_embed = nn.Parameter(torch.empty(1, length // kernel + num_cls, dim))
        self.cls_token = nn.Parameter(torch.empty(1, num_cls, dim))
        self.imu_stem = PatchStem(nn.Linear(channels * kernel, dim, bias=False), nn.LayerNorm(dim, eps=STEM_LN_EPS))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=dim ** -0.5)

    def forward(self, imu: Tensor) -> PreprocessorOutput:
        """``[B, C, T]`` -> ``([B, num_cls + T // kernel, D], None, {})``."""
        windows = imu.unfold(-1, self.kernel, self.kernel).permute(0, 2, 1, 3)  # [B, W, C, k]
        windows = windows.reshape(windows.shape[0], windows.shape[1], -1)
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(windows))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        if tokens.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"IMU input gives {tokens.shape[1]} tokens, positional embedding has "
                             f"{self.pos_embed.shape[1]} (expected {self.pos_embed.shape[1] - 1} windows)")
        return tokens + self.pos_embed, None, {}


def causal_mask(context: int) -> Tensor:
    """``[context, context]`` float mask: 0 on and below the diagonal, ``-inf`` strictly above."""
    return torch.full((context, context), float("-inf")).triu(1)


def conv_grid(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """Output spatial shape of an unpadded convolution."""
    return tuple((s - k) // st + 1 for s, k, st in zip(size, kernel, stride))


def build_preprocessor(name: str, cfg: ImageBindConfig) -> nn.Module:
    """The preprocessor of modality ``name`` with its shapes derived from ``cfg``."""
    dim = cfg.modality(name).embed_dim
    if name == "vision":
        kernel = (cfg.video_frames, cfg.vision_patch, cfg.vision_patch)
        grid = conv_grid((cfg.video_frames, cfg.image_size, cfg.image_size), kernel, kernel)
        proj = nn.Sequential(PadIm2Video(cfg.video_frames, time_dim=2),
                             nn.Conv3d(3, dim, kernel_size=kernel, stride=kernel, bias=False))
        return PatchPreprocessor("rgbt_stem", PatchStem(proj), grid, dim)
    if name == "text":
        return TextPreprocessor(cfg.text_vocab_size, cfg.text_context, dim)
    if name == "audio":
        k, s = (cfg.audio_kernel,) * 2, (cfg.audio_stride,) * 2
        grid = conv_grid((cfg.audio_mel_bins, cfg.audio_target_len), k, s)
        stem = PatchStem(nn.Conv2d(1, dim, kernel_size=k, stride=s, bias=False), nn.LayerNorm(dim, eps=STEM_LN_EPS))
        return PatchPreprocessor("rgbt_stem", stem, grid, dim)
    if name in ("depth", "thermal"):
        kernel = cfg.depth_kernel if name == "depth" else cfg.thermal_kernel
        k = (kernel, kernel)
        grid = conv_grid((cfg.image_size, cfg.image_size), k, k)
        stem = PatchStem(nn.Conv2d(1, dim, kernel_size=k, stride=k, bias=False), nn.LayerNorm(dim, eps=STEM_LN_EPS))
        return PatchPreprocessor("depth_stem" if name == "depth" else "rgbt_stem", stem, grid, dim)
    if name == "imu":
        return IMUPreprocessor(cfg.imu_channels, cfg.imu_length, cfg.imu_kernel, dim)
    raise KeyError(f"no ImageBind preprocessor for modality {name!r}")
