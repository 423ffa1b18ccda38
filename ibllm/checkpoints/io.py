"""Safe file access for checkpoints: weights-only loading, atomic saving, JSON, and state-dict checks.

Every file a user hands us is read through :func:`safe_load`, which never unpickles code; every file we
write goes through :func:`save_atomic` (a temporary file, then a rename), the one safetensors/pickle saver.
"""

from __future__ import annotations

import json
import pickle
import warnings
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ibllm.atomic import atomic_write, write_text_atomic
from ibllm.config import LLaMAConfig
from ibllm.files import CheckpointError, PathLike, check_input_file

StateDict = dict[str, Tensor]
# Lightning's name for the non-tensor part (loops, callbacks, hyper-parameters) of a sharded checkpoint folder.
SHARDED_META_FILE = "meta.pt"

# Objects a Lightning training checkpoint may hold besides tensors: argparse args are harmless containers.
_SAFE_GLOBALS: list[Any] = [Namespace]


def safe_load(path: PathLike, what: str = "checkpoint", mmap: bool = True) -> dict[str, Any]:
    """Load a ``.safetensors`` file or a PyTorch pickle without ever executing code from it.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    on the CPU, memory-mapped (``mmap``) when the file format allows. A missing, empty, truncated, corrupt
    or code-carrying file raises :class:`CheckpointError` naming the file and ``what`` it was supposed to be.
    While memory-mapped tensors are alive, replace the file only with :func:`save_atomic` (a new inode),
    never by writing it in place: truncating a mapped file crashes the process (SIGBUS).
    """
    p = check_input_file(path, what)  # missing, a folder, empty, a zip cut short: said before any parsing
    if p.suffix == ".safetensors":
        return _load_safetensors(p, what)
    return _torch_load(p, what, mmap)


def _load_safetensors(p: Path, what: str) -> dict[str, Tensor]:
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


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`CheckpointError` naming the file when missing or invalid."""
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} file {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} file {path} holds a {type(data).__name__}, expected a JSON object")
    return data


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON (trailing newline; unknown objects as ``str``) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")

# --------------------------------------------------------------------------------------------------------
# State-dict checks
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
        raise CheckpointError(f"{source}: missing key(s) {preview(missing)} (expected {len(expected)} keys, "
                              f"found {len(sd)})")
    if unexpected and not allow_unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {preview(unexpected)}")
    for k, shape in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {list(sd[k].shape)}, expected {list(shape)}")


def preview(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys and how many there are, for error messages."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


def cast_floats(sd: Mapping[str, Tensor], dtype: torch.dtype) -> StateDict:
    """``sd`` with every floating-point tensor cast to ``dtype`` (integer tensors unchanged)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}




def own_storage(t: Tensor) -> Tensor:
    """Detach and, for views into a larger storage, copy (torch.save would write the whole storage)."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.contiguous().clone()
    return t
