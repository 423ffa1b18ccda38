"""ImageBind-LLM in PyTorch Lightning. ``ibllm.load(...)`` loads a model for inference (see
:mod:`ibllm.inference`); importing the package itself stays cheap (no torch import)."""

from __future__ import annotations

from typing import Any


def load(*args: Any, **kwargs: Any) -> Any:
    """Load an ImageBind-LLM for inference; see :func:`ibllm.inference.load` for the arguments."""
    from ibllm.inference import load as _load

    return _load(*args, **kwargs)
