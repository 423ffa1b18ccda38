"""Official ImageBind-LLM adapter files and the one map between official key names and ours.

Our model wraps LoRA-tuned linears with peft, so a linear's own weight is ``X.wq.base_layer.weight`` and
its LoRA pair ``X.wq.lora_A.default.weight`` / ``lora_B``; the official files name them ``X.wq.weight`` and
``X.lora_wq_l1.weight`` / ``lora_wq_l2``, and older ones spell ``llama`` as ``llma``. This module is the only
place that maps between the two (:func:`ours_to_official` / :func:`official_to_ours`).

The released trainable-only files hold, for stage 1 (``7B-pretrained.pth``), the bind network,
``prefix_query`` and every layer's gate; for stage 2 (``7B.pth``) also every LoRA pair, the biases of
wq, wo, w1, w2, w3 and every RMSNorm weight of the LLaMA. Official training checkpoints hold the whole
model; their frozen encoder (``image_bind.*``), frozen LLaMA weights and ``prefix_projector_norm`` are
dropped on import, as the official conversion script does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ibllm.checkpoints.io import (CheckpointError, PathLike, check_state_dict, own_storage, preview, safe_load,
                                  save_atomic)
from ibllm.config import LLaMAConfig

log = logging.getLogger(__name__)

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
    """Rename official keys to ours (peft names); also ``llma`` -> ``llama`` (an old official spelling).

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
    """Official key -> shape of the released trainable-only file for ``stage``.

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
    """The exact key set of the official trainable-only file for ``cfg`` and ``stage``
    (see :func:`official_adapter_shapes`)."""
    return list(official_adapter_shapes(cfg, stage))


def _is_released(key: str) -> bool:
    """The official conversion rule on an official (or llma-renamed) key: True if a release keeps it
    (bind network, prefix queries, and the LLaMA's biases, gates, LoRA pairs and norms)."""
    if key.startswith("image_bind.") or key.startswith("prefix_projector_norm."):
        return False
    if key.startswith("llama."):
        return any(s in key for s in ("bias", "gate", "lora", "norm"))
    return True


def convert_official_checkpoint(sd: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Apply the official conversion to official-named keys: rename ``llma``, drop the frozen
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
        raise CheckpointError(f"ImageBind-LLM adapter file {p}: entries {preview(bad)} are not tensors")
    kept = convert_official_checkpoint(sd, f"ImageBind-LLM adapter file {p}")
    legacy = [k for k in kept if re.fullmatch(r"image_bind_(norm_\d|f\d_\d)\.bias", k)]
    if legacy:
        raise CheckpointError(f"ImageBind-LLM adapter file {p}: key {legacy[0]!r} belongs to the legacy bind "
                              "network (with biases on its norms and feed-forward layers), which is not supported")
    if cfg is not None:
        expected = official_adapter_shapes(cfg, stage or "finetune")
        check_state_dict(kept, expected, f"ImageBind-LLM adapter file {p}", allow_missing=stage is None)
    return official_to_ours(kept)


def layer_count(keys: Iterable[str]) -> int:
    """Number of LLaMA layers named in ``keys`` (``llama.layers.N.``); 0 when none is."""
    idx = [int(m[1]) for k in keys if (m := re.match(r"llama\.layers\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def official_state(state: Mapping[str, Tensor], stage: str, cfg: LLaMAConfig | None, source: str,
                   check_shapes: bool = True) -> dict[str, Tensor]:
    """The exact official key set of ``stage`` from ``state`` (our names), each tensor in its own storage.

    ``state`` may be the trainable subset or a whole model state dict (frozen keys are dropped by the
    official conversion; keys of the other stage are left out). Without ``cfg`` the layout comes from the
    layer count of the keys. A required key that is missing, or a key no official file has, raises
    :class:`CheckpointError` naming ``source``; with ``cfg`` and ``check_shapes`` the shapes are checked too.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    official = convert_official_checkpoint(ours_to_official(state), source)
    layout = cfg or LLaMAConfig(dim=1, n_layers=max(layer_count(state), 1), n_heads=1)
    wanted = official_adapter_shapes(layout, stage)
    every = official_adapter_shapes(layout, "finetune")
    unknown = [k for k in official if k not in every]
    if unknown:
        raise CheckpointError(f"{source}: unexpected key(s) {preview(unknown)} (no official file has them)")
    missing = [k for k in wanted if k not in official]
    if missing:
        hint = (" (a stage-2 file needs the stage-1 tensors too: complete the checkpoint with the stage-1 file it "
                "was trained from, e.g. --init-from STAGE1)"
                if stage == "finetune" and any(k.startswith(("image_bind_", "prefix_query")) for k in missing) else "")
        raise CheckpointError(f"{source} (stage {stage}): missing key(s) {preview(missing)}{hint}")
    if cfg is not None and check_shapes:
        check_state_dict({k: official[k] for k in wanted}, wanted, source)
    return {k: own_storage(official[k]) for k in wanted}


def export_official_adapter(trainable_sd: Mapping[str, Tensor], path: PathLike, stage: str,
                            cfg: LLaMAConfig | None = None, config: Mapping[str, Any] | None = None) -> None:
    """Write ``{'model': {...}}`` with exactly the official key set of ``stage``, atomically.

    ``trainable_sd`` is checked and reduced by :func:`official_state` (``finetune`` files need the stage-1
    tensors as well: the ``7B.pth`` set). ``config`` is stored beside ``model`` (the official loader
    ignores it; ours reads the base-model identity from ``config['ibllm']``).
    """
    model = official_state(trainable_sd, stage, cfg, f"official adapter export to {Path(path)}")
    save_atomic({"model": model} if config is None else {"model": model, "config": dict(config)}, path)
