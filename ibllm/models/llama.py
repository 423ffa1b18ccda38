"""LLaMA decoder with ImageBind-LLM's gated visual injection.

State-dict names follow Meta's checkpoints (``tok_embeddings``, ``layers.{i}.attention.wq`` ...), so a
``consolidated.00.pth`` loads without renaming; the added ``layers.{i}.attention.gate`` is the per-head
zero gate of the visual injection.

Shape conventions: B batch, S sequence, D model width, H query heads, K key/value heads, hd head dim,
L adapter length (1 in every released configuration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.config import LLaMAConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm; normalises in fp32 and casts back before the weight multiply."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, positions: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Cos/sin tables ``[positions, head_dim/2]`` (fp32) of Meta's rotary embedding."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of ``x [B,S,H,hd]`` by the angles of ``cos/sin [S,hd/2]``.

    This is the Meta "interleaved" layout, not Hugging Face's rotate-half; computed in fp32.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def base_linear(module: nn.Module) -> nn.Module:
    """The plain Linear under a peft LoRA wrapper (or the module itself when not wrapped)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@dataclass
class KVCache:
    """Preallocated keys and values ``[B,K,T,hd]`` of one attention layer."""

    k: Tensor
    v: Tensor

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B,K,S,hd]`` at ``start_pos`` and return the cache up to ``start_pos + S``."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class AdapterState:
    """One layer's projected visual adapter: values ``[B,H,L,hd]`` and, when L > 1, keys ``[B,H,L,hd]``."""

    values: Tensor
    keys: Tensor | None = None


class Attention(nn.Module):
    """Grouped-query self-attention with the gated visual injection of ImageBind-LLM.

    Paper Eq. 2 writes the injection as ``T_j = T_I * g_zero + T_W^j`` (a scalar zero gate adding the
    transformed image feature to every word token). The released weights need the official form instead
    which this module implements: for layer l the adapter ``a_l = T_I + prefix[l]`` is
    projected by the layer's frozen base ``wv`` (no LoRA, no bias), scaled per head by ``tanh(gate)``
    (``gate [1,H,1,1]``, zero-initialised, so training starts from the plain LLM), and added to the
    attention output of every position before ``wo``. The residual stream therefore receives
    ``Wo(concat_h[tanh(g_h) * (Wv a_l)_h])`` on top of the normal attention output.
    """

    def __init__(self, cfg: LLaMAConfig, bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=bias)
        self.gate = nn.Parameter(torch.zeros(1, self.n_heads, 1, 1))
        if bias:
            for linear in (self.wq, self.wo):
                nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.unflatten(-1, (n, self.head_dim))

    def _expand_kv(self, x: Tensor) -> Tensor:
        """Repeat K key/value heads of ``x [B,K,...]`` to H query heads."""
        groups = self.n_heads // self.n_kv_heads
        return x if groups == 1 else x.repeat_interleave(groups, dim=1)

    def adapter_state(self, adapter: Tensor) -> AdapterState:
        """Project ``adapter [B,L,D]`` through the frozen base ``wv`` (and ``wk`` when L > 1)."""
        values = self._expand_kv(self._heads(base_linear(self.wv)(adapter), self.n_kv_heads).transpose(1, 2))
        keys = None
        if adapter.shape[1] > 1:
            keys = self._expand_kv(self._heads(base_linear(self.wk)(adapter), self.n_kv_heads).transpose(1, 2))
        return AdapterState(values, keys)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int = 0, cache: KVCache | None = None,
                adapter: AdapterState | None = None, queries_from: int = 0) -> Tensor:
        """``x [B,S,D]`` (already attention-normed) -> ``[B,S-queries_from,D]``; ``cos/sin`` cover positions
        start_pos... Keys and values come from every position of ``x``, queries (and so outputs) only from
        ``queries_from`` on."""
        bsz, seqlen, _ = x.shape
        xq = x[:, queries_from:] if queries_from else x
        q_cos, q_sin = (cos[queries_from:], sin[queries_from:]) if queries_from else (cos, sin)
        q = apply_rope(self._heads(self.wq(xq), self.n_heads), q_cos, q_sin).transpose(1, 2)
        k = apply_rope(self._heads(self.wk(x), self.n_kv_heads), cos, sin).transpose(1, 2)
        v = self._heads(self.wv(x), self.n_kv_heads).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        q_len, first_q = seqlen - queries_from, start_pos + queries_from
        mask, causal = None, False
        if q_len > 1 and first_q == 0 and k.shape[2] == q_len:
            causal = True
        elif q_len > 1:  # queries after a cached or skipped prefix: query t sees keys 0..first_q+t (the
            # official code builds a [seqlen, seqlen] mask here, wrong once start_pos > 0)
            q_pos = torch.arange(first_q, first_q + q_len, device=x.device)
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        if adapter is not None:
            gate = torch.tanh(self.gate).to(out.dtype)
            values = adapter.values.to(out.dtype)
            if adapter.keys is None:
                out = out + gate * values
            else:
                scores = (q @ adapter.keys.to(q.dtype).transpose(-1, -2)).float() / math.sqrt(self.head_dim)
                out = out + (gate * scores.softmax(-1).to(out.dtype)) @ values
        return self.wo(out.transpose(1, 2).reshape(bsz, q_len, -1))


class FeedForward(nn.Module):
    """SwiGLU FFN ``w2(SiLU(w1 x) * w3 x)``; biases on all three in stage 2."""

    def __init__(self, cfg: LLaMAConfig, bias: bool = False) -> None:
        super().__init__()
        hidden = cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=bias)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=bias)
        if bias:
            for linear in (self.w1, self.w2, self.w3):
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))``."""

    def __init__(self, cfg: LLaMAConfig, bias: bool = False) -> None:
        super().__init__()
        self.attention = Attention(cfg, bias)
        self.feed_forward = FeedForward(cfg, bias)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int = 0, cache: KVCache | None = None,
                adapter: AdapterState | None = None, queries_from: int = 0) -> Tensor:
        """``x [B,S,D]`` -> ``[B,S-queries_from,D]``: the outputs of positions ``queries_from`` on (every
        position still serves as a key and value)."""
        residual = x[:, queries_from:] if queries_from else x
        h = residual + self.attention(self.attention_norm(x), cos, sin, start_pos, cache, adapter, queries_from)
        return h + self.feed_forward(self.ffn_norm(h))


class LLaMA(nn.Module):
    """The decoder. ``bias=True`` adds the stage-2 zero-initialised biases on wq, wo, w1, w2, w3."""

    def __init__(self, cfg: LLaMAConfig, bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, bias) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def first_query_layer(self) -> int:
        """Index of the first layer that receives the visual token."""
        return self.cfg.n_layers - self.cfg.n_query_layers

    def rope(self, start: int, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cos/sin for positions ``start..end-1`` (tables of ``2 * max_seq_len`` positions, cached per device)."""
        if device not in self._rope:
            with torch.inference_mode(False):  # a table first built during generation must serve training too
                self._rope[device] = rope_tables(self.cfg.head_dim, 2 * self.cfg.max_seq_len, self.cfg.rope_theta,
                                                  device)
        cos, sin = self._rope[device]
        if end > cos.shape[0]:
            raise ValueError(f"position {end} exceeds the RoPE table ({cos.shape[0]} = 2 x max_seq_len)")
        return cos[start:end], sin[start:end]

    def adapter_states(self, visual: Tensor, prefix: Tensor) -> list[AdapterState | None]:
        """Per-layer projected adapters for ``visual [B,L,D]`` and ``prefix [Q,L,D]`` (Q query layers).

        Computed once per request during generation; layers before ``first_query_layer`` get None.
        """
        first = self.first_query_layer
        states: list[AdapterState | None] = [None] * first
        for offset, layer in enumerate(self.layers[first:]):
            states.append(layer.attention.adapter_state(visual + prefix[offset].to(visual.dtype)))
        return states

    def new_cache(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        """Zeroed KV caches for every layer, sized ``[batch_size, K, max_len, hd]``."""
        shape = (batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim)
        return [KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in self.layers]

    def forward(self, tokens: Tensor, adapters: list[AdapterState | None] | None = None, start_pos: int = 0,
                caches: list[KVCache] | None = None, last_only: bool = False,
                logits_at: Tensor | None = None) -> Tensor:
        """``tokens [B,S]`` -> logits ``[B,S,V]`` (``[B,1,V]`` with ``last_only``), fp32-or-compute dtype.

        ``logits_at [B,S]`` (bool) projects only the selected positions and returns ``[N,V]`` in row-major
        order of the mask: the output projection is per position, so these rows equal the full logits there.
        """
        if logits_at is not None:
            if caches is not None or start_pos or last_only:
                raise ValueError("logits_at is for whole-sequence forwards (no KV cache, start_pos 0, not last_only)")
            return self.selected_logits(tokens, adapters, logits_at)
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope(start_pos, start_pos + tokens.shape[1], tokens.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, start_pos, caches[i] if caches else None, adapters[i] if adapters else None)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))

    def selected_logits(self, tokens: Tensor, adapters: list[AdapterState | None] | None, logits_at: Tensor) -> Tensor:
        """Logits ``[N,V]`` at the True positions of ``logits_at [B,S]``, without the work no selected
        logit depends on: the columns after the last selected one (attention is causal), and in the last
        block the queries, attention output and feed-forward of the columns before the first selected one
        (only their keys and values are read). Equal to the full forward's rows up to float rounding."""
        columns = logits_at.any(0).nonzero().flatten()
        first, end = (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, tokens.shape[1])
        tokens, logits_at = tokens[:, :end], logits_at[:, :end]
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope(0, end, tokens.device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, 0, None, adapters[i] if adapters else None, first if i == last else 0)
        return self.output(self.norm(h[logits_at[:, first:]]))
