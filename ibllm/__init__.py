"""ImageBind-LLM in PyTorch Lightning. ``ibllm.load(...)`` loads a model for inference (see
:mod:`ibllm.api`); importing the package itself stays cheap (no torch import).

``ibllm.load`` imports :func:`ibllm.api.load` on its first call; until then its signature and docstring
are read from ``api.py``'s source (no import), so ``help(ibllm.load)`` and ``inspect.signature`` show the
real ones. Type checkers and editors see :func:`ibllm.api.load` itself.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _lazy_function(module: str, name: str) -> Callable[..., Any]:
    """A function that imports ``module.name`` when first called, with that function's signature and
    docstring read from the module's source file (parameter defaults must be literals)."""
    source = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    args = node.args
    defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    params = [inspect.Parameter(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if d is None else ast.literal_eval(d),
                                annotation=ast.unparse(a.annotation) if a.annotation else inspect.Parameter.empty)
              for a, d in zip(args.args, defaults)]
    params += [inspect.Parameter(a.arg, inspect.Parameter.KEYWORD_ONLY,
                                 default=inspect.Parameter.empty if d is None else ast.literal_eval(d),
                                 annotation=ast.unparse(a.annotation) if a.annotation else inspect.Parameter.empty)
               for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    returns = ast.unparse(node.returns) if node.returns else inspect.Signature.empty

    def call(*a: Any, **kw: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*a, **kw)

    call.__name__ = call.__qualname__ = name
    call.__module__ = module
    call.__doc__ = ast.get_docstring(node, clean=False)
    call.__signature__ = inspect.Signature(params, return_annotation=returns)  # type: ignore[attr-defined]
    return call


if TYPE_CHECKING:
    from ibllm.api import load
else:
    load = _lazy_function("ibllm.api", "load")
