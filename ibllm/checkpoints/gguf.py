"""GGUF files (llama.cpp): llama-architecture weights, dequantized, with the config from the metadata."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ibllm.checkpoints.io import CheckpointError, PathLike, StateDict, check_state_dict, llama_shapes
from ibllm.config import LLaMAConfig
from ibllm.files import MISSING, gguf_field, open_gguf

_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
_GGUF_LAYER = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_LAYER_KEY = re.compile(r"blk\.(\d+)\.(.+)")


def _f32(x: float) -> float:
    """Shortest decimal of a float32 metadata value (1e-5 stored as f32 reads back as 1e-5)."""
    return float(str(np.float32(x)))


def load_gguf_llama(path: PathLike, dtype: torch.dtype = torch.float32) -> tuple[LLaMAConfig, StateDict]:
    """Load a llama-architecture GGUF file, dequantizing every tensor, into our config and Meta names.

    llama.cpp's converter stores q/k rows in Meta's interleaved RoPE layout already (it undoes HF's
    permutation), so no reordering is needed. A missing ``output.weight`` means tied embeddings.
    """
    p = Path(path)
    reader = open_gguf(p)
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF file {p}: architecture {arch!r} is not supported (only 'llama')")
    sd: StateDict = {}
    for t in reader.tensors:
        name = _gguf_to_meta_key(t.name)
        if name is None:
            raise CheckpointError(f"GGUF file {p}: unexpected tensor {t.name!r}")
        sd[name] = _gguf_tensor(t, p).to(dtype)
    cfg = _gguf_config(reader, sd, p)
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, llama_shapes(cfg), f"GGUF file {p}")
    return cfg, sd


def _gguf_to_meta_key(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _GGUF_LAYER_KEY.fullmatch(name)
    if m and m[2] in _GGUF_LAYER:
        return f"layers.{m[1]}.{_GGUF_LAYER[m[2]]}"
    return None


def _gguf_tensor(t: Any, p: Path) -> Tensor:
    from gguf.quants import dequantize  # imported on use (see open_gguf)

    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"GGUF file {p}: tensor {t.name!r} has unsupported type {t.tensor_type.name}") from e
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (the fastest dim) first
    arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _gguf_config(reader: Any, sd: Mapping[str, Tensor], p: Path) -> LLaMAConfig:
    def f(key: str, default: Any = MISSING) -> Any:
        return gguf_field(reader, f"llama.{key}", default)

    n_heads, n_kv, dim = f("attention.head_count"), f("attention.head_count_kv", None), f("embedding_length")
    if isinstance(n_heads, list) or isinstance(n_kv, list):
        raise CheckpointError(f"GGUF file {p}: per-layer head counts are not supported")
    if f("rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise CheckpointError(f"GGUF file {p}: partial rotary embeddings are not supported")
    if f("rope.scaling.type", "none") not in ("none",) or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"GGUF file {p}: RoPE scaling is not supported")
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError(f"GGUF file {p}: missing tensor 'token_embd.weight'")
    vocab = f("vocab_size", None) or int(sd["tok_embeddings.weight"].shape[0])
    n_kv = n_kv if n_kv not in (None, n_heads) else None
    name = "-".join(str(x) for x in (gguf_field(reader, "general.basename", None),
                                     gguf_field(reader, "general.size_label", None)) if x) or p.stem
    try:
        return LLaMAConfig(
            name=name, dim=dim, n_layers=f("block_count"), n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
            ffn_hidden_dim=f("feed_forward_length"), norm_eps=_f32(f("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(f("rope.freq_base", 10000.0)), tie_embeddings="output.weight" not in sd,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"GGUF file {p}: invalid LLaMA parameters ({e})") from e

