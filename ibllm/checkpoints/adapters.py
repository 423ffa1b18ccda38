"""Adapter files: reading any of them into our names, the base-model fingerprint, and the one checked loader.

An adapter is the trainable part of an ImageBind-LLM. :func:`read_adapter` accepts our Lightning checkpoint
(a stage-2 checkpoint pulls its stage-1 tensors from the ``init_from`` it was trained from), our
``safetensors`` export, an official ImageBind-LLM file (``7B.pth`` / ``7B-pretrained.pth`` layout, detected
automatically), a flat state dict, or a ``merged`` export folder (:mod:`ibllm.checkpoints.export`).

What the files say about the model is read from them rather than restated by the user: the stage,
``visual_dim``, LoRA rank and number of query layers from tensor shapes (:func:`adapter_dims`), the ImageBind
preset and branches from the encoder file's keys and shapes (:func:`infer_imagebind`).

Our files store a fingerprint of the frozen base weights (:func:`base_fingerprint`); loading them on a
different base model (e.g. plain LLaMA-7B under an adapter trained on Open-Chinese-LLaMA-7B, whose
embeddings differ) raises :class:`BaseModelMismatch`. Official files carry no identity.

Every tensor that goes into a model from a file goes through :func:`load_checked`: each key must exist in
the model with the same shape, and the keys a caller requires must be present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ibllm.checkpoints.io import CheckpointError, PathLike, preview, safe_load
from ibllm.checkpoints.official import load_official_adapter, official_to_ours
from ibllm.config import IMAGEBIND_PRESETS
from ibllm.meta_init import assign_full
from ibllm.models.imagebind.encoder import _strip_prefix, imagebind_summary, key_modality, read_state_dict
from ibllm.models.llama import base_linear
from ibllm.tuning import is_trainable

log = logging.getLogger(__name__)

MERGED_CONFIG = "ibllm.json"
MERGED_EXTRA = "extra.safetensors"
SAFETENSORS_META_KEY = "ibllm"
# The visual adapter is projected by a layer's *un-merged* base wv; merged exports keep that weight here.
VISUAL_WV = "attention.wv_visual.weight"
STAGE1_KEYS = ("image_bind_proj.weight", "prefix_query.weight")


class BaseModelMismatch(ValueError):
    """The base LLaMA given to ``ibllm.load`` is not the one the adapter was trained on."""


# --------------------------------------------------------------------------------------------------------
# Base-model identity
# --------------------------------------------------------------------------------------------------------


def _fingerprint_tensors(llama: nn.Module) -> list[tuple[str, Tensor]]:
    """A few deterministic slices of the frozen base weights (never norms: stage 2 trains them)."""
    n = len(llama.layers)
    picks: list[tuple[str, Tensor]] = [("tok_embeddings", llama.tok_embeddings.weight)]
    for i in sorted({0, n // 2, n - 1}):
        block = llama.layers[i]
        for lin in ("wq", "wk", "wv", "wo"):
            picks.append((f"{i}.{lin}", base_linear(getattr(block.attention, lin)).weight))
        for lin in ("w1", "w2", "w3"):
            picks.append((f"{i}.{lin}", base_linear(getattr(block.feed_forward, lin)).weight))
    if llama.output.weight is not llama.tok_embeddings.weight:
        picks.append(("output", llama.output.weight))
    out = []
    for name, w in picks:
        w = w.detach()
        if hasattr(w, "full_tensor"):  # DTensor (FSDP): gather only what we hash
            w = w.full_tensor()
        rows = torch.linspace(0, w.shape[0] - 1, steps=min(8, w.shape[0])).long()
        out.append((f"{name}{list(w.shape)}", w[rows, : min(256, w.shape[1])]))
    return out


def base_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 over a few slices of the frozen base LLaMA weights of ``model`` (ImageBindLLM or LLaMA).

    Values are rounded to bfloat16 before hashing, so fp32 and bf16 storage of the same base give the same
    fingerprint; LoRA, biases, norms and gates are not included. The result is cached on the module
    (frozen weights do not change). Returns None (with a warning) when the weights cannot be read.
    """
    cached = model.__dict__.get("_ibllm_base_fingerprint")
    if cached is not None:
        return cached
    llama = getattr(model, "llama", model)
    try:
        h = hashlib.sha256(b"ibllm-base-v1")
        for name, t in _fingerprint_tensors(llama):
            h.update(name.encode())
            h.update(t.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        value = h.hexdigest()[:32]
    except Exception as e:  # meta tensors, exotic sharding: a checkpoint must still be written
        log.warning("could not fingerprint the base model (%s: %s)", type(e).__name__, e)
        return None
    model.__dict__["_ibllm_base_fingerprint"] = value
    return value


# --------------------------------------------------------------------------------------------------------
# Reading adapters
# --------------------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """Trainable tensors under our (peft) names plus what the file says about its training."""

    state: dict[str, Tensor]
    kind: str  # "lightning" | "official" | "safetensors" | "flat" | "merged"
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        """``finetune`` when the adapter has LoRA tensors, else ``pretrain``."""
        if self.meta.get("stage") in ("pretrain", "finetune"):
            return self.meta["stage"]
        return "finetune" if any("lora_" in k for k in self.state) else "pretrain"

    @property
    def has_stage1(self) -> bool:
        """True when the bind network and prefix queries are present."""
        return all(k in self.state for k in STAGE1_KEYS)


def read_adapter(path: PathLike, follow_init: bool = True, _depth: int = 0) -> Adapter:
    """Read any adapter file (see the module docstring) into our names.

    With ``follow_init``, a stage-2 Lightning checkpoint without the stage-1 tensors is completed from
    the ``init_from`` file it was trained from (its own tensors win).
    """
    p = Path(path)
    if p.is_dir():
        if (p / MERGED_CONFIG).is_file():
            return _read_merged_meta(p)
        raise CheckpointError(f"adapter folder {p} is not a merged ImageBind-LLM export (no {MERGED_CONFIG})")
    raw = safe_load(p, "ImageBind-LLM adapter")
    if p.suffix == ".safetensors":
        state, meta = dict(raw), _safetensors_meta(p)
        if any(_looks_official(k) for k in state):
            state = official_to_ours(state)
        adapter = Adapter(state, "safetensors", str(p), meta)
    elif "state_dict" in raw and isinstance(raw["state_dict"], dict):
        state = {k.removeprefix("model."): v for k, v in raw["state_dict"].items()}
        meta = dict(raw.get("ibllm") or {})
        hp = raw.get("hyper_parameters") or {}
        meta.setdefault("init_from", hp.get("init_from"))
        meta.setdefault("tokenizer", hp.get("tokenizer"))
        adapter = Adapter(state, "lightning", str(p), meta)
    elif isinstance(raw.get("model"), dict):
        config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        adapter = Adapter(load_official_adapter(p), "official", str(p), dict(config.get("ibllm") or {}))
    else:
        bad = [k for k, v in raw.items() if not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"adapter file {p}: not an ImageBind-LLM adapter (non-tensor entries {bad[:3]})")
        state = official_to_ours(raw) if any(_looks_official(k) for k in raw) else dict(raw)
        adapter = Adapter(state, "flat", str(p), {})
    bad_keys = [k for k in adapter.state if k.startswith("image_bind.")]
    for k in bad_keys:  # a full training checkpoint: the frozen encoder comes from the encoder file
        adapter.state.pop(k)
    if follow_init and adapter.stage == "finetune" and not adapter.has_stage1 and adapter.meta.get("init_from"):
        if _depth > 4:
            raise CheckpointError(f"{p}: init_from chain is too deep")
        add_stage1(adapter, _resolve_relative(adapter.meta["init_from"], p), _depth + 1)
    return adapter


def add_stage1(adapter: Adapter, parent: PathLike, _depth: int = 0) -> None:
    """Complete ``adapter`` in place with the stage-1 tensors (bind network, prefix queries, gates) of the
    adapter file ``parent``; the adapter's own tensors win. Records ``stage1_source`` in its meta."""
    stage1 = read_adapter(parent, follow_init=True, _depth=_depth)
    adapter.state = {**{k: v for k, v in stage1.state.items() if is_trainable(k, "pretrain")}, **adapter.state}
    adapter.meta["stage1_source"] = str(parent)


def _looks_official(key: str) -> bool:
    return bool(re.search(r"\.lora_w[qkvo123]_l[12]\.weight$", key)) or "llma." in key


def _resolve_relative(name: str, anchor: Path) -> Path:
    """``name`` as given (relative to the working directory), else relative to ``anchor``'s folders."""
    p = Path(name)
    if p.exists() or p.is_absolute():
        return p
    for base in anchor.resolve().parents:
        if (base / p).exists():
            return base / p
    return p


def _safetensors_meta(p: Path) -> dict[str, Any]:
    with safe_open(str(p), framework="pt") as f:
        header = f.metadata() or {}
    if SAFETENSORS_META_KEY in header:
        try:
            return dict(json.loads(header[SAFETENSORS_META_KEY]))
        except json.JSONDecodeError:
            log.warning("%s: unreadable ibllm metadata in the header; ignoring it", p)
    sidecar = p.with_suffix(".json")
    if sidecar.is_file():
        return dict(json.loads(sidecar.read_text(encoding="utf-8")))
    return {}


def _read_merged_meta(d: Path) -> Adapter:
    try:
        meta = json.loads((d / MERGED_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {d / MERGED_CONFIG}: {e}") from e
    if meta.get("format") != "ibllm-merged":
        raise CheckpointError(f"{d / MERGED_CONFIG}: format {meta.get('format')!r} is not 'ibllm-merged'")
    extra = safe_load(d / MERGED_EXTRA, "merged ImageBind-LLM extra tensors")
    return Adapter(dict(extra), "merged", str(d), meta)


def adapter_dims(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """LLaMAConfig fields implied by adapter tensor shapes: visual_dim, lora_rank, query_layer (None = all)."""
    dims: dict[str, Any] = {}
    if "image_bind_proj.weight" in state:
        dims["visual_dim"] = int(state["image_bind_proj.weight"].shape[1])
    lora = next((v for k, v in state.items() if re.search(r"\.lora_A(\.default)?\.weight$", k)), None)
    if lora is not None:
        dims["lora_rank"] = int(lora.shape[0])
    if "prefix_query.weight" in state:
        dims["n_query_layers"] = int(state["prefix_query.weight"].shape[0])
    return dims


# --------------------------------------------------------------------------------------------------------
# ImageBind preset inference
# --------------------------------------------------------------------------------------------------------


def infer_imagebind(path: PathLike, preset: str | None = None) -> tuple[str, list[str]]:
    """ImageBind preset and modalities of an encoder file, from its key set and tensor shapes.

    Each known preset's layout (built on the meta device) is compared with the file's keys; the first
    preset under which every key exists with the same shape wins. ``preset`` skips the guess (the
    modalities still come from the file).
    """
    try:
        state = _strip_prefix(read_state_dict(path))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(str(e)) from None
    modalities = sorted({m for k in state if (m := key_modality(k)) is not None})
    if not modalities:
        raise ValueError(f"ImageBind file {path}: no encoder keys found (expected modality_trunks.* etc.)")
    candidates = [preset] if preset else sorted(IMAGEBIND_PRESETS, key=lambda n: (n != "huge", n != "huge_w3d", n))
    for name in candidates:
        if not _preset_has(name, modalities):
            continue
        shapes = imagebind_summary(name, modalities)["shapes"]
        if all(k in shapes and list(v.shape) == shapes[k] for k, v in state.items()):
            return name, modalities
    if preset:
        raise ValueError(f"ImageBind file {path} does not match preset {preset!r}")
    raise ValueError(f"ImageBind file {path}: its tensor shapes match no known preset "
                     f"({', '.join(IMAGEBIND_PRESETS)}); pass imagebind_preset=")


def _preset_has(name: str, modalities: Sequence[str]) -> bool:
    return "point" not in modalities or IMAGEBIND_PRESETS[name].point is not None



# --------------------------------------------------------------------------------------------------------
# The one checked loader
# --------------------------------------------------------------------------------------------------------


def load_checked(model: nn.Module, state: Mapping[str, Tensor], source: str, required: Iterable[str] = ()) -> None:
    """Copy ``state`` (our names) into ``model`` after checking it; other model tensors keep their values.

    A key the model does not have, a tensor whose shape differs from the model's, or a key of
    ``required`` that ``state`` lacks raises :class:`CheckpointError` naming ``source``.
    """
    own = model.state_dict(keep_vars=True)
    check_loadable(own, state, source, required)
    nonfinite = sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if nonfinite:
        raise CheckpointError(f"{source}: non-finite values (NaN or inf) in {preview(nonfinite)}; the weights "
                              "diverged, use an earlier checkpoint")
    if any(hasattr(own[key], "device_mesh") for key in state):  # sharded (DTensor) model: each rank its slice
        for key, t in state.items():
            assign_full(own[key], t)
        return
    model.load_state_dict(dict(state), strict=False)


def check_loadable(own: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str,
                   required: Iterable[str] = ()) -> None:
    """The checks of :func:`load_checked` against the model tensors ``own`` (only shapes are read)."""
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in required if k not in state)
    if unexpected or missing:
        parts = ([f"keys the model does not have: {preview(unexpected)}"] if unexpected else []) + \
                ([f"missing keys: {preview(missing)}"] if missing else [])
        raise CheckpointError(f"{source}: {'; '.join(parts)}")
    for key, t in state.items():
        if tuple(t.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {list(t.shape)}, the model expects "
                                  f"{list(own[key].shape)}")


def load_trainable(model: nn.Module, path: PathLike) -> Adapter:
    """Load the trainable weights of any adapter file (:func:`read_adapter`, without following
    ``init_from``) into ``model`` through :func:`load_checked`; tensors the file lacks keep their values.
    Returns the adapter read."""
    adapter = read_adapter(path, follow_init=False)
    if adapter.kind == "merged":
        raise CheckpointError(f"{path}: a merged export holds folded LoRA weights, not trainable tensors; "
                              "initialise from the checkpoint it was exported from")
    load_checked(model, adapter.state, str(path))
    return adapter
