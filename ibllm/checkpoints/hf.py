"""Hugging Face ``LlamaForCausalLM`` folders: ``config.json`` + safetensors (or ``.bin``) weights.

Loading converts to Meta names and Meta's interleaved RoPE row order; saving is the exact inverse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibllm.checkpoints.io import (CheckpointError, PathLike, StateDict, cast_floats, check_state_dict, llama_shapes,
                                  read_json, safe_load, save_atomic, write_json)
from ibllm.checkpoints.meta import LAYER_KEY
from ibllm.config import LLaMAConfig

_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_LAYER_INV = {v: k for k, v in _HF_LAYER.items()}
_HF_TOP_INV = {v: k for k, v in _HF_TOP.items()}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_to_meta_qk(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k projection rows from HF's rotate-half RoPE layout to Meta's interleaved layout.

    Per head, HF keeps the real parts of all pairs first and the imaginary parts second; Meta keeps each
    pair adjacent. ``n_heads`` is the number of heads the rows hold (``n_kv_heads`` for k).
    """
    out, rest = w.shape[0], w.shape[1:]
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(out, *rest)


def meta_to_hf_qk(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of :func:`hf_to_meta_qk`: Meta interleaved q/k rows to HF rotate-half rows."""
    out, rest = w.shape[0], w.shape[1:]
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def load_hf_llama(directory: PathLike, dtype: torch.dtype = torch.float32) -> tuple[LLaMAConfig, StateDict]:
    """Load a Hugging Face ``LlamaForCausalLM`` folder into our config and a Meta-named state dict.

    Reads ``config.json`` and ``model.safetensors`` (or a sharded ``*.index.json``, or ``pytorch_model*.bin``
    through the safe loader). q/k rows are converted from rotate-half to Meta's interleaved layout (k with
    ``n_kv_heads``); a tied head becomes ``output.weight`` sharing the embedding tensor.
    """
    d = Path(directory)
    cfg = _hf_config(read_json(d / "config.json", "Hugging Face config"), d)
    raw: dict[str, Tensor] = {}
    for f in _hf_weight_files(d):
        raw.update(safe_load(f, "Hugging Face weights"))
    sd: StateDict = {}
    for k, v in raw.items():
        name = _hf_to_meta_key(k)
        if name is None:
            continue
        if name is _UNKNOWN:
            raise CheckpointError(f"Hugging Face LLaMA checkpoint {d}: unexpected key {k!r}")
        sd[name] = v
    sd = cast_floats(sd, dtype)
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, llama_shapes(cfg), f"Hugging Face LLaMA checkpoint {d}")
    for i in range(cfg.n_layers):
        sd[f"layers.{i}.attention.wq.weight"] = hf_to_meta_qk(sd[f"layers.{i}.attention.wq.weight"], cfg.n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = hf_to_meta_qk(sd[f"layers.{i}.attention.wk.weight"], cfg.kv_heads)
    return cfg, sd


_UNKNOWN = "<unknown>"


def _hf_to_meta_key(key: str) -> str | None:
    if key in _HF_TOP:
        return _HF_TOP[key]
    m = _HF_LAYER_KEY.fullmatch(key)
    if m:
        if m[2].endswith("rotary_emb.inv_freq"):
            return None
        if m[2] in _HF_LAYER:
            return f"layers.{m[1]}.{_HF_LAYER[m[2]]}"
    return _UNKNOWN


def _meta_to_hf_key(key: str) -> str:
    if key in _HF_TOP_INV:
        return _HF_TOP_INV[key]
    m = LAYER_KEY.fullmatch(key)
    if m and m[2] in _HF_LAYER_INV:
        return f"model.layers.{m[1]}.{_HF_LAYER_INV[m[2]]}"
    raise CheckpointError(f"no Hugging Face name for key {key!r}")


def _hf_weight_files(d: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            weight_map = read_json(d / index, "Hugging Face weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"Hugging Face weight index {d / index} has no weight_map")
            return [d / f for f in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    raise CheckpointError(f"no model.safetensors, pytorch_model.bin or weight index in Hugging Face folder {d}")


def _hf_config(c: dict[str, Any], d: Path) -> LLaMAConfig:
    src = d / "config.json"
    if c.get("model_type") != "llama":
        raise CheckpointError(f"{src}: model_type {c.get('model_type')!r} is not 'llama'")
    theta = c.get("rope_theta", 10000.0)
    rope = c.get("rope_scaling") or c.get("rope_parameters")
    if isinstance(rope, dict):
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"{src}: RoPE scaling {rope} is not supported")
        theta = rope.get("rope_theta", theta)
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise CheckpointError(f"{src}: attention_bias / mlp_bias LLaMA variants are not supported")
    n_heads, dim = c["num_attention_heads"], c["hidden_size"]
    if c.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{src}: head_dim {c['head_dim']} != hidden_size / num_attention_heads")
    n_kv = c.get("num_key_value_heads") or n_heads
    try:
        return LLaMAConfig(
            name=d.name, dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=n_kv if n_kv != n_heads else None, vocab_size=c["vocab_size"],
            ffn_hidden_dim=c["intermediate_size"], norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"{src}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src}: invalid LLaMA parameters ({e})") from e


def save_hf_llama(cfg: LLaMAConfig, state_dict: Mapping[str, Tensor], directory: PathLike) -> None:
    """Write a Hugging Face ``LlamaForCausalLM`` folder (``config.json`` + ``model.safetensors``).

    The inverse of :func:`load_hf_llama`: q/k rows go back to rotate-half; a tied head is not stored.
    """
    d = Path(directory)
    check_state_dict(state_dict, llama_shapes(cfg), "state dict to save as Hugging Face LLaMA")
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k == "output.weight" and cfg.tie_embeddings:
            continue
        if k.endswith("attention.wq.weight"):
            v = meta_to_hf_qk(v, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = meta_to_hf_qk(v, cfg.kv_heads)
        out[_meta_to_hf_key(k)] = v
    dtype = str(state_dict["tok_embeddings.weight"].dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
    }
    save_atomic(out, d / "model.safetensors", metadata={"format": "pt"})
    write_json(config, d / "config.json")

