"""The bind network: ImageBind embedding (C_I) -> one LLaMA-width visual token.

Paper Eq. 1 writes a block as ``F + (F w2 * SiLU(F w1)) w3`` without normalisation; the released
weights use ``x + f2(SiLU(f1(RMSNorm(x))) * f3(RMSNorm(x)))`` (paper w1 = f1, w2 = f3, w3 = f2), three
blocks, hidden width 4·D, after a biased projection C_I -> D. Attribute names are the official ones
(``image_bind_proj``, ``image_bind_norm_k``, ``image_bind_f{1,2,3}_k``) because ImageBindLLM registers
them at its top level, where the released checkpoints keep them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.models.llama import RMSNorm

NUM_BLOCKS = 3


class BindNetwork(nn.Module):
    """``[..., in_dim] -> [..., dim]``; ``legacy=True`` builds the pre-June-2023 LayerNorm + bias variant."""

    def __init__(self, in_dim: int, dim: int, hidden_dim: int | None = None, eps: float = 1e-6,
                 legacy: bool = False) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.image_bind_proj = nn.Linear(in_dim, dim)
        for k in range(1, NUM_BLOCKS + 1):
            norm = nn.LayerNorm(dim, eps=1e-5) if legacy else RMSNorm(dim, eps)
            setattr(self, f"image_bind_norm_{k}", norm)
            setattr(self, f"image_bind_f1_{k}", nn.Linear(dim, hidden_dim, bias=legacy))
            setattr(self, f"image_bind_f2_{k}", nn.Linear(hidden_dim, dim, bias=legacy))
            setattr(self, f"image_bind_f3_{k}", nn.Linear(dim, hidden_dim, bias=legacy))

    def forward(self, x: Tensor) -> Tensor:
        x = self.image_bind_proj(x)
        for k in range(1, NUM_BLOCKS + 1):
            n = getattr(self, f"image_bind_norm_{k}")(x)
            f1, f2, f3 = (getattr(self, f"image_bind_f{j}_{k}") for j in (1, 2, 3))
            x = x + f2(F.silu(f1(n)) * f3(n))
        return x
