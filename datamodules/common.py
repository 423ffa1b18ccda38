"""Helpers shared by the data modules."""

from __future__ import annotations

from typing import Any

from ibllm.build import load_tokenizer_for


def resolve_tokenizer(tokenizer: Any) -> Any:
    """Return a tokenizer object: objects pass through; a string is an LLM source (preset name, GGUF,
    model folder) or a tokenizer file, loaded with ``ibllm.build.load_tokenizer_for``."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    return load_tokenizer_for(tokenizer)
