"""Checkpoint import and export: Meta LLaMA, Hugging Face LLaMA, GGUF, and official ImageBind-LLM adapters.

Every loader returns our naming (SPEC §2.2 Meta names for the LLaMA backbone, SPEC §2.11 for the full model,
with peft's names for LoRA-wrapped linears). Every file a user hands us is read through :func:`safe_load`,
which never unpickles code. The mapping between peft names and the official ImageBind-LLM names lives only
here (:func:`ours_to_official` / :func:`official_to_ours`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
from argparse import Namespace
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ibllm.atomic import atomic_write, write_text_atomic
from ibllm.config import LLaMAConfig

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
StateDict = dict[str, Tensor]

# Objects a training checkpoint (SPEC §7.4) may hold besides tensors: argparse args are harmless containers.
_SAFE_GLOBALS: list[Any] = [Namespace]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not match what was expected."""


# --------------------------------------------------------------------------------------------------------
# Safe file access
# --------------------------------------------------------------------------------------------------------


def safe_load(path: PathLike, what: str = "checkpoint", mmap: bool = True) -> dict[str, Any]:
    """Load a ``.safetensors`` file or a PyTorch pickle without ever executing code from it.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    on the CPU, memory-mapped (``mmap``) when the file format allows. A missing, corrupt or code-carrying
    file raises :class:`CheckpointError` naming the file and ``what`` it was supposed to be.
    While memory-mapped tensors are alive, replace the file only with :func:`save_atomic` (a new inode),
    never by writing it in place: truncating a mapped file crashes the process (SIGBUS).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} file not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"{what} path is not a file: {p}")
    if p.suffix == ".safetensors":
        return _load_safetensors(p, what)
    return _torch_load(p, what, mmap)


def _load_safetensors(p: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types
        raise CheckpointError(f"cannot read {what} file {p}: not a valid safetensors file ({e})") from e


def _torch_load(p: Path, what: str, mmap: bool) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                obj = torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if "global" in reason.lower():
            raise CheckpointError(
                f"refusing to load {what} file {p}: it holds objects other than tensors and plain containers, "
                f"and unpickling it could execute code (weights-only loader: {reason})"
            ) from None
        raise CheckpointError(f"cannot read {what} file {p}: corrupt, not a PyTorch checkpoint, or a pickle the "
                              f"weights-only loader does not accept ({reason})") from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read {what} file {p}: corrupt or not a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} file {p} holds a {type(obj).__name__}, expected a dict")
    return obj


def _unpickler_reason(message: str) -> str:
    """The informative line of torch's weights-only refusal (it wraps it in a long generic text)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            detail = rest or (lines[i + 1] if i + 1 < len(lines) else "")
            return detail.split(". Please use")[0]
    return lines[0] if lines else "unpickling failed"


def save_atomic(obj_or_state: Any, path: PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``obj_or_state`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    ``*.safetensors`` paths take a flat ``{name: Tensor}`` mapping (``metadata`` goes into the header);
    anything else is written with ``torch.save``. A crash never leaves a half-written file at ``path``.
    """
    p = Path(path)

    def write(tmp: str) -> None:
        if p.suffix == ".safetensors":
            _save_safetensors(obj_or_state, tmp, metadata)
        else:
            torch.save(obj_or_state, tmp)

    atomic_write(p, write)


def _save_safetensors(state: Mapping[str, Tensor], path: str, metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TypeError("a .safetensors file holds a flat {name: Tensor} mapping only")
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():  # safetensors refuses shared storage (e.g. tied embeddings)
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    save_file(out, path, metadata=metadata)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} file {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} file {path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _write_json(data: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------
# State-dict validation
# --------------------------------------------------------------------------------------------------------


def llama_shapes(cfg: LLaMAConfig) -> dict[str, tuple[int, ...]]:
    """Expected Meta-named shapes of a plain LLaMA state dict (no bias, LoRA or gates) for ``cfg``."""
    d, f, v, kv = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d)}
    for i in range(cfg.n_layers):
        pre = f"layers.{i}."
        shapes.update({
            pre + "attention.wq.weight": (d, d), pre + "attention.wk.weight": (kv, d),
            pre + "attention.wv.weight": (kv, d), pre + "attention.wo.weight": (d, d),
            pre + "feed_forward.w1.weight": (f, d), pre + "feed_forward.w2.weight": (d, f),
            pre + "feed_forward.w3.weight": (f, d),
            pre + "attention_norm.weight": (d,), pre + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (v, d)
    return shapes


def check_state_dict(sd: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str,
                     allow_missing: bool = False, allow_unexpected: bool = False) -> None:
    """Raise :class:`CheckpointError` naming ``source`` on missing/unexpected keys or a wrong shape."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing and not allow_missing:
        raise CheckpointError(f"{source}: missing key(s) {_preview(missing)} (expected {len(expected)} keys, "
                              f"found {len(sd)})")
    if unexpected and not allow_unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {_preview(unexpected)}")
    for k, shape in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {list(sd[k].shape)}, expected {list(shape)}")


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def _cast(sd: Mapping[str, Tensor], dtype: torch.dtype) -> StateDict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------------
# Meta LLaMA (params.json + consolidated.*.pth)
# --------------------------------------------------------------------------------------------------------

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
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def meta_shard_dim(key: str) -> int | None:
    """Dimension along which Meta's model-parallel shards split ``key`` (None: replicated)."""
    if key in _META_TOP_SPLIT:
        return _META_TOP_SPLIT[key]
    m = _LAYER_KEY.fullmatch(key)
    if m and m[2] in _META_LAYER_SPLIT:
        return _META_LAYER_SPLIT[m[2]]
    raise KeyError(key)


def load_meta_llama(directory: PathLike, dtype: torch.dtype = torch.float32) -> tuple[LLaMAConfig, StateDict]:
    """Load a Meta LLaMA folder (``params.json`` + ``consolidated.NN.pth``), merging model-parallel shards.

    Returns our config and a Meta-named state dict cast to ``dtype`` (``rope.freqs`` dropped). A
    ``vocab_size`` of -1 is resolved from the embedding. The tokenizer (``tokenizer.model`` here or in the
    parent folder, SPEC §2.2) is found with :func:`find_tokenizer`.
    """
    d = Path(directory)
    params = _read_json(d / "params.json", "Meta LLaMA params")
    shard_files = sorted(d.glob("consolidated.*.pth"))
    if not shard_files:
        raise CheckpointError(f"no consolidated.*.pth weights in Meta LLaMA folder {d}")
    shards = [safe_load(f, "Meta LLaMA shard") for f in shard_files]
    sd = _merge_meta_shards(shards, shard_files)
    sd.pop("rope.freqs", None)
    cfg = _meta_config(params, sd, d)
    sd = _cast(sd, dtype)
    check_state_dict(sd, llama_shapes(cfg), f"Meta LLaMA checkpoint {d}")
    return cfg, sd


def _merge_meta_shards(shards: list[dict[str, Any]], files: list[Path]) -> StateDict:
    keys = list(shards[0])
    for s, f in zip(shards[1:], files[1:]):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise CheckpointError(f"Meta LLaMA shard {f} has a different key set from {files[0]}: {_preview(diff)}")
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
    _write_json(params, d / "params.json")


def _shard_names(num_shards: int) -> list[str]:
    return [f"consolidated.{n:02d}.pth" for n in range(num_shards)]


def _meta_shard(key: str, t: Tensor, n: int, num_shards: int) -> Tensor:
    dim = meta_shard_dim(key)
    if dim is None:
        return t.detach().clone()
    if t.shape[dim] % num_shards:
        raise CheckpointError(f"cannot split {key!r} of shape {list(t.shape)} into {num_shards} shards along dim {dim}")
    return t.detach().chunk(num_shards, dim=dim)[n].clone()


def find_tokenizer(directory: PathLike) -> Path | None:
    """The tokenizer file belonging to a model folder: ``tokenizer.model`` here or in the parent (Meta,
    SPEC §2.2), else ``tokenizer.json`` here (Hugging Face); None when there is none."""
    d = Path(directory)
    for candidate in (d / "tokenizer.model", d.parent / "tokenizer.model", d / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------------------
# Hugging Face LLaMA (config.json + safetensors / bin)
# --------------------------------------------------------------------------------------------------------

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
    cfg = _hf_config(_read_json(d / "config.json", "Hugging Face config"), d)
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
    sd = _cast(sd, dtype)
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
    m = _LAYER_KEY.fullmatch(key)
    if m and m[2] in _HF_LAYER_INV:
        return f"model.layers.{m[1]}.{_HF_LAYER_INV[m[2]]}"
    raise CheckpointError(f"no Hugging Face name for key {key!r}")


def _hf_weight_files(d: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            weight_map = _read_json(d / index, "Hugging Face weight index").get("weight_map")
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
    _write_json(config, d / "config.json")


# --------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# --------------------------------------------------------------------------------------------------------

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
_MISSING = object()


def open_gguf(path: PathLike) -> Any:
    """Open a GGUF file with ``gguf.GGUFReader`` (memory-mapped); CheckpointError if missing or invalid."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {p}")
    try:
        return GGUFReader(p)
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {p}: {type(e).__name__}: {e}") from e


def gguf_field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """The decoded value of GGUF metadata ``key`` (strings, numbers, lists); ``default`` when absent."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF file {reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()


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
    from gguf.quants import dequantize

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
    def f(key: str, default: Any = _MISSING) -> Any:
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


def load_llama(path: PathLike, dtype: torch.dtype = torch.float32) -> tuple[LLaMAConfig, StateDict]:
    """Load LLaMA weights from whatever ``path`` is: a Meta folder (``params.json``), a Hugging Face folder
    (``config.json``), a ``.gguf`` file, or a folder holding exactly one ``.gguf`` file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf_llama(p, dtype)
    if p.is_dir():
        if (p / "params.json").is_file():
            return load_meta_llama(p, dtype)
        if (p / "config.json").is_file():
            return load_hf_llama(p, dtype)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf_llama(ggufs[0], dtype)
        raise CheckpointError(f"{p}: not a LLaMA folder (no params.json, config.json or single .gguf file)")
    if not p.exists():
        raise CheckpointError(f"LLaMA checkpoint not found: {p}")
    raise CheckpointError(f"{p}: unrecognised LLaMA checkpoint (expected a folder or a .gguf file)")


# --------------------------------------------------------------------------------------------------------
# Official ImageBind-LLM adapter files (SPEC §2.11, §7.5) and the peft name mapping
# --------------------------------------------------------------------------------------------------------

_LIN = r"(?P<lin>wq|wk|wv|wo|w1|w2|w3)"
_MOD = r"(?P<mod>(?:.*\.)?(?:attention|feed_forward))"
_PEFT_BASE = re.compile(rf"{_MOD}\.{_LIN}\.base_layer\.(?P<param>weight|bias)")
_PEFT_LORA = re.compile(rf"{_MOD}\.{_LIN}\.lora_(?P<ab>[AB])(?:\.default)?\.weight")
_OFFICIAL_LORA = re.compile(rf"{_MOD}\.lora_{_LIN}_l(?P<n>[12])\.weight")
_OFFICIAL_LINEAR = re.compile(rf"{_MOD}\.{_LIN}\.(?P<param>weight|bias)")
STAGES = ("pretrain", "finetune")


def ours_to_official(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename peft-wrapped keys to the official names; other keys pass through unchanged.

    ``X.wq.base_layer.{weight,bias}`` -> ``X.wq.{weight,bias}``; ``X.wq.lora_A.default.weight`` ->
    ``X.lora_wq_l1.weight`` (A, down) and ``lora_B`` -> ``lora_wq_l2`` (B, up), likewise for wk, wv, wo
    under ``attention`` and w1, w2, w3 under ``feed_forward``.
    """
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if m := _PEFT_BASE.fullmatch(k):
            name = f"{m['mod']}.{m['lin']}.{m['param']}"
        elif m := _PEFT_LORA.fullmatch(k):
            name = f"{m['mod']}.lora_{m['lin']}_l{1 if m['ab'] == 'A' else 2}.weight"
        else:
            name = k
        if name in out:
            raise CheckpointError(f"keys map to the same official name {name!r} (duplicate of {k!r})")
        out[name] = v
    return out


def official_to_ours(sd: Mapping[str, Any], lora: bool | None = None,
                     target: Iterable[str] | None = None) -> dict[str, Any]:
    """Rename official keys to ours (peft names); also ``llma`` -> ``llama`` (SPEC §7.5).

    A linear's own ``weight``/``bias`` become ``base_layer.*`` when our model wraps that linear with LoRA.
    Official names are the same in both stages while ours are not, so say which applies: ``target`` (the
    key names of the model to load into, e.g. ``model.state_dict().keys()``) decides per linear;
    otherwise ``lora=True`` wraps every wq..w3 (a stage-2 model), ``lora=False`` none (stage 1), and
    ``lora=None`` wraps exactly the linears whose ``lora_*`` keys are present in ``sd``.
    """
    renamed = {k.replace("llma", "llama"): v for k, v in sd.items()}
    if target is not None:
        wrapped = {(m["mod"], m["lin"]) for k in target if (m := _PEFT_BASE.fullmatch(k))}
    else:
        wrapped = {(m["mod"], m["lin"]) for k in renamed if (m := _OFFICIAL_LORA.fullmatch(k))}
    out: dict[str, Any] = {}
    for k, v in renamed.items():
        if m := _OFFICIAL_LORA.fullmatch(k):
            name = f"{m['mod']}.{m['lin']}.lora_{'A' if m['n'] == '1' else 'B'}.default.weight"
        elif (m := _OFFICIAL_LINEAR.fullmatch(k)) and _is_wrapped(m["mod"], m["lin"], wrapped, lora, target):
            name = f"{m['mod']}.{m['lin']}.base_layer.{m['param']}"
        else:
            name = k
        if name in out:
            raise CheckpointError(f"keys map to the same name {name!r} (duplicate of {k!r})")
        out[name] = v
    return out


def _is_wrapped(mod: str, lin: str, wrapped: set[tuple[str, str]], lora: bool | None,
                target: Iterable[str] | None) -> bool:
    if target is None and lora is not None:
        return lora
    return (mod, lin) in wrapped


def official_adapter_shapes(cfg: LLaMAConfig, stage: str) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of the released trainable-only file for ``stage`` (SPEC §7.5).

    ``pretrain``: bind network, ``prefix_query`` and every layer's gate (``7B-pretrained.pth``);
    ``finetune``: that plus every bias, LoRA and norm of the LLaMA (the ``7B.pth`` set).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    d, c, f, r = cfg.dim, cfg.visual_dim, cfg.hidden_dim, cfg.lora_rank
    kv = cfg.kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"image_bind_proj.weight": (d, c), "image_bind_proj.bias": (d,)}
    for k in (1, 2, 3):
        shapes[f"image_bind_norm_{k}.weight"] = (d,)
    for k in (1, 2, 3):
        shapes.update({f"image_bind_f1_{k}.weight": (4 * d, d), f"image_bind_f2_{k}.weight": (d, 4 * d),
                       f"image_bind_f3_{k}.weight": (4 * d, d)})
    shapes["prefix_query.weight"] = (cfg.n_query_layers, d)
    out_in = {"wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d), "w1": (f, d), "w2": (d, f), "w3": (f, d)}
    for i in range(cfg.n_layers):
        a, ff = f"llama.layers.{i}.attention.", f"llama.layers.{i}.feed_forward."
        shapes[a + "gate"] = (1, cfg.n_heads, 1, 1)
        if stage == "pretrain":
            continue
        shapes[a + "wq.bias"], shapes[a + "wo.bias"] = (d,), (d,)
        for lin in ("wq", "wk", "wv", "wo"):
            shapes[f"{a}lora_{lin}_l1.weight"] = (r, out_in[lin][1])
            shapes[f"{a}lora_{lin}_l2.weight"] = (out_in[lin][0], r)
        for lin in ("w1", "w2", "w3"):
            shapes[f"{ff}{lin}.bias"] = (out_in[lin][0],)
        for lin in ("w1", "w2", "w3"):
            shapes[f"{ff}lora_{lin}_l1.weight"] = (r, out_in[lin][1])
            shapes[f"{ff}lora_{lin}_l2.weight"] = (out_in[lin][0], r)
        shapes[f"llama.layers.{i}.attention_norm.weight"] = (d,)
        shapes[f"llama.layers.{i}.ffn_norm.weight"] = (d,)
    if stage == "finetune":
        shapes["llama.norm.weight"] = (d,)
    return shapes


def official_adapter_keys(cfg: LLaMAConfig, stage: str) -> list[str]:
    """The exact key set of the official trainable-only file for ``cfg`` and ``stage`` (SPEC §7.5)."""
    return list(official_adapter_shapes(cfg, stage))


def _is_released(key: str) -> bool:
    """SPEC §7.5 conversion rules on an official (or llma-renamed) key: True if a release keeps it."""
    if key.startswith("image_bind.") or key.startswith("prefix_projector_norm."):
        return False
    if key.startswith("llama."):
        return any(s in key for s in ("bias", "gate", "lora", "norm"))
    return True


def convert_official_checkpoint(sd: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Apply the official conversion (SPEC §7.5) to official-named keys: rename ``llma``, drop the frozen
    encoder, frozen LLaMA weights and ``prefix_projector_norm``; logs what it dropped."""
    renamed = {k.replace("llma", "llama"): v for k, v in sd.items()}
    kept = {k: v for k, v in renamed.items() if _is_released(k)}
    dropped = len(renamed) - len(kept)
    if dropped:
        log.info("%s: dropped %d frozen/encoder keys (image_bind.*, base LLaMA weights) per the official "
                 "conversion rules", source, dropped)
    return kept


def load_official_adapter(path: PathLike, cfg: LLaMAConfig | None = None,
                          stage: str | None = None) -> dict[str, Tensor]:
    """Load an official ImageBind-LLM file (``7B.pth``, ``7B-pretrained.pth`` or a training
    ``checkpoint-N.pth``) and return its trainable tensors under our (peft) names.

    Accepts ``{'model': {...}}`` (other entries such as ``config``, ``optimizer`` are ignored) or a flat
    state dict. Frozen weights (``image_bind.*``, base LLaMA) are dropped as the official conversion does.
    With ``cfg``, keys and shapes are checked against :func:`official_adapter_shapes` (exactly, when
    ``stage`` is given; otherwise as a subset of the finetune set).
    """
    p = Path(path)
    obj = safe_load(p, "ImageBind-LLM adapter")
    sd = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"ImageBind-LLM adapter file {p}: entries {_preview(bad)} are not tensors")
    kept = convert_official_checkpoint(sd, f"ImageBind-LLM adapter file {p}")
    legacy = [k for k in kept if re.fullmatch(r"image_bind_(norm_\d|f\d_\d)\.bias", k)]
    if legacy:
        raise CheckpointError(f"ImageBind-LLM adapter file {p}: key {legacy[0]!r} belongs to the legacy bind "
                              "network (legacy_bridge=True), which is not supported (SPEC §3)")
    if cfg is not None:
        expected = official_adapter_shapes(cfg, stage or "finetune")
        check_state_dict(kept, expected, f"ImageBind-LLM adapter file {p}", allow_missing=stage is None)
    return official_to_ours(kept)


def _infer_n_layers(keys: Iterable[str]) -> int:
    idx = [int(m[1]) for k in keys if (m := re.match(r"llama\.layers\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def export_official_adapter(trainable_sd: Mapping[str, Tensor], path: PathLike, stage: str,
                            cfg: LLaMAConfig | None = None) -> None:
    """Write ``{'model': {...}}`` with exactly the official key set of ``stage`` (SPEC §7.5), atomically.

    ``trainable_sd`` uses our names and may be the trainable subset or the full model state dict (frozen
    keys are dropped by the official conversion rules; keys of the other stage are left out). A required
    key that is missing, or a key no official file has, raises :class:`CheckpointError`; with ``cfg``
    shapes are checked too. ``finetune`` files need the stage-1 tensors as well (the ``7B.pth`` set).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    official = convert_official_checkpoint(ours_to_official(trainable_sd), "state dict to export")
    n_layers = cfg.n_layers if cfg is not None else _infer_n_layers(trainable_sd)
    layout = cfg or LLaMAConfig(dim=1, n_layers=max(n_layers, 1), n_heads=1)
    wanted = official_adapter_shapes(layout, stage)
    every = official_adapter_shapes(layout, "finetune")
    unknown = [k for k in official if k not in every]
    source = f"official adapter export to {Path(path)}"
    if unknown:
        raise CheckpointError(f"{source}: unexpected key(s) {_preview(unknown)} (no official file has them)")
    missing = [k for k in wanted if k not in official]
    if missing:
        raise CheckpointError(f"{source} (stage {stage}): missing key(s) {_preview(missing)}")
    if cfg is not None:
        check_state_dict({k: official[k] for k in wanted}, wanted, source)
    model = {k: _own_storage(official[k]) for k in wanted}
    save_atomic({"model": model}, path)


def _own_storage(t: Tensor) -> Tensor:
    """Detach and, for views into a larger storage, copy (torch.save would write the whole storage)."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.contiguous().clone()
    return t
