"""Prepacked oneDNN weights for frozen bf16 linears on the CPU, used where only a few rows are multiplied.

torch's bf16 matmul on the CPU hands a plain-layout weight to oneDNN, which re-lays it out at every call.
With a handful of rows (one decode step, a batch of visual tokens) that copy costs about as much as the
product itself, so per-token decode time is dominated by it. Laying each frozen weight out once and
calling oneDNN's linear on the packed copy gives bit-identical results (the same kernel; tested) at up
to twice the speed. The price is one packed copy of every such weight, so packing is refused when those
copies would take more than half of the memory still available.

:func:`enable_packed_linears` swaps the ``forward`` of eligible ``nn.Linear`` modules (frozen bf16 weight
on the CPU) for one that uses the packed weight when the call needs no gradient through the weight or
input and has at most :data:`MAX_ROWS` rows, and otherwise runs the module's own ``forward``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

MAX_ROWS = 64  # above this, torch's own matmul is as fast or faster for LLaMA-sized weights
PACKED_ATTR = "_ibllm_packed"


def packing_available() -> bool:
    """True when this torch build has oneDNN with bf16 support on this CPU."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def eligible(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose weight is a frozen bf16 CPU tensor (not a sharded DTensor)."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and type(weight) is nn.Parameter and not weight.requires_grad
            and weight.dtype == torch.bfloat16 and weight.device.type == "cpu")


def _packed_weight(module: nn.Linear) -> Tensor:
    """The module's weight in oneDNN layout, re-packed whenever the weight tensor changed."""
    weight = module.weight
    try:
        version = weight._version
    except RuntimeError:  # a weight created under inference_mode has no version counter (and cannot change)
        version = -1
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = module.__dict__.get(PACKED_ATTR)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        module.__dict__[PACKED_ATTR] = cached
    return cached[1]


def _compute_dtype(x: Tensor, bias: Tensor | None) -> torch.dtype | None:
    """The dtype ``F.linear`` would compute in (None where it would refuse mixed dtypes)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype if bias is None or bias.dtype == x.dtype else None


def packed_forward(module: nn.Linear, original, x: Tensor) -> Tensor:
    """``module(x)`` through the packed weight when that gives the same result, else ``original(x)``."""
    weight, bias = module.weight, module.bias
    rows = x.numel() // max(x.shape[-1], 1)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                or (bias is not None and bias.requires_grad))
    if (needs_grad or rows > MAX_ROWS or rows == 0 or x.device.type != "cpu" or weight.dtype != torch.bfloat16
            or _compute_dtype(x, bias) != torch.bfloat16 or type(x) is not Tensor):
        return original(x)
    b = None if bias is None else bias.detach().to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), _packed_weight(module), b, "none", [], "")


def packed_bytes(model: nn.Module) -> int:
    """Bytes the packed copies of ``model``'s eligible linears take (about their weights' size)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if eligible(m))


def enable_packed_linears(model: nn.Module) -> int:
    """Route ``model``'s eligible linears through prepacked weights; returns how many are routed.

    Idempotent. Does nothing (returns 0) without oneDNN bf16, when no linear is eligible, or when the
    packed copies would take more than half of the available memory. Weights are packed lazily on first
    use and again after they change.
    """
    modules = [m for m in model.modules() if eligible(m)]
    if not modules or not packing_available():
        return 0
    fresh = [m for m in modules if "forward" not in m.__dict__]
    need = sum(m.weight.numel() * m.weight.element_size() for m in fresh)
    free = available_memory_bytes()
    if fresh and (free is None or need > free // 2):
        return sum("forward" in m.__dict__ for m in modules)
    for module in fresh:
        module.forward = functools.partial(packed_forward, module, module.forward)
    return len(modules)


def disable_packed_linears(model: nn.Module) -> None:
    """Undo :func:`enable_packed_linears` and drop the packed copies."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), functools.partial) and module.forward.func is packed_forward:
            del module.forward
        module.__dict__.pop(PACKED_ATTR, None)
