"""Checkpoint files, one module per format: every loader returns our names, every writer is atomic.

* :mod:`~ibllm.checkpoints.io`: :func:`safe_load` (never unpickles code), :func:`save_atomic` (the one
  safetensors / torch saver), JSON, state-dict shape checks. :class:`CheckpointError` and the GGUF metadata
  reader live one floor down in :mod:`ibllm.files` (the tokenizer needs them too).
* :mod:`~ibllm.checkpoints.meta`, :mod:`~ibllm.checkpoints.hf`, :mod:`~ibllm.checkpoints.gguf`: LLaMA weights
  in Meta, Hugging Face and GGUF layouts (Meta names for the backbone); :mod:`~ibllm.checkpoints.llama`
  picks the right one for a path.
* :mod:`~ibllm.checkpoints.official`: official ImageBind-LLM adapter files and the one official <-> ours
  key map.
* :mod:`~ibllm.checkpoints.adapters`: reading any adapter file, the base-model fingerprint, and the one
  checked loader (:func:`load_checked`) that training, inference and export use.
* :mod:`~ibllm.checkpoints.export` (``ibllm export``) and :mod:`~ibllm.checkpoints.consolidate`
  (``ibllm consolidate``): import them directly; they are not loaded with the package.
"""

from __future__ import annotations

from ibllm.checkpoints.adapters import (Adapter, BaseModelMismatch, adapter_dims, add_stage1, base_fingerprint,
                                        infer_imagebind, load_checked, load_trainable, read_adapter)
from ibllm.checkpoints.gguf import load_gguf_llama
from ibllm.checkpoints.hf import hf_to_meta_qk, load_hf_llama, meta_to_hf_qk, save_hf_llama
from ibllm.checkpoints.io import (CheckpointError, PathLike, StateDict, check_state_dict, llama_shapes, safe_load,
                                  save_atomic)
from ibllm.checkpoints.llama import load_llama
from ibllm.checkpoints.meta import load_meta_llama, meta_shard_dim, save_meta_llama
from ibllm.checkpoints.official import (STAGES, convert_official_checkpoint, export_official_adapter,
                                        load_official_adapter, official_adapter_keys, official_adapter_shapes,
                                        official_state, official_to_ours, ours_to_official)
from ibllm.files import gguf_field, open_gguf
from ibllm.tokenizer import find_tokenizer

__all__ = [
    "Adapter", "BaseModelMismatch", "CheckpointError", "PathLike", "STAGES", "StateDict", "adapter_dims",
    "add_stage1", "base_fingerprint", "check_state_dict", "convert_official_checkpoint", "export_official_adapter",
    "find_tokenizer", "gguf_field", "hf_to_meta_qk", "infer_imagebind", "llama_shapes", "load_checked",
    "load_gguf_llama", "load_hf_llama", "load_llama", "load_meta_llama", "load_official_adapter", "load_trainable",
    "meta_shard_dim", "meta_to_hf_qk", "official_adapter_keys", "official_adapter_shapes", "official_state",
    "official_to_ours", "open_gguf", "ours_to_official", "read_adapter", "safe_load", "save_atomic",
    "save_hf_llama", "save_meta_llama",
]
