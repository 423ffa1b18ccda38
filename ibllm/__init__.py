"""ImageBind-LLM in PyTorch Lightning. ``ibllm.load(...)`` loads a model for inference (see
:mod:`ibllm.api`); importing the package itself stays cheap (no torch import)."""

from __future__ import annotations

from typing import Any


def load(*args: Any, **kwargs: Any) -> Any:
    """Load an ImageBind-LLM for inference; see :func:`ibllm.api.load` for the arguments."""
    from ibllm.api import load as _load  # imported on use: keeps `import ibllm` free of torch

    return _load(*args, **kwargs)
