"""LoRA merging for inference: fold each LoRA pair into its base weight (``W + B @ A``, scale 1).

After merging, the linears are plain ``nn.Linear`` again, except ``wv`` of the layers that receive the
visual token: their injection projects the visual token with the *un-merged* base ``wv``, which
:class:`VisualProjectionLinear` keeps beside the merged weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

ATTENTION_LINEARS = ("wq", "wk", "wv", "wo")
FEED_FORWARD_LINEARS = ("w1", "w2", "w3")


def _linear_slots(model: nn.Module) -> Iterator[tuple[int, nn.Module, str]]:
    """``(layer index, parent module, linear name)`` of every LoRA-capable linear of ``model.llama``."""
    for i, block in enumerate(model.llama.layers):
        for parent, names in ((block.attention, ATTENTION_LINEARS), (block.feed_forward, FEED_FORWARD_LINEARS)):
            for name in names:
                yield i, parent, name


class VisualProjectionLinear(nn.Module):
    """A merged ``wv``: forward uses the merged weight; the visual adapter is projected by the original
    base ``wv`` (``get_base_layer``), exactly as the un-merged model does (the gated injection projects the
    visual token with the frozen base ``wv``, without LoRA)."""

    def __init__(self, merged: nn.Linear, base: nn.Linear) -> None:
        super().__init__()
        self.merged = merged
        self.__dict__["_visual_base"] = base  # not a submodule: saved separately as wv_visual

    def get_base_layer(self) -> nn.Linear:
        """The un-merged base ``wv`` that projects the visual token."""
        return self.__dict__["_visual_base"]

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in]`` -> ``[..., out]`` through the merged weight."""
        return self.merged(x)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA pair into its base weight in place (``W + B @ A``, scale 1 = alpha / r).

    Biases stay on the merged Linear. For ``wv`` of layers that receive the visual token, the original
    base weight is kept for the adapter projection (:class:`VisualProjectionLinear`). Returns ``model``.
    """
    first = model.llama.first_query_layer
    for i, parent, name in _linear_slots(model):
        layer = getattr(parent, name)
        if not hasattr(layer, "get_base_layer") or isinstance(layer, VisualProjectionLinear):
            continue
        base = layer.get_base_layer()
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = torch.zeros_like(base.weight, dtype=torch.float32)
            for key in layer.active_adapters:
                a, b = layer.lora_A[key].weight.float(), layer.lora_B[key].weight.float()
                delta += (b @ a) * float(layer.scaling[key])
            merged.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        if name == "wv" and i >= first:
            setattr(parent, name, VisualProjectionLinear(merged, base))
        else:
            setattr(parent, name, merged)
    model.__dict__["_merged"] = True
    return model


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA-wrapped linear of ``model.llama`` by its base linear (drops the LoRA pair)."""
    for _, parent, name in _linear_slots(model):
        layer = getattr(parent, name)
        if hasattr(layer, "get_base_layer"):
            setattr(parent, name, layer.get_base_layer())
    return model


def install_visual_wv(model: nn.Module, weights: dict[int, Tensor]) -> None:
    """Wrap ``wv`` of each layer ``i`` in ``weights`` so the visual token is projected by ``weights[i]``
    (``[out, in]``, frozen) while the layer's own forward keeps the current (merged) weight."""
    for i, w in weights.items():
        attn = model.llama.layers[i].attention
        base = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            base.weight.copy_(w)
        base.requires_grad_(False)
        attn.wv = VisualProjectionLinear(attn.wv, base)


def place_visual_bases(model: nn.Module) -> None:
    """Move the visual bases (not submodules, so ``model.to`` skips them) to the device and dtype of
    their merged linear."""
    for layer in model.llama.layers:
        wv = layer.attention.wv
        if isinstance(wv, VisualProjectionLinear):
            base = wv.get_base_layer()
            wv.__dict__["_visual_base"] = base.to(device=wv.merged.weight.device, dtype=wv.merged.weight.dtype)
