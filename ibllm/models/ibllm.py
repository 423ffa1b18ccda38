"""ImageBindLLM: frozen encoders -> bind network -> LLaMA with gated injection.

One class serves both stages and inference; the stage only decides which extra parameters exist
(stage 2 adds zero biases and LoRA) and which train (:mod:`ibllm.tuning`). The model knows nothing
about Lightning. State-dict layout (the official one): ``llama.*``, ``image_bind.*`` (the frozen encoder),
``image_bind_proj/norm_k/f*_k.*`` (the bind network, top level) and ``prefix_query.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm import tuning
from ibllm.config import LLaMAConfig
from ibllm.models.bind import BindNetwork
from ibllm.models.llama import LLaMA, AdapterState

# User-facing modality names -> ImageBind branch (image and video both use ``vision``).
MODALITY_BRANCH = {"image": "vision", "video": "vision", "vision": "vision", "text": "text", "audio": "audio",
                   "depth": "depth", "thermal": "thermal", "imu": "imu", "point": "point"}
MIX_EPS = 1e-6


class VisualCache(Protocol):
    """What the model needs of the visual cache (issue: FAISS cache model)."""

    def enhance(self, query: Tensor) -> Tensor:
        """``[B,C]`` mixed embedding -> cache-enhanced ``[B,C]``."""


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy, mean over non-ignored targets of the batch, in fp32.

    ``logits [B,S,V]`` predict ``labels [B,S]`` shifted by one. The official code ignores label 0, which
    also silently drops real ``<unk>`` targets; here ignored positions are ``-100``, so every real token id
    counts. A batch with no target at all returns ``0 * logits.mean()`` to keep the graph alive.
    """
    targets = labels[:, 1:].reshape(-1)
    if not (targets != ignore_index).any():
        return logits.float().mean() * 0.0
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=ignore_index)


def loss_positions(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``[B,S]`` bool: the positions whose logits predict a non-ignored next label (``labels [B,S]``)."""
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = labels[:, 1:] != ignore_index
    return at


def selected_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """:func:`lm_loss` from the logits ``[N,V]`` of :func:`loss_positions` only (same value up to float rounding).

    The output projection then runs on the N answer positions instead of all ``B*S``. Needs N > 0.
    """
    targets = labels[:, 1:]
    return F.cross_entropy(logits.float(), targets[targets != ignore_index])


def mix_embeddings(embeddings: list[Tensor], weights: list[float]) -> Tensor:
    """Weighted sum of L2-normalised ``[B,C]`` embeddings, weights divided by ``sum + 1e-6``.

    Not renormalised (official behaviour). Weights summing to about zero are rejected instead of
    blowing up the embedding (``1/(sum+1e-6)`` would be huge).
    """
    total = float(sum(weights))
    if abs(total) < 1e-3:
        raise ValueError(f"modality weights {weights} sum to {total:.3g}; they must not sum to zero")
    mixed = sum(F.normalize(e.float(), dim=-1) * (w / (total + MIX_EPS)) for e, w in zip(embeddings, weights))
    return mixed


class ImageBindLLM(nn.Module):
    """The full model. ``encoder`` maps ``{branch: tensor}`` to ``{branch: [B,C]}`` (ImageBindModel)."""

    def __init__(self, cfg: LLaMAConfig, stage: str = "finetune", encoder: nn.Module | None = None,
                 legacy_bridge: bool = False) -> None:
        super().__init__()
        self.cfg, self.stage = cfg, tuning.check_stage(stage)
        self.llama = LLaMA(cfg, bias=stage == "finetune")
        if stage == "finetune":
            tuning.add_lora(self.llama, cfg.lora_rank)
        bind = BindNetwork(cfg.visual_dim, cfg.dim, legacy=legacy_bridge)
        for name, child in bind.named_children():  # official keys live at the top level
            self.add_module(name, child)
        self.__dict__["_bind"] = bind  # shares the children registered above; not a second registration
        self.prefix_query = nn.Embedding(cfg.n_query_layers, cfg.dim)
        self.image_bind = encoder
        if encoder is not None:
            freeze(encoder)
        tuning.apply_stage(self, stage)

    # ---- encoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_branch(self, branch: str, tensor: Tensor) -> Tensor:
        """Run the frozen encoder on one input batch: ``{branch: tensor}`` -> ``[B,C]`` (fp32)."""
        if self.image_bind is None:
            raise RuntimeError("this model has no encoder; pass precomputed features instead")
        available = getattr(self.image_bind, "modalities", None)
        if available is not None and branch not in available:
            raise ValueError(f"the encoder has no {branch!r} branch (loaded: {', '.join(available)})")
        device = self.prefix_query.weight.device
        return self.image_bind({branch: tensor.to(device)})[branch].float()

    @torch.no_grad()
    def encode(self, inputs: Mapping[str, Any], cache: VisualCache | None = None) -> Tensor:
        """Mix several modality inputs into one ``[B,C]`` embedding (load, encode, L2-normalise, weighted sum).

        ``inputs`` maps a modality (image, video, audio, text, point, depth, thermal, imu) to a batch
        tensor, a list of files (one per batch row; loaded by :func:`ibllm.processing.load_modality`), or
        either of those paired with a weight: ``{"image": ["a.jpg"], "audio": (["b.wav"], 0.6)}``. Each
        entry is encoded separately, L2-normalised and mixed with normalised weights. With ``cache`` the
        mix is enhanced by the visual cache.
        """
        if not inputs:
            raise ValueError("no inputs to encode")
        embeddings, weights = [], []
        for modality, value in inputs.items():
            if modality not in MODALITY_BRANCH:
                raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(MODALITY_BRANCH)}")
            items, weight = value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], (int, float)) else (value, 1.0)
            embeddings.append(self.encode_branch(MODALITY_BRANCH[modality], as_batch(modality, items)))
            weights.append(float(weight))
        mixed = mix_embeddings(embeddings, weights)
        return cache.enhance(mixed) if cache is not None else mixed

    def bind(self, feature: Tensor) -> Tensor:
        """Bind network: mixed embedding ``[B,C]`` -> visual token ``[B,1,D]``."""
        weight = self.image_bind_proj.weight
        return self._bind(feature.to(weight.dtype).unsqueeze(1))

    def visual_token(self, image: Tensor | None = None, feature: Tensor | None = None) -> Tensor:
        """Training path: one image batch ``[B,3,H,W]`` (or its raw encoder features ``[B,C]``) -> ``[B,1,D]``.

        Equals the single-input case of :meth:`encode` (normalise, weight ``1/(1+1e-6)``).
        """
        if (image is None) == (feature is None):
            raise ValueError("give exactly one of image / feature")
        if feature is None:
            feature = self.encode_branch("vision", image)
        return self.bind(mix_embeddings([feature], [1.0]))

    def adapters(self, visual: Tensor | None, inject: Tensor | None = None) -> list[AdapterState | None] | None:
        """Per-layer adapter states for ``visual [B,1,D]``; rows where ``inject [B]`` is False get none."""
        if visual is None:
            return None
        states = self.llama.adapter_states(visual, self.prefix_query.weight.unsqueeze(1))
        if inject is not None:
            mask = inject.to(visual.dtype)[:, None, None, None]
            states = [s if s is None else AdapterState(s.values * mask, None if s.keys is None else s.keys)
                      for s in states]
        return states

    def train(self, mode: bool = True) -> "ImageBindLLM":
        """Switch training mode; the frozen encoder always stays in eval mode."""
        super().train(mode)
        if self.image_bind is not None:
            self.image_bind.eval()
        return self

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, image: Tensor | None = None, feature: Tensor | None = None,
                visual: Tensor | None = None, inject: Tensor | None = None,
                logits_at: Tensor | None = None) -> Tensor:
        """``tokens [B,S]`` -> logits ``[B,S,V]`` (``[N,V]`` at the True positions of ``logits_at [B,S]``).

        The visual input is one of: ``image [B,3,H,W]``, raw encoder ``feature [B,C]``, or an already
        bound ``visual [B,1,D]`` token; none of them runs the plain decoder. ``inject [B]`` switches the
        injection off per row (text-only samples trained without a visual token).
        """
        if visual is None and (image is not None or feature is not None):
            visual = self.visual_token(image=image, feature=feature)
        return self.llama(tokens, self.adapters(visual, inject), logits_at=logits_at)


def as_batch(modality: str, items: Any) -> Tensor:
    """A batch tensor for ``modality``: tensors pass through, files / bytes / strings are loaded."""
    if isinstance(items, Tensor):
        return items
    from ibllm.processing import load_modality

    return load_modality("image" if modality == "vision" else modality, list(items))


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode for good and stop its gradients."""
    module.requires_grad_(False)
    module.eval()
    return module
