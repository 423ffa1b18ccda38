"""LLaMA base weights read one tensor at a time, for ranks that keep only a shard of each.

:func:`open_llama` gives the config and a :class:`LazyWeights` mapping (Meta names, as
:func:`ibllm.checkpoints.llama.load_llama` returns) whose values are produced on access: a single Meta
``consolidated.00.pth`` is memory-mapped, so a rank that copies only its rows reads only those pages;
model-parallel Meta shards are concatenated per tensor; safetensors are read per tensor; GGUF tensors are
dequantized per tensor. Values keep the file's dtype (the caller casts while copying its slice). At most one
full tensor is alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibllm.checkpoints.gguf import _gguf_config, _gguf_tensor, _gguf_to_meta_key
from ibllm.checkpoints.hf import _hf_config, _hf_to_meta_key, _hf_weight_files, _UNKNOWN, hf_to_meta_qk
from ibllm.checkpoints.io import CheckpointError, PathLike, check_state_dict, llama_shapes, read_json, safe_load
from ibllm.checkpoints.meta import _meta_config, meta_shard_dim
from ibllm.config import LLaMAConfig
from ibllm.files import gguf_field, open_gguf


class LazyWeights(Mapping[str, Tensor]):
    """``{Meta name: Tensor}`` whose tensors are read when accessed; shapes are known up front."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], Tensor], source: str) -> None:
        self.shapes = {k: tuple(int(n) for n in s) for k, s in shapes.items()}
        self._read, self.source = read, source

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def stand_ins(self) -> dict[str, Tensor]:
        """Meta-device tensors of the right shapes (for shape checks that must not read data)."""
        return {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}


def open_llama(path: PathLike) -> tuple[LLaMAConfig, LazyWeights]:
    """Config and lazily read Meta-named weights of a Meta folder, Hugging Face folder or GGUF file
    (the formats and checks of :func:`ibllm.checkpoints.llama.load_llama`)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return open_gguf_llama(p)
    if p.is_dir():
        if (p / "params.json").is_file():
            return open_meta_llama(p)
        if (p / "config.json").is_file():
            return open_hf_llama(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return open_gguf_llama(ggufs[0])
        raise CheckpointError(f"{p}: not a LLaMA folder (no params.json, config.json or single .gguf file)")
    if not p.exists():
        raise CheckpointError(f"LLaMA checkpoint not found: {p}")
    raise CheckpointError(f"{p}: unrecognised LLaMA checkpoint (expected a folder or a .gguf file)")


def _checked(cfg: LLaMAConfig, weights: LazyWeights, what: str) -> tuple[LLaMAConfig, LazyWeights]:
    check_state_dict(weights.stand_ins(), llama_shapes(cfg), what)
    return cfg, weights


def open_meta_llama(directory: PathLike) -> tuple[LLaMAConfig, LazyWeights]:
    """A Meta folder (``params.json`` + ``consolidated.NN.pth``), memory-mapped; shards merged per tensor."""
    d = Path(directory)
    params = read_json(d / "params.json", "Meta LLaMA params")
    files = sorted(d.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"no consolidated.*.pth weights in Meta LLaMA folder {d}")
    shards = [safe_load(f, "Meta LLaMA shard", mmap=True) for f in files]
    keys = [k for k in shards[0] if k != "rope.freqs"]
    for s, f in zip(shards[1:], files[1:]):
        if set(s) != set(shards[0]):
            raise CheckpointError(f"Meta LLaMA shard {f} has a different key set from {files[0]}")
    dims: dict[str, int | None] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for k in keys:
        try:
            dims[k] = meta_shard_dim(k) if len(shards) > 1 else None
        except KeyError:
            raise CheckpointError(f"Meta LLaMA shard {files[0]}: unexpected key {k!r}; cannot merge "
                                  f"{len(shards)} model-parallel shards") from None
        shape = list(shards[0][k].shape)
        if dims[k] is not None:
            shape[dims[k]] = sum(int(s[k].shape[dims[k]]) for s in shards)
        shapes[k] = tuple(shape)

    def read(key: str) -> Tensor:
        dim = dims[key]
        return shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim=dim)

    weights = LazyWeights(shapes, read, str(d))
    cfg = _meta_config(params, weights.stand_ins(), d)
    return _checked(cfg, weights, f"Meta LLaMA checkpoint {d}")


def open_hf_llama(directory: PathLike) -> tuple[LLaMAConfig, LazyWeights]:
    """A Hugging Face ``LlamaForCausalLM`` folder, read per tensor (q/k rows converted to Meta's order)."""
    from safetensors import safe_open  # the reader of the lazy path only

    d = Path(directory)
    cfg = _hf_config(read_json(d / "config.json", "Hugging Face config"), d)
    where: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    loaded: dict[Path, dict[str, Any]] = {}
    for f in _hf_weight_files(d):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt") as handle:
                    names = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read Hugging Face weights file {f}: {e}") from e
        else:
            loaded[f] = safe_load(f, "Hugging Face weights", mmap=True)
            names = {k: tuple(v.shape) for k, v in loaded[f].items()}
        for k, shape in names.items():
            name = _hf_to_meta_key(k)
            if name is None:
                continue
            if name is _UNKNOWN:
                raise CheckpointError(f"Hugging Face LLaMA checkpoint {d}: unexpected key {k!r}")
            where[name], shapes[name] = (f, k), shape
    if cfg.tie_embeddings and "tok_embeddings.weight" in where:
        where["output.weight"], shapes["output.weight"] = where["tok_embeddings.weight"], shapes["tok_embeddings.weight"]

    def read(key: str) -> Tensor:
        f, k = where[key]
        if f in loaded:
            t = loaded[f][k]
        else:
            with safe_open(str(f), "pt") as handle:
                t = handle.get_tensor(k)
        if key.endswith("attention.wq.weight"):
            t = hf_to_meta_qk(t, cfg.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = hf_to_meta_qk(t, cfg.kv_heads)
        return t

    return _checked(cfg, LazyWeights(shapes, read, str(d)), f"Hugging Face LLaMA checkpoint {d}")


def open_gguf_llama(path: PathLike) -> tuple[LLaMAConfig, LazyWeights]:
    """A llama-architecture GGUF file, each tensor dequantized (fp32) when read."""
    p = Path(path)
    reader = open_gguf(p)
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF file {p}: architecture {arch!r} is not supported (only 'llama')")
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        name = _gguf_to_meta_key(t.name)
        if name is None:
            raise CheckpointError(f"GGUF file {p}: unexpected tensor {t.name!r}")
        tensors[name] = t
    shapes = {k: tuple(int(n) for n in reversed(t.shape.tolist())) for k, t in tensors.items()}
    weights = LazyWeights(shapes, lambda key: _gguf_tensor(tensors[key], p), str(p))
    cfg = _gguf_config(reader, weights.stand_ins(), p)
    if cfg.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
        weights.shapes["output.weight"] = shapes["tok_embeddings.weight"]
    return _checked(cfg, weights, f"GGUF file {p}")
