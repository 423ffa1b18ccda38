"""Inference API: ``ibllm.load(...)`` -> :class:`InferenceModel` with ``generate`` / ``encode`` / ``chat``.

Everything a user would otherwise restate is read from the files:

* the LLaMA shape from the base model (Meta ``params.json``, Hugging Face ``config.json`` or GGUF metadata);
* the stage, ``visual_dim``, LoRA rank and number of query layers from the adapter's tensor shapes
  (``image_bind_proj.weight`` ``[D, C]``, ``lora_A`` ``[r, in]``, ``prefix_query.weight`` ``[Q, D]``; any
  LoRA key means a stage-2 adapter);
* the ImageBind preset from the encoder file's key set and shapes (``huge``, ``huge_w3d`` with Point-Bind,
  ``demo``, ``tiny``), and the branches to build from the modalities present in it.

Adapters may be our Lightning checkpoint (a stage-2 checkpoint pulls its stage-1 tensors from the
``init_from`` it was trained from), our ``safetensors`` export, an official ImageBind-LLM file (``7B.pth``
/ ``7B-pretrained.pth`` layout, detected automatically) or a ``merged`` export folder (see
:mod:`ibllm.export`). Our files store a fingerprint of the frozen base weights (:func:`base_fingerprint`);
loading them on a different base model — e.g. plain LLaMA-7B under an adapter trained on
Open-Chinese-LLaMA (SPEC D5/P13) — raises :class:`BaseModelMismatch`. Official files carry no identity,
so only a warning about the known trap is possible there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PathLike = str | Path
MERGED_CONFIG = "ibllm.json"
MERGED_EXTRA = "extra.safetensors"
SAFETENSORS_META_KEY = "ibllm"
# The visual adapter is projected by a layer's *un-merged* base wv (SPEC §2.8); merged exports keep it here.
VISUAL_WV = "attention.wv_visual.weight"
STAGE1_KEYS = ("image_bind_proj.weight", "prefix_query.weight")


class BaseModelMismatch(ValueError):
    """The base LLaMA given to :func:`load` is not the one the adapter was trained on."""


# --------------------------------------------------------------------------------------------------------
# Base-model identity
# --------------------------------------------------------------------------------------------------------


def _fingerprint_tensors(llama: nn.Module) -> list[tuple[str, Tensor]]:
    """A few deterministic slices of the frozen base weights (never norms: stage 2 trains them)."""
    from ibllm.models.llama import base_linear

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
    from ibllm.checkpoints import CheckpointError, load_official_adapter, official_to_ours, safe_load

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
        parent_path = _resolve_relative(adapter.meta["init_from"], p)
        parent = read_adapter(parent_path, follow_init=True, _depth=_depth + 1)
        from ibllm.tuning import is_trainable

        merged = {k: v for k, v in parent.state.items() if is_trainable(k, "pretrain")}
        merged.update(adapter.state)
        adapter.state = merged
        adapter.meta["stage1_source"] = str(parent_path)
    return adapter


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
    from safetensors import safe_open

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
    from ibllm.checkpoints import CheckpointError, safe_load

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
    from ibllm.config import IMAGEBIND_PRESETS
    from ibllm.models.imagebind.encoder import _strip_prefix, imagebind_summary, key_modality, read_state_dict

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
    from ibllm.config import IMAGEBIND_PRESETS

    return "point" not in modalities or IMAGEBIND_PRESETS[name].point is not None


# --------------------------------------------------------------------------------------------------------
# LoRA merging
# --------------------------------------------------------------------------------------------------------


class VisualProjectionLinear(nn.Module):
    """A merged ``wv``: forward uses the merged weight; the visual adapter is projected by the original
    base ``wv`` (``get_base_layer``), exactly as the un-merged model does (SPEC §2.8)."""

    def __init__(self, merged: nn.Linear, base: nn.Linear) -> None:
        super().__init__()
        self.merged = merged
        self.__dict__["_visual_base"] = base  # not a submodule: saved separately as wv_visual

    def get_base_layer(self) -> nn.Linear:
        return self.__dict__["_visual_base"]

    def forward(self, x: Tensor) -> Tensor:
        return self.merged(x)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA pair into its base weight in place (``W + B @ A``, scale 1 = alpha / r).

    Biases stay on the merged Linear. For ``wv`` of layers that receive the visual token, the original
    base weight is kept for the adapter projection (:class:`VisualProjectionLinear`). Returns ``model``.
    """
    llama = model.llama
    first = llama.first_query_layer
    for i, block in enumerate(llama.layers):
        for parent, names in ((block.attention, ("wq", "wk", "wv", "wo")), (block.feed_forward, ("w1", "w2", "w3"))):
            for name in names:
                layer = getattr(parent, name)
                if not hasattr(layer, "get_base_layer") or isinstance(layer, VisualProjectionLinear):
                    continue
                base = layer.get_base_layer()
                merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                   device=base.weight.device, dtype=base.weight.dtype)
                with torch.no_grad():
                    delta = torch.zeros_like(base.weight, dtype=torch.float32)
                    for key in layer.active_adapters:
                        a, b = layer.lora_A[key].weight.float(), layer.lora_B[key].weight.float()
                        delta += (b @ a) * float(layer.scaling[key])
                    merged.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
                    if base.bias is not None:
                        merged.bias.copy_(base.bias)
                merged.requires_grad_(False)
                if name == "wv" and i >= first:
                    setattr(parent, name, VisualProjectionLinear(merged, base))
                else:
                    setattr(parent, name, merged)
    model.__dict__["_merged"] = True
    return model


# --------------------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------------------


class InferenceModel:
    """A loaded ImageBind-LLM for inference: encoding, batched generation, streaming and chat.

    Attributes: ``model`` (:class:`~ibllm.models.ibllm.ImageBindLLM`, eval mode), ``tokenizer``, ``cache``
    (a visual cache with ``enhance`` or None), ``info`` (what was loaded from where).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, cache: Any = None, info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.info = info or {}

    @property
    def device(self) -> torch.device:
        return self.model.prefix_query.weight.device

    @property
    def max_seq_len(self) -> int:
        """The context length (prompt + generated tokens)."""
        return self.model.cfg.max_seq_len

    @property
    def modalities(self) -> list[str]:
        """ImageBind branches the loaded encoder has (empty without an encoder)."""
        enc = self.model.image_bind
        return list(getattr(enc, "modalities", []) or []) if enc is not None else []

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, inputs: Mapping[str, Any], cache: Any = "default") -> Tensor:
        """Mixed ImageBind embedding ``[B, C]`` of ``inputs`` (SPEC §6.1), cache-enhanced when a cache is set.

        ``inputs`` maps a modality (image, video, audio, text, point, depth, thermal, imu) to a file, a
        list of files (one per batch row), a tensor batch, ``(file, weight)``, ``[(file, weight), ...]`` or
        ``([files], weight)``; the weight defaults to 1.0. ``cache=None`` disables the model's cache.
        """
        normalised = normalise_inputs(inputs)
        if self.model.image_bind is None:
            raise ValueError("this model was loaded without an ImageBind encoder (pass imagebind=FILE to load)")
        cache = self.cache if cache == "default" else cache
        return self.model.encode(normalised, cache=cache)

    def visual(self, inputs: Mapping[str, Any] | None, cache: Any = "default") -> Tensor | None:
        """Bound visual token ``[B, 1, D]`` of ``inputs`` (None when there are no inputs)."""
        if not inputs:
            return None
        with torch.inference_mode():
            return self.model.bind(self.encode(inputs, cache))

    # ---- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, prompts: Sequence[str | Sequence[int]], template: bool = True) -> list[list[int]]:
        """Token ids (BOS first) of ``prompts``: strings are wrapped in the Alpaca instruction template
        (``template=True``) and encoded; id lists pass through. Raises when a prompt fills the context."""
        from ibllm.processing.templates import format_prompt

        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(format_prompt(p) if template else p, bos=True, eos=False)
            else:
                ids = [int(t) for t in p]
            self.check_length(ids, f"prompt {i}" if len(prompts) > 1 else "the prompt")
            out.append(ids)
        return out

    def check_length(self, ids: Sequence[int], what: str = "the prompt") -> None:
        """One clear error when ``ids`` leave no room to generate within the context."""
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"{what} is {len(ids)} tokens long; the model's context is {self.max_seq_len} tokens "
                             "(prompt + answer)")

    # ---- generation ----------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[Sequence[int]], visual: Tensor | None = None, max_gen_len: int = 256,
               temperature: float = 0.1, top_p: float = 0.75, seed: int | None = None) -> Iterator[Tensor]:
        """Raw token stream: one ``[B]`` tensor per step (-1 where a row is not generating), see
        :func:`ibllm.generation.stream_tokens`."""
        from ibllm.generation import stream_tokens

        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if visual is not None and visual.shape[0] == 1 and len(prompt_ids) > 1:
            visual = visual.expand(len(prompt_ids), -1, -1)
        if visual is not None and visual.shape[0] != len(prompt_ids):
            raise ValueError(f"{visual.shape[0]} input rows for {len(prompt_ids)} prompts; give one input per "
                             "prompt or a single input shared by all prompts")
        return stream_tokens(self.model, prompt_ids, visual, max_gen_len, temperature, top_p,
                             self.tokenizer.eos_id, generator)

    def stream_text(self, prompt_ids: Sequence[int], visual: Tensor | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the decoded text of one prompt's answer piece by piece as tokens are produced.

        Decoding is incremental over the whole answer so far; text that ends in an incomplete multi-byte
        character (U+FFFD) is held back until the next token completes it.
        """
        decoder = IncrementalDecoder(self.tokenizer)
        for step in self.stream([list(prompt_ids)], visual, **kwargs):
            tok = int(step[0])
            if tok < 0 or tok == self.tokenizer.eos_id:
                continue
            piece = decoder.push(tok)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def generate(self, inputs: Mapping[str, Any] | None, prompts: Sequence[str | Sequence[int]] | str,
                 max_gen_len: int = 256, temperature: float = 0.1, top_p: float = 0.75, cache: Any = "default",
                 template: bool = True, seed: int | None = None) -> list[str]:
        """Answers (stripped strings) for a batch of ``prompts`` conditioned on ``inputs`` (SPEC §6.2).

        ``inputs`` as in :meth:`encode` (None / {} = text only); a single input row is shared by every
        prompt. ``template=False`` sends prompt strings as they are (already formatted).
        """
        from ibllm.generation import generate_tokens

        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.prompt_ids(prompts, template)
        visual = self.visual(inputs, cache)
        if visual is not None and visual.shape[0] == 1 and len(ids) > 1:
            visual = visual.expand(len(ids), -1, -1)
        if visual is not None and visual.shape[0] != len(ids):
            raise ValueError(f"{visual.shape[0]} input rows for {len(ids)} prompts")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        out = generate_tokens(self.model, ids, visual, max_gen_len, temperature, top_p, self.tokenizer.eos_id,
                              generator)
        return [self.tokenizer.decode(o).strip() for o in out]

    def chat(self, message: str, history: Sequence[tuple[str, str]] = (), inputs: Mapping[str, Any] | None = None,
             **kwargs: Any) -> str:
        """One chat turn: the answer to ``message`` after ``history`` (``[(user, assistant), ...]``) in the
        project's multi-turn template (:mod:`ibllm.chat`). For an interactive session with streaming and
        changing inputs use :meth:`session`."""
        session = self.session(inputs)
        session.history = list(history)
        return session.send(message, **kwargs)

    def session(self, inputs: Mapping[str, Any] | None = None, cache: Any = "default") -> Any:
        """A :class:`ibllm.chat.ChatSession` on this model."""
        from ibllm.chat import ChatSession

        return ChatSession(self, inputs, cache=cache)

    def merge(self) -> "InferenceModel":
        """Fold LoRA into the base weights in place (faster decoding; same outputs up to rounding)."""
        if self.model.stage == "finetune":
            merge_lora(self.model)
        return self


class IncrementalDecoder:
    """Turns a token stream into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        """Add one id; return the new text that is safe to print (may be empty)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._delta(text)

    def flush(self) -> str:
        """Whatever is left (including a trailing replacement character of a truly broken sequence)."""
        return self._delta(self.tokenizer.decode(self.ids)) if self.ids else ""

    def _delta(self, text: str) -> str:
        if text.startswith(self.emitted):
            new = text[len(self.emitted):]
        else:  # a tokenizer that re-normalises earlier text (rare): print only what extends the common prefix
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            new = text[common:] if common == len(self.emitted) else ""
            if common < len(self.emitted):
                return ""
        self.emitted = text
        return new


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


def normalise_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Accepted input forms -> ``{modality: (items, weight)}`` as :meth:`ImageBindLLM.encode` wants.

    Checks the modality names and that the weights sum to a positive number (one clear error otherwise).
    """
    from ibllm.models.ibllm import MODALITY_BRANCH

    out: dict[str, Any] = {}
    for modality, value in inputs.items():
        if modality not in MODALITY_BRANCH:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(sorted(MODALITY_BRANCH))}")
        items, weight = _split_weight(modality, value)
        out[modality] = (items, weight)
    if out:
        total = sum(w for _, w in out.values())
        if not total > 1e-3:
            raise ValueError(f"modality weights {[w for _, w in out.values()]} sum to {total:g}; they must sum to a "
                             "positive number")
    return out


def _split_weight(modality: str, value: Any) -> tuple[Any, float]:
    def is_weight(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if isinstance(value, Tensor):
        return value, 1.0
    if isinstance(value, (str, Path, bytes)):
        return [value], 1.0
    if isinstance(value, tuple) and len(value) == 2 and is_weight(value[1]):
        items, weight = value
        if isinstance(items, Tensor):
            return items, float(weight)
        return ([items] if isinstance(items, (str, Path, bytes)) else list(items)), float(weight)
    if isinstance(value, (list, tuple)):
        pairs = [v for v in value if isinstance(v, tuple) and len(v) == 2 and is_weight(v[1])]
        if pairs and len(pairs) == len(value):
            weights = {float(w) for _, w in pairs}
            if len(weights) > 1:
                raise ValueError(f"{modality}: one weight per modality (got {sorted(weights)})")
            return [item for item, _ in pairs], weights.pop()
        if pairs:
            raise ValueError(f"{modality}: mix of weighted and unweighted items")
        return list(value), 1.0
    raise ValueError(f"{modality}: unsupported input {type(value).__name__}; give a file, a list of files or "
                     "(file, weight)")


# --------------------------------------------------------------------------------------------------------
# load()
# --------------------------------------------------------------------------------------------------------


def open_cache(cache: Any) -> Any:
    """A visual cache object (anything with ``enhance``) or a path opened with :mod:`ibllm.cache`."""
    if cache is None or hasattr(cache, "enhance"):
        return cache
    try:
        import ibllm.cache as cache_module  # issue 5: the FAISS cache model
    except ImportError as e:
        raise ValueError(f"cannot open visual cache {cache}: the cache module is not available ({e})") from None
    for name in ("load_cache", "open_cache", "load"):
        fn = getattr(cache_module, name, None)
        if callable(fn):
            return fn(cache)
    for cls in vars(cache_module).values():
        if isinstance(cls, type) and hasattr(cls, "enhance") and hasattr(cls, "load"):
            return cls.load(cache)
    raise ValueError(f"cannot open visual cache {cache}: ibllm.cache has no loader")


def load(adapter: PathLike | None = None, llama: str | PathLike | None = None, tokenizer: PathLike | None = None,
         imagebind: PathLike | None = None, cache: Any = None, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, imagebind_preset: str | None = None,
         modalities: Sequence[str] | None = None, max_seq_len: int | None = None,
         check_base: bool = True, merge: bool = False) -> InferenceModel:
    """Load an ImageBind-LLM for inference, inferring every dimension from the files.

    Args:
        adapter: our Lightning checkpoint, our ``.safetensors`` export, an official ``7B.pth`` /
            ``7B-pretrained.pth`` file, or a merged export folder. None: the plain base model.
        llama: base model (Meta / HF folder, GGUF file, ``smollm2-135m-instruct`` or a preset name);
            default: the one recorded in the adapter (not needed for merged folders).
        tokenizer: tokenizer file; default: the one with ``llama`` (or recorded in the adapter).
        imagebind: encoder weights (``imagebind_huge.pth`` / ``imagebind_w3D.pth`` layout or safetensors);
            default: the one recorded in the adapter. None and nothing recorded: no encoder (text only).
        cache: a visual cache (object with ``enhance``) or a cache path for :mod:`ibllm.cache`.
        device, dtype: where and in which dtype to run (dtype default float32).
        imagebind_preset: skip the encoder preset guess (with no ``imagebind`` file: random towers).
        modalities: encoder branches to build (default: every branch the file holds).
        max_seq_len: context length (default: the adapter's training value, else 512).
        check_base: raise :class:`BaseModelMismatch` when the base does not match the adapter's record
            (False: warn instead).
        merge: fold LoRA into the base weights after loading (faster decoding).
    """
    from ibllm.build import load_tokenizer_for
    from ibllm.checkpoints import CheckpointError

    ad = read_adapter(adapter) if adapter is not None else None
    if ad is not None and ad.kind == "merged":
        return _load_merged(ad, tokenizer, imagebind, cache, device, dtype, imagebind_preset, modalities, max_seq_len)
    model, info, llm = build_from_adapter(ad, llama, imagebind, imagebind_preset, modalities, max_seq_len, check_base)
    meta = ad.meta if ad else {}
    tok_source = tokenizer or (meta.get("tokenizer") if llama is None else None)
    try:
        tok = load_tokenizer_for(llm, tok_source)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        raise ValueError(f"no tokenizer for {llm}: {e}") from None
    model = _place(model, device, dtype)
    result = InferenceModel(model, tok, open_cache(cache), info)
    return result.merge() if merge else result


def build_from_adapter(ad: Adapter | None, llama: str | PathLike | None = None, imagebind: PathLike | None = None,
                       imagebind_preset: str | None = None, modalities: Sequence[str] | None = None,
                       max_seq_len: int | None = None, check_base: bool = True) -> tuple[nn.Module, dict[str, Any], str]:
    """The ImageBindLLM (CPU, fp32) of an adapter on its base model and encoder: ``(model, info, llm)``."""
    from ibllm.build import build_encoder, load_base_llama, load_llama_weights, resolve_llm_path
    from ibllm.models.ibllm import ImageBindLLM

    meta = ad.meta if ad else {}
    llm = str(llama) if llama is not None else meta.get("llm")
    if llm is None:
        raise ValueError(f"adapter {ad.source if ad else None} does not record its base model: pass llama=PATH")

    # Encoder: file given / recorded, preset inferred from its shapes.
    ib_file = str(imagebind) if imagebind is not None else meta.get("imagebind_weights")
    if ib_file is not None and not Path(ib_file).is_file() and imagebind is None:
        raise FileNotFoundError(f"the ImageBind weights recorded in {ad.source} were not found: {ib_file} "
                                "(pass imagebind=FILE)")
    encoder, ib_preset = None, None
    if ib_file is not None:
        ib_preset, file_modalities = infer_imagebind(ib_file, imagebind_preset)
        encoder = build_encoder(ib_preset, ib_file, list(modalities or file_modalities))
    elif imagebind_preset is not None:
        ib_preset = imagebind_preset
        encoder = build_encoder(ib_preset, None, list(modalities or ("vision",)))

    stage = ad.stage if ad else "pretrain"
    cfg, base_state = load_base_llama(llm)
    _apply_adapter_dims(cfg, ad, encoder, max_seq_len, meta)
    model = ImageBindLLM(cfg, stage=stage, encoder=encoder)
    if base_state is not None:
        load_llama_weights(model, base_state, str(resolve_llm_path(llm)))
        del base_state
    info: dict[str, Any] = {"stage": stage, "llm": llm, "imagebind": ib_file, "imagebind_preset": ib_preset,
                            "adapter": ad.source if ad else None, "adapter_kind": ad.kind if ad else None}
    if ad is not None:
        _load_adapter_state(model, ad)
        _check_base(model, ad, llm, check_base)
        if not ad.has_stage1:
            warnings.warn(f"adapter {ad.source} has no bind network / prefix queries (a stage-2 checkpoint whose "
                          "init_from was not found?): they keep their random initialisation", stacklevel=2)
    info["base_fingerprint"] = base_fingerprint(model)
    return model, info, llm


def _apply_adapter_dims(cfg: Any, ad: Adapter | None, encoder: Any, max_seq_len: int | None,
                        meta: Mapping[str, Any]) -> None:
    from ibllm.checkpoints import CheckpointError

    recorded = meta.get("llama_config") or {}
    if recorded:
        for key in ("dim", "n_layers", "n_heads", "vocab_size"):
            if key in recorded and recorded[key] != getattr(cfg, key):
                raise BaseModelMismatch(f"adapter {ad.source} was trained on a LLaMA with {key}={recorded[key]}, "
                                        f"the base model given has {key}={getattr(cfg, key)}")
    dims = adapter_dims(ad.state) if ad else {}
    if "visual_dim" in dims:
        cfg.visual_dim = dims["visual_dim"]
    elif encoder is not None:
        cfg.visual_dim = encoder.cfg.out_embed_dim if hasattr(encoder, "cfg") else cfg.visual_dim
    if "lora_rank" in dims:
        cfg.lora_rank = dims["lora_rank"]
    if "n_query_layers" in dims:
        q = dims["n_query_layers"]
        if q > cfg.n_layers:
            raise CheckpointError(f"adapter {ad.source}: prefix_query has {q} rows but the base LLaMA has only "
                                  f"{cfg.n_layers} layers")
        cfg.query_layer = None if q == cfg.n_layers else q
    elif recorded.get("query_layer"):
        cfg.query_layer = recorded["query_layer"]
    cfg.max_seq_len = max_seq_len or recorded.get("max_seq_len") or cfg.max_seq_len
    if ad is not None and "image_bind_proj.weight" in ad.state:
        d = int(ad.state["image_bind_proj.weight"].shape[0])
        if d != cfg.dim:
            raise BaseModelMismatch(f"adapter {ad.source} binds to width {d}, the base LLaMA has dim {cfg.dim}")
    out_dim = getattr(getattr(encoder, "cfg", None), "out_embed_dim", None)
    if encoder is not None and out_dim is not None and out_dim != cfg.visual_dim:
        raise CheckpointError(f"the ImageBind encoder outputs {out_dim}-d embeddings but adapter "
                              f"{ad.source if ad else ''} expects {cfg.visual_dim}-d (wrong encoder file?)")


def _load_adapter_state(model: nn.Module, ad: Adapter) -> None:
    from ibllm.checkpoints import CheckpointError

    own = model.state_dict()
    unexpected = sorted(k for k in ad.state if k not in own)
    if unexpected:
        raise CheckpointError(f"adapter {ad.source}: keys the model does not have: {unexpected[:6]}"
                              f"{' ...' if len(unexpected) > 6 else ''}")
    for key, t in ad.state.items():
        if tuple(t.shape) != tuple(own[key].shape):
            raise CheckpointError(f"adapter {ad.source}: {key!r} has shape {list(t.shape)}, the model expects "
                                  f"{list(own[key].shape)}")
    model.load_state_dict(ad.state, strict=False)


def _check_base(model: nn.Module, ad: Adapter, llm: str, strict: bool) -> None:
    expected = ad.meta.get("base_fingerprint")
    if expected:
        actual = base_fingerprint(model)
        if actual is not None and actual != expected:
            msg = (f"base model mismatch: adapter {ad.source} was trained on base {ad.meta.get('llm')!r} "
                   f"(fingerprint {expected}) but {llm!r} has fingerprint {actual}. Load the base model the "
                   "adapter was trained on (e.g. Open-Chinese-LLaMA-7B '7B_chinese' rather than plain LLaMA-7B), "
                   "or pass check_base=False to proceed anyway")
            if strict:
                raise BaseModelMismatch(msg)
            warnings.warn(msg, stacklevel=3)
    elif ad.kind == "official":
        name = Path(str(llm)).name
        hint = (" The base given is named '7B': the released 7B.pth was trained on Open-Chinese-LLaMA-7B "
                "('7B_chinese', SPEC §2.2), so answers may be poor.") if name == "7B" else ""
        log.warning("official adapter %s records no base-model identity; make sure %s is the base it was trained "
                    "on.%s", ad.source, llm, hint)
        if hint:
            warnings.warn(f"official adapter {ad.source}: {hint.strip()}", stacklevel=3)


def _place(model: nn.Module, device: str | torch.device, dtype: str | torch.dtype | None) -> nn.Module:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = model.to(device=torch.device(device))
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()


def _load_merged(ad: Adapter, tokenizer: PathLike | None, imagebind: PathLike | None, cache: Any,
                 device: str | torch.device, dtype: Any, imagebind_preset: str | None,
                 modalities: Sequence[str] | None, max_seq_len: int | None) -> InferenceModel:
    """Rebuild a merged export: Meta-layout folder + ``extra.safetensors`` (see :mod:`ibllm.export`)."""
    from ibllm.build import build_encoder
    from ibllm.checkpoints import CheckpointError, load_meta_llama
    from ibllm.config import LLaMAConfig
    from ibllm.models.ibllm import ImageBindLLM
    from ibllm.tokenizer import load_tokenizer

    d, meta = Path(ad.source), ad.meta
    _, state = load_meta_llama(d)
    cfg = LLaMAConfig.from_dict({k: v for k, v in meta["llama_config"].items()})
    cfg.tie_embeddings = False  # Meta layout stores the head separately
    if max_seq_len:
        cfg.max_seq_len = max_seq_len
    ib_file = str(imagebind) if imagebind is not None else meta.get("imagebind_weights")
    encoder, ib_preset = None, None
    if ib_file is not None and Path(ib_file).is_file():
        ib_preset, file_modalities = infer_imagebind(ib_file, imagebind_preset)
        encoder = build_encoder(ib_preset, ib_file, list(modalities or file_modalities))
    elif imagebind is not None:
        raise FileNotFoundError(f"ImageBind weights not found: {imagebind}")
    model = ImageBindLLM(cfg, stage="finetune", encoder=encoder)
    # Unwrap every LoRA linear (zero delta) and install the merged weights.
    _unwrap_lora(model)
    extra = dict(ad.state)
    visual = {k: extra.pop(k) for k in list(extra) if k.endswith(VISUAL_WV)}
    full = {f"llama.{k}": v for k, v in state.items()}
    full.update(extra)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in full and not k.startswith("image_bind."))
    unexpected = sorted(k for k in full if k not in own)
    if missing or unexpected:
        raise CheckpointError(f"merged export {d} does not match its config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model.load_state_dict(full, strict=False)
    for key, w in visual.items():
        i = int(key.split(".")[2])
        attn = model.llama.layers[i].attention
        base = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            base.weight.copy_(w)
        base.requires_grad_(False)
        attn.wv = VisualProjectionLinear(attn.wv, base)
    model.__dict__["_merged"] = True
    tok_source = tokenizer or meta.get("tokenizer_file")
    if tok_source and not Path(tok_source).is_absolute() and (d / tok_source).exists():
        tok_source = d / tok_source
    if not tok_source:
        raise ValueError(f"merged export {d} names no tokenizer: pass tokenizer=PATH")
    tok = load_tokenizer(tok_source)
    info = {"stage": "finetune", "llm": str(d), "merged": True, "imagebind": ib_file, "imagebind_preset": ib_preset,
            "adapter": str(d), "adapter_kind": "merged", "base_fingerprint": meta.get("base_fingerprint")}
    model = _place(model, device, dtype)
    # _place moved the wrapped merged linears; move the visual bases too
    for layer in model.llama.layers:
        if isinstance(layer.attention.wv, VisualProjectionLinear):
            base = layer.attention.wv.get_base_layer()
            layer.attention.wv.__dict__["_visual_base"] = base.to(device=model.prefix_query.weight.device,
                                                                  dtype=layer.attention.wv.merged.weight.dtype)
    return InferenceModel(model, tok, open_cache(cache), info)


def _unwrap_lora(model: nn.Module) -> None:
    for block in model.llama.layers:
        for parent, names in ((block.attention, ("wq", "wk", "wv", "wo")), (block.feed_forward, ("w1", "w2", "w3"))):
            for name in names:
                layer = getattr(parent, name)
                if hasattr(layer, "get_base_layer"):
                    setattr(parent, name, layer.get_base_layer())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm generate ...`` (the parser lives in :mod:`ibllm.chat`, next to the chat CLI)."""
    from ibllm.chat import generate_main

    generate_main(argv)
