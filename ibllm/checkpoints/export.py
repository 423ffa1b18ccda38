"""Export and import of ImageBind-LLM adapters (the ``python -m ibllm export CKPT --format F OUT`` verb).

``CKPT`` is anything :func:`ibllm.checkpoints.adapters.read_adapter` reads: our Lightning checkpoint (a stage-2
checkpoint is completed with the stage-1 tensors of the ``init_from`` it was trained from), our
safetensors export, or an official ``7B.pth`` / ``7B-pretrained.pth`` file — so importing an official
file is ``export 7B.pth --format safetensors ours.safetensors`` (or passing it straight to ``ibllm.load``
or to training as ``model.init_from``).

Formats
-------
``official``
    ``{'model': {...}, 'config': {'ibllm': {...}}}`` with exactly the official key names and shapes of the
    stage (the ``7B-pretrained.pth`` set for stage 1, the ``7B.pth`` set for stage 2). The official
    loader ignores ``config``; ours reads the base-model identity from it.
``safetensors``
    The trainable-only tensors under our names (stage 2 includes the stage-1 tensors, like ``7B.pth``),
    with a JSON config (stage, dims, base model, base fingerprint, encoder) in the safetensors header
    (key ``ibllm``) and next to it as ``OUT.json``.
``merged``
    A folder for serving elsewhere::

        OUT/params.json, OUT/consolidated.00.pth   Meta-layout LLaMA, LoRA folded in (W + B·A, scale 1),
                                                   stage-2 norms in place
        OUT/extra.safetensors                      what Meta's layout cannot hold: the stage-2 biases of
                                                   wq, wo, w1, w2, w3; the gates; the bind network;
                                                   prefix_query; and, for layers that receive the visual
                                                   token, the un-merged base wv (``...attention.
                                                   wv_visual.weight``) that projects the visual adapter
        OUT/ibllm.json                             config (dims, stage, encoder, tokenizer, fingerprints)
        OUT/README.md                              how to load it

    The Meta weights alone are the language model *without* the biases (plain Meta code has none), so
    they serve text well only when the biases are small; ``ibllm.load(adapter=OUT)`` restores everything
    and matches the un-merged model's logits up to float rounding.

Every file is written atomically (temporary file + rename); the merged folder is assembled under a
temporary name and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibllm.build import build_from_adapter, resolve_llm_path
from ibllm.checkpoints.adapters import (MERGED_CONFIG, MERGED_EXTRA, SAFETENSORS_META_KEY, VISUAL_WV, Adapter,
                                        adapter_dims, add_stage1, base_fingerprint, read_adapter)
from ibllm.checkpoints.io import CheckpointError, save_atomic, write_json
from ibllm.checkpoints.meta import save_meta_llama
from ibllm.checkpoints.official import official_state
from ibllm.config import LLaMAConfig
from ibllm.models.merge import VisualProjectionLinear, merge_lora
from ibllm.tokenizer import find_tokenizer
from ibllm.tuning import is_trainable

FORMATS = ("official", "safetensors", "merged")
META_FIELDS = ("stage", "llm", "imagebind", "imagebind_weights", "llama_config", "base_fingerprint", "tokenizer")


def _meta_for_file(ad: Adapter, stage: str) -> dict[str, Any]:
    meta = {k: ad.meta[k] for k in META_FIELDS if ad.meta.get(k) is not None}
    meta["stage"] = stage
    meta.update({k: v for k, v in adapter_dims(ad.state).items()})
    meta["exported_from"] = ad.source
    return meta


def _stage(ad: Adapter, stage: str | None) -> str:
    stage = stage or ad.stage
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    return stage


def export_official(ad: Adapter, out: str | Path, stage: str | None = None) -> Path:
    """Write the official layout for ``stage`` (default: the adapter's) to ``out``; returns the path."""
    stage = _stage(ad, stage)
    layout = _layout_config(ad)
    out = Path(out)
    model = official_state(ad.state, stage, layout, f"official export of {ad.source} to {out}")
    save_atomic({"model": model, "config": {"ibllm": _meta_for_file(ad, stage)}}, out)
    return out


def _layout_config(ad: Adapter) -> LLaMAConfig | None:
    """A LLaMAConfig with the adapter's shapes from its recorded config (None when it records none)."""
    recorded = ad.meta.get("llama_config")
    if not recorded:
        return None
    cfg = LLaMAConfig.from_dict(dict(recorded))
    dims = adapter_dims(ad.state)
    cfg.visual_dim = dims.get("visual_dim", cfg.visual_dim)
    cfg.lora_rank = dims.get("lora_rank", cfg.lora_rank)
    if "n_query_layers" in dims:
        cfg.query_layer = None if dims["n_query_layers"] == cfg.n_layers else dims["n_query_layers"]
    return cfg


def export_safetensors(ad: Adapter, out: str | Path, stage: str | None = None) -> Path:
    """Write the trainable tensors (our names) to ``out`` (.safetensors) plus ``out.json``; returns the path."""
    stage = _stage(ad, stage)
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    keep = {k: v for k, v in ad.state.items()
            if is_trainable(k, "pretrain") or (stage == "finetune" and is_trainable(k, "finetune"))}
    if not keep:
        raise ValueError(f"{ad.source}: no trainable tensors to export")
    meta = _meta_for_file(ad, stage)
    save_atomic(keep, out, metadata={"format": "pt", SAFETENSORS_META_KEY: json.dumps(meta, default=str)})
    write_json(meta, out.with_suffix(".json"))
    return out


def export_merged(ad: Adapter, out: str | Path, llama: str | None = None, tokenizer: str | None = None,
                  imagebind: str | None = None, force: bool = False, check_base: bool = True) -> Path:
    """Fold LoRA into the base weights and write the merged folder (see the module docstring)."""
    out = Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    model, info, llm = build_from_adapter(ad, llama, imagebind, check_base=check_base)
    tok_file = _tokenizer_file(llm, tokenizer or (ad.meta.get("tokenizer") if llama is None else None))
    if tok_file is None:
        raise CheckpointError(f"no tokenizer found for base model {llm}: pass --tokenizer FILE")
    fingerprint = base_fingerprint(model)
    merge_lora(model)
    cfg = model.cfg
    meta_state, extra = merged_state(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        meta_cfg = type(cfg).from_dict({**cfg.to_dict(), "tie_embeddings": False})
        save_meta_llama(meta_cfg, meta_state, tmp)
        save_atomic(extra, tmp / MERGED_EXTRA, metadata={"format": "pt"})
        tok_name = None
        if tok_file is not None:
            if tok_file.name in ("tokenizer.model", "tokenizer.json"):
                shutil.copy2(tok_file, tmp / tok_file.name)
                tok_name = tok_file.name
            else:
                tok_name = str(tok_file.resolve())
        config = {
            "format": "ibllm-merged", "version": 1, "stage": model.stage,
            "llama_config": meta_cfg.to_dict(), "source_llm": llm, "base_fingerprint": fingerprint,
            "imagebind_preset": info.get("imagebind_preset"),
            "imagebind_weights": str(Path(info["imagebind"]).resolve()) if info.get("imagebind") else None,
            "tokenizer_file": tok_name, "exported_from": ad.source,
            "extra_tensors": sorted(extra),
            "how_to_load": "ibllm.load(adapter=THIS_FOLDER[, imagebind=..., tokenizer=...]); the Meta files alone "
                           "lack the stage-2 biases, gates, bind network and the visual wv (extra.safetensors)",
        }
        write_json(config, tmp / MERGED_CONFIG)
        (tmp / "README.md").write_text(_README.format(stage=model.stage, llm=llm, n=len(extra)), encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_README = """# Merged ImageBind-LLM export

Stage: {stage}. Base model: {llm}.

* `params.json` + `consolidated.00.pth`: a Meta-layout LLaMA with LoRA folded into wq/wk/wv/wo/w1/w2/w3
  (`W + B @ A`, scale 1) and the fine-tuned norms. Loadable by any Meta-LLaMA code.
* `extra.safetensors` ({n} tensors): what the Meta layout cannot hold — the stage-2 biases of wq, wo, w1,
  w2, w3 (Meta's linears have no bias), the per-layer gates, the bind network, `prefix_query`, and for every
  layer that receives the visual token the *un-merged* base `wv` (`llama.layers.N.attention.wv_visual.weight`),
  which projects the visual token (the gated injection uses the frozen base wv, without LoRA).
* `ibllm.json`: dims, stage, encoder and tokenizer, base-model fingerprint.

Load everything back with:

```python
import ibllm
model = ibllm.load(adapter="THIS_FOLDER", imagebind="imagebind_huge.pth")
print(model.generate({{"image": ["a.jpg"]}}, ["Describe the image."]))
```

Serving elsewhere: add each bias to its linear's output, and implement the gated injection: in every layer
that receives the visual token, the token plus that layer's `prefix_query` row is projected by the un-merged
`wv`, scaled per head by `tanh(gate)`, and added to every position's attention output (before `wo`).
"""


def merged_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(Meta-named LLaMA state, extra tensors)`` of a model after :func:`ibllm.models.merge.merge_lora`."""
    llama = model.llama
    meta: dict[str, Tensor] = {"tok_embeddings.weight": llama.tok_embeddings.weight.detach(),
                               "norm.weight": llama.norm.weight.detach(),
                               "output.weight": llama.output.weight.detach().clone()}
    extra: dict[str, Tensor] = {}
    for i, block in enumerate(llama.layers):
        pre = f"layers.{i}."
        for parent, mod, names in ((block.attention, "attention", ("wq", "wk", "wv", "wo")),
                                   (block.feed_forward, "feed_forward", ("w1", "w2", "w3"))):
            for name in names:
                layer = getattr(parent, name)
                if isinstance(layer, VisualProjectionLinear):
                    extra[f"llama.{pre}{VISUAL_WV}"] = layer.get_base_layer().weight.detach()
                    layer = layer.merged
                elif hasattr(layer, "get_base_layer"):
                    layer = layer.get_base_layer()
                meta[f"{pre}{mod}.{name}.weight"] = layer.weight.detach()
                if layer.bias is not None:
                    extra[f"llama.{pre}{mod}.{name}.bias"] = layer.bias.detach()
        meta[pre + "attention_norm.weight"] = block.attention_norm.weight.detach()
        meta[pre + "ffn_norm.weight"] = block.ffn_norm.weight.detach()
        extra[f"llama.{pre}attention.gate"] = block.attention.gate.detach()
    for name, t in model.state_dict().items():
        if name.startswith(("image_bind_", "prefix_query")):
            extra[name] = t.detach()
    return meta, extra


def _tokenizer_file(llm: str, tokenizer: str | None) -> Path | None:
    if tokenizer:
        return Path(tokenizer)
    path = resolve_llm_path(llm)
    if path is None:
        return None
    if path.is_file():
        return path  # GGUF: the tokenizer lives in its metadata
    return find_tokenizer(path)


def export(ckpt: str | Path, fmt: str, out: str | Path, stage: str | None = None, init_from: str | None = None,
           llama: str | None = None, tokenizer: str | None = None, imagebind: str | None = None,
           force: bool = False, check_base: bool = True) -> Path:
    """Export ``ckpt`` in format ``fmt`` to ``out``; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    ad = read_adapter(ckpt)
    if init_from:
        add_stage1(ad, init_from)
    out = Path(out)
    if fmt != "merged" and out.exists() and out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file name")
    if fmt != "merged" and out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if fmt == "official":
        return export_official(ad, out, stage)
    if fmt == "safetensors":
        return export_safetensors(ad, out, stage)
    return export_merged(ad, out, llama, tokenizer, imagebind, force, check_base)
