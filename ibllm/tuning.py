"""Which parameters train in each stage — one filter drives requires_grad, optimizer groups and saving.

The rules are the official trainable sets, applied to parameter names of :class:`ibllm.models.ibllm.ImageBindLLM`:

* ``pretrain``: ``llama.*`` names containing ``gate``; names starting with ``image_bind_`` (the bind
  network — the underscore excludes the frozen encoder ``image_bind.``); ``prefix_query.*``.
* ``finetune``: ``llama.*`` names containing ``norm``, ``bias`` or ``lora`` (peft's ``lora_A``/``lora_B``
  names contain ``lora`` just like the official ``lora_wq_l1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

STAGES: tuple[str, ...] = ("pretrain", "finetune")
LORA_TARGETS = r".*layers\.\d+\.(attention\.(wq|wk|wv|wo)|feed_forward\.(w1|w2|w3))"


def check_stage(stage: str) -> str:
    """Return ``stage`` or raise for anything but ``pretrain`` / ``finetune``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return stage


def is_trainable(name: str, stage: str) -> bool:
    """True when parameter ``name`` trains in ``stage``."""
    if check_stage(stage) == "pretrain":
        return (name.startswith("llama.") and "gate" in name) or name.startswith(("image_bind_", "prefix_query."))
    return name.startswith("llama.") and any(part in name for part in ("norm", "bias", "lora"))


def trainable_filter(stage: str) -> Callable[[str], bool]:
    """``name -> bool`` for ``stage``."""
    check_stage(stage)
    return lambda name: is_trainable(name, stage)


def trainable_parameters(model: nn.Module, stage: str) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs that train in ``stage`` (tied weights listed once)."""
    return ((n, p) for n, p in model.named_parameters() if is_trainable(n, stage))


def apply_stage(model: nn.Module, stage: str) -> None:
    """Freeze everything, then unfreeze the stage's parameters and keep them in fp32."""
    for name, param in model.named_parameters():
        train = is_trainable(name, stage)
        param.requires_grad_(train)
        if train and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen floating-point parameter in ``dtype`` (e.g. bf16); trainable ones stay fp32."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay_markers: Sequence[str] = ()) -> list[dict]:
    """The AdamW grouping rule: ``[decayed, undecayed]`` parameter groups, in iteration order.

    Vectors and scalars (``ndim <= 1``), names ending in ``.bias`` and names containing one of
    ``no_decay_markers`` (e.g. embeddings) get no weight decay; every other tensor gets ``weight_decay``.
    """
    decay, no_decay = [], []
    for name, param in named_parameters:
        skip = param.ndim <= 1 or name.endswith(".bias") or any(m in name for m in no_decay_markers)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_groups(model: nn.Module, stage: str, weight_decay: float) -> list[dict]:
    """AdamW groups of the official recipe (:func:`decay_groups`): no decay for 1-D tensors and ``*.bias``."""
    return decay_groups(trainable_parameters(model, stage), weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup from 0 over
    ``warmup_steps`` steps, then a half cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_state_dict(model: nn.Module, stage: str) -> dict[str, Tensor]:
    """The stage's trainable tensors by (our) state-dict name, detached — what checkpoints hold."""
    return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items() if is_trainable(name, stage)}


def add_lora(module: nn.Module, rank: int) -> nn.Module:
    """Inject LoRA (rank ``rank``, scale 1 = alpha/r, B = 0) on wq, wk, wv, wo, w1, w2, w3 with peft.

    ``lora_A`` keeps PyTorch's Kaiming-uniform Linear init and ``lora_B`` starts at zero, so the
    wrapped layers equal the base layers until training moves B.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS)
    return inject_adapter_in_model(config, module)


def count_parameters(model: nn.Module, stage: str) -> dict[str, int]:
    """Total and trainable parameter counts, trainable ones split by group (bind, prefix, gate, norm, bias, lora)."""
    groups: dict[str, int] = {}
    total = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if is_trainable(name, stage):
            groups[parameter_group(name)] = groups.get(parameter_group(name), 0) + param.numel()
    return {"total": total, "trainable": sum(groups.values()), **{f"trainable/{k}": v for k, v in sorted(groups.items())}}


def parameter_group(name: str) -> str:
    """A short group label for a parameter name (for reports)."""
    for label, marker in (("lora", "lora"), ("gate", "gate"), ("prefix_query", "prefix_query"),
                          ("bind_network", "image_bind_"), ("norm", "norm"), ("bias", "bias")):
        if marker in name:
            return label
    return "other"
