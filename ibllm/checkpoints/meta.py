"""Meta LLaMA folders: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards (load, merge, save).

State dicts use Meta's key names (``tok_embeddings.weight``, ``layers.N.attention.wq.weight``, ...), the
names the whole project uses for the LLaMA backbone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibllm.checkpoints.io import (CheckpointError, PathLike, StateDict, cast_floats, check_state_dict, llama_shapes,
                                  preview, read_json, safe_load, save_atomic, write_json)
from ibllm.config import LLaMAConfig

log = logging.getLogger(__name__)

_META_PARAM_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                      "ffn_dim_multiplier", "norm_eps", "rope_theta")
# Model-parallel split dimension per weight (None = replicated on every shard).
_META_TOP_SPLIT: dict[str, int | None] = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
                                          "rope.freqs": None}
_META_LAYER_SPLIT: dict[str, int | None] = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1, "feed_forward.w3.weight": 0,
    "attention_norm.weight": None, "ffn_norm.weight": None,
}
LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def meta_shard_dim(key: str) -> int | None:
    """Dimension along which Meta's model-parallel shards split ``key`` (None: replicated)."""
    if key in _META_TOP_SPLIT:
        return _META_TOP_SPLIT[key]
    m = LAYER_KEY.fullmatch(key)
    if m and m[2] in _META_LAYER_SPLIT:
        return _META_LAYER_SPLIT[m[2]]
    raise KeyError(key)


def load_meta_llama(directory: PathLike, dtype: torch.dtype = torch.float32) -> tuple[LLaMAConfig, StateDict]:
    """Load a Meta LLaMA folder (``params.json`` + ``consolidated.NN.pth``), merging model-parallel shards.

    Returns our config and a Meta-named state dict cast to ``dtype`` (``rope.freqs`` dropped). A
    ``vocab_size`` of -1 is resolved from the embedding. The tokenizer (``tokenizer.model`` here or in the
    parent folder, where Meta releases keep one tokenizer for all sizes) is found by
    :func:`ibllm.tokenizer.find_tokenizer`.
    """
    d = Path(directory)
    params = read_json(d / "params.json", "Meta LLaMA params")
    shard_files = sorted(d.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"no consolidated.*.pth weights in Meta LLaMA folder {d}")
    shards = [safe_load(f, "Meta LLaMA shard") for f in shard_files]
    sd = _merge_meta_shards(shards, shard_files)
    sd.pop("rope.freqs", None)
    cfg = _meta_config(params, sd, d)
    sd = cast_floats(sd, dtype)
    check_state_dict(sd, llama_shapes(cfg), f"Meta LLaMA checkpoint {d}")
    return cfg, sd


def _merge_meta_shards(shards: list[dict[str, Any]], files: list[Path]) -> StateDict:
    keys = list(shards[0])
    for s, f in zip(shards[1:], files[1:]):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise CheckpointError(f"Meta LLaMA shard {f} has a different key set from {files[0]}: {preview(diff)}")
    if len(shards) == 1:
        return dict(shards[0])
    merged: StateDict = {}
    for k in keys:
        try:
            dim = meta_shard_dim(k)
        except KeyError:
            raise CheckpointError(f"Meta LLaMA shard {files[0]}: unexpected key {k!r}; cannot merge "
                                  f"{len(shards)} model-parallel shards") from None
        parts = [s[k] for s in shards]
        merged[k] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def _meta_config(params: dict[str, Any], sd: Mapping[str, Tensor], d: Path) -> LLaMAConfig:
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{d / 'params.json'}: use_scaled_rope (LLaMA 3.1 RoPE scaling) is not supported")
    ignored = sorted(set(params) - set(_META_PARAM_FIELDS) - {"use_scaled_rope"})
    if ignored:
        log.warning("%s: ignoring params.json fields %s", d / "params.json", ignored)
    values = {k: params[k] for k in _META_PARAM_FIELDS if params.get(k) is not None}
    if values.get("vocab_size", -1) in (-1, None):
        if "tok_embeddings.weight" not in sd:
            raise CheckpointError(f"Meta LLaMA checkpoint {d}: missing key 'tok_embeddings.weight'")
        values["vocab_size"] = int(sd["tok_embeddings.weight"].shape[0])
    try:
        return LLaMAConfig(name=d.name, **values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d / 'params.json'}: invalid LLaMA parameters ({e})") from e


def _meta_params(cfg: LLaMAConfig) -> dict[str, Any]:
    if cfg.ffn_hidden_dim is not None:
        implied = LLaMAConfig(dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                              multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier).hidden_dim
        if implied != cfg.ffn_hidden_dim:
            raise CheckpointError(f"Meta params.json cannot express ffn_hidden_dim {cfg.ffn_hidden_dim} (the Meta "
                                  f"rule gives {implied} for dim {cfg.dim}, multiple_of {cfg.multiple_of})")
    params: dict[str, Any] = {"dim": cfg.dim, "multiple_of": cfg.multiple_of, "n_heads": cfg.n_heads,
                              "n_layers": cfg.n_layers, "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size}
    if cfg.n_kv_heads is not None and cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    if cfg.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = cfg.ffn_dim_multiplier
    if cfg.rope_theta != 10000.0:
        params["rope_theta"] = cfg.rope_theta
    return params


def save_meta_llama(cfg: LLaMAConfig, state_dict: Mapping[str, Tensor], directory: PathLike,
                    num_shards: int = 1) -> None:
    """Write ``params.json`` and ``num_shards`` model-parallel ``consolidated.NN.pth`` files (Meta layout).

    The inverse of :func:`load_meta_llama`. A tied output head is written as its own ``output.weight``
    (Meta files always have one), so the config reads back with ``tie_embeddings=False``.
    """
    d = Path(directory)
    check_state_dict(state_dict, llama_shapes(cfg), "state dict to save as Meta LLaMA")
    stale = [f for f in d.glob("consolidated.*.pth") if f.name not in _shard_names(num_shards)]
    if stale:
        raise CheckpointError(f"{d} already holds other Meta shards {[f.name for f in stale]}; use an empty folder")
    params = _meta_params(cfg)
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    for n, name in enumerate(_shard_names(num_shards)):
        shard = {k: _meta_shard(k, v, n, num_shards) for k, v in state_dict.items()}
        shard["rope.freqs"] = freqs.to(state_dict["tok_embeddings.weight"].dtype)
        save_atomic(shard, d / name)
    write_json(params, d / "params.json")


def _shard_names(num_shards: int) -> list[str]:
    return [f"consolidated.{n:02d}.pth" for n in range(num_shards)]


def _meta_shard(key: str, t: Tensor, n: int, num_shards: int) -> Tensor:
    dim = meta_shard_dim(key)
    if dim is None:
        return t.detach().clone()
    if t.shape[dim] % num_shards:
        raise CheckpointError(f"cannot split {key!r} of shape {list(t.shape)} into {num_shards} shards along dim {dim}")
    return t.detach().chunk(num_shards, dim=dim)[n].clone()
