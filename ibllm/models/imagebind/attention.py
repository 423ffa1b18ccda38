"""Multi-head attention with ``nn.MultiheadAttention``'s parameter names, computed by SDPA.

The module is batch-first (``[B, L, D]``) but stores exactly the tensors of
``nn.MultiheadAttention(D, heads, bias=True, add_bias_kv=...)`` so official ImageBind checkpoints load
unchanged: ``in_proj_weight [3D, D]``, ``in_proj_bias [3D]``, ``out_proj.{weight,bias}`` and, with
``add_bias_kv``, ``bias_k`` / ``bias_v`` ``[1, 1, D]``. Its output equals
``nn.MultiheadAttention(...)(x, x, x, attn_mask=mask, need_weights=False)[0]`` on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Self-attention over ``[B, L, D]`` tokens (dropout 0, scale ``1/sqrt(D/heads)``)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, add_bias_kv: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's ``nn.MultiheadAttention`` initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attend ``x`` ``[B, L, D]`` to itself; returns ``[B, L, D]``.

        ``attn_mask`` is ``[L, L]`` (or broadcastable to ``[B, heads, L, L]``): a float mask is added to the
        logits (``-inf`` blocks); a bool mask follows ``nn.MultiheadAttention`` (True = blocked). With
        ``add_bias_kv`` one learned key/value position is appended and the mask gets a zero column.
        """
        b, length, dim = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=x.dtype).masked_fill(attn_mask, float("-inf"))
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(b, 1, dim)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(b, 1, dim)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
        q = q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, k.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, v.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, dim))
