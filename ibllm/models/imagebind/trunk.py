"""ImageBind trunk: a stack of pre-LayerNorm transformer blocks.

Tokens are batch-first ``[B, L, D]`` throughout (the official sequence-first layout changes nothing
numerically). Block ``i`` of ``N`` uses drop-path rate ``linspace(0, drop_path, N)[i]``; LayerNorm eps is
1e-6, the MLP is ``Linear(D, 4D) -> exact GELU -> Linear(4D, D)``; there is no layer-scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ibllm.config import ModalityConfig
from ibllm.models.imagebind.attention import MultiheadAttention

LN_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability ``p``.

    Surviving samples are scaled by ``1/(1-p)``. Identity in eval mode or when ``p == 0``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` is ``[B, ...]``; one keep/drop draw per sample along dim 0."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc1 -> GELU (erf) -> fc2`` with biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """``x + DropPath(MHA(LN1(x), mask))`` then ``x + DropPath(MLP(LN2(x)))``."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        self.attn = MultiheadAttention(dim, num_heads, bias=True, add_bias_kv=add_bias_kv)
        self.drop_path = DropPath(drop_path)
        self.norm_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, L, D]`` -> ``[B, L, D]``."""
        x = x + self.drop_path(self.attn(self.norm_1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class SimpleTransformer(nn.Module):
    """One modality's trunk: optional pre-LN (``pre_transformer_layer.0``) then ``blocks.{i}``."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        if cfg.pre_transformer_ln:
            self.pre_transformer_layer: nn.Module = nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS))
        else:
            self.pre_transformer_layer = nn.Identity()
        rates = torch.linspace(0.0, cfg.drop_path, cfg.num_blocks, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.add_bias_kv, rate) for rate in rates
        )
        self.apply(_init_trunk_weights)

    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``tokens`` ``[B, L, D]`` (and an optional additive ``[L, L]`` mask) -> ``[B, L, D]``."""
        x = self.pre_transformer_layer(tokens)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


def _init_trunk_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
