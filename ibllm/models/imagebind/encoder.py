"""ImageBind (+ Point-Bind) encoder assembly, building, freezing and strict checkpoint loading.

Shapes: every modality returns ``[B, out_embed_dim]``. Inputs with ``ndim >= 5`` are multi-clip
``[B, S, ...]`` (video ``[B, S, 3, T, H, W]``, audio ``[B, S, 1, mel, frames]``): the clips are encoded as
``B * S`` samples and the postprocessed embeddings averaged over ``S`` (not renormalised).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ibllm.config import MODALITIES, ImageBindConfig, imagebind_preset
from ibllm.models import pointbind
from ibllm.models.imagebind.heads import build_head, build_postprocessor
from ibllm.models.imagebind.stems import build_preprocessor
from ibllm.models.imagebind.trunk import SimpleTransformer

TRUNK_MODALITIES: tuple[str, ...] = ("vision", "text", "audio", "depth", "thermal", "imu")
_GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
_PREFIX = "image_bind."


def _as_config(cfg: ImageBindConfig | str) -> ImageBindConfig:
    return imagebind_preset(cfg) if isinstance(cfg, str) else cfg


def resolve_modalities(cfg: ImageBindConfig, modalities: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """Validate ``modalities`` (None = the six trunks, plus ``point`` when ``cfg.point`` is set), canonical order."""
    available = TRUNK_MODALITIES + (("point",) if cfg.point is not None else ())
    if modalities is None:
        return available
    requested = {modalities} if isinstance(modalities, str) else set(modalities)
    unknown = sorted(requested - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown ImageBind modalities {unknown}; choose from {list(MODALITIES)}")
    if "point" in requested and cfg.point is None:
        raise ValueError(f"ImageBind config {cfg.name!r} has no point encoder (cfg.point is None)")
    if not requested:
        raise ValueError("at least one ImageBind modality is required")
    return tuple(m for m in available if m in requested)


def key_modality(key: str) -> str | None:
    """The modality a state-dict key belongs to (``point_trunk.*`` -> point), or None if it is not ImageBind's."""
    if key.startswith("point_trunk."):
        return "point"
    group, _, rest = key.partition(".")
    if group in _GROUPS:
        name = rest.partition(".")[0]
        if name in MODALITIES:
            return name
    return None


class ImageBindModel(nn.Module):
    """The ImageBind encoders of ``modalities`` (only those are built) and, optionally, Point-Bind.

    State-dict keys match the official ``imagebind_huge.pth`` / ``imagebind_w3D.pth`` layout.
    Call :meth:`freeze` (done by :func:`build_imagebind` / :func:`load_imagebind`) to make it a frozen
    encoder that stays in eval mode even when a parent module calls ``.train()``.
    """

    def __init__(self, cfg: ImageBindConfig, modalities: Sequence[str] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities: tuple[str, ...] = resolve_modalities(cfg, modalities)
        self._frozen = False
        trunks = [m for m in self.modalities if m != "point"]
        self.modality_preprocessors = nn.ModuleDict({m: build_preprocessor(m, cfg) for m in trunks})
        self.modality_trunks = nn.ModuleDict({m: SimpleTransformer(cfg.modality(m)) for m in trunks})
        self.modality_heads = nn.ModuleDict({m: build_head(m, cfg) for m in self.modalities})
        self.modality_postprocessors = nn.ModuleDict({m: build_postprocessor(m) for m in self.modalities})
        if "point" in self.modalities:
            assert cfg.point is not None
            self.point_trunk = pointbind.PointBindTrunk(cfg.point)

    @property
    def embed_dim(self) -> int:
        """Output width (``out_embed_dim``)."""
        return self.cfg.out_embed_dim

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` was called."""
        return self._frozen

    def freeze(self) -> "ImageBindModel":
        """Disable gradients, switch to eval mode and keep it there (``train(True)`` becomes a no-op)."""
        self.requires_grad_(False)
        self._frozen = True
        return self.train(False)

    def train(self, mode: bool = True) -> "ImageBindModel":
        """Standard ``train``, except that a frozen model always stays in eval mode."""
        return super().train(False if self._frozen else mode)

    def encode(self, name: str, x: Tensor, *, point_seed: int | None = None,
               point_generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Encode one single-clip batch of modality ``name``; returns ``(postprocessed, head output)``, ``[B, out]``."""
        if name not in self.modalities:
            raise KeyError(f"modality {name!r} was not built; this model has {list(self.modalities)}")
        if name == "point":
            feats = self.point_trunk(x, seed=point_seed, generator=point_generator)
            head = self.modality_heads["point"](feats)
        else:
            if x.is_floating_point():
                x = x.to(self._param_dtype())
            tokens, mask, head_kwargs = self.modality_preprocessors[name](x)
            tokens = self.modality_trunks[name](tokens, attn_mask=mask)
            head = self.modality_heads[name](tokens, **head_kwargs)
        return self.modality_postprocessors[name](head), head

    def forward(self, inputs: Mapping[str, Tensor], prenorm: bool = False, *, point_seed: int | None = None,
                point_generator: torch.Generator | None = None) -> dict[str, Tensor] | tuple[dict, dict]:
        """Encode ``{modality: tensor}`` to ``{modality: [B, out_embed_dim]}`` (postprocessed).

        Inputs: vision ``[B, 3, H, W]`` or video ``[B, S, 3, T, H, W]``; text int64 ``[B, 77]``; audio
        ``[B, 1, mel, frames]`` or ``[B, S, 1, mel, frames]``; depth/thermal ``[B, 1, H, W]``; imu ``[B, 6, T]``;
        point ``[B, N, 3]``. ``ndim >= 5`` means multi-clip: outputs are averaged over ``S`` after the
        postprocessor. With ``prenorm=True`` also returns the head outputs (clip-averaged) as a second dict.
        ``point_seed`` / ``point_generator`` make the FPS start of the point encoder deterministic.
        """
        outputs: dict[str, Tensor] = {}
        prenorms: dict[str, Tensor] = {}
        for name, x in inputs.items():
            if x is None:
                continue
            clips = x.ndim >= 5
            if clips:
                b, s = x.shape[:2]
                x = x.reshape(b * s, *x.shape[2:])
            post, head = self.encode(name, x, point_seed=point_seed, point_generator=point_generator)
            if clips:
                post = post.reshape(b, s, -1).mean(dim=1)
                head = head.reshape(b, s, -1).mean(dim=1)
            outputs[name] = post
            prenorms[name] = head
        return (outputs, prenorms) if prenorm else outputs

    def _param_dtype(self) -> torch.dtype:
        return next(iter(self.modality_heads.parameters())).dtype


def build_imagebind(cfg: ImageBindConfig | str, modalities: Sequence[str] | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageBindModel:
    """A randomly initialised, frozen ImageBind (no grads, eval mode that ``.train()`` cannot undo)."""
    cfg = _as_config(cfg)
    with torch.device(device if device is not None else "cpu"):
        model = ImageBindModel(cfg, modalities)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.freeze()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a flat ``{key: tensor}`` from ``.pth``/``.pt`` (``torch.load(weights_only=True)``, mmap when
    possible) or ``.safetensors``. Unwraps a dict nested under ``'model'`` (or ``'state_dict'``).
    A missing file raises FileNotFoundError, an unreadable one ValueError, both naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageBind checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read ImageBind checkpoint {path}: {type(err).__name__}: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"ImageBind checkpoint {path} does not hold a flat state dict of tensors")
    return dict(state)


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """If any key carries the ImageBind-LLM prefix ``image_bind.``, keep only those keys, unprefixed."""
    if any(k.startswith(_PREFIX) for k in state):
        return {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return state


def load_imagebind(path: str | Path, cfg: ImageBindConfig | str = "huge", modalities: Sequence[str] | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> ImageBindModel:
    """Load a frozen ImageBind from ``imagebind_huge.pth`` / ``imagebind_w3D.pth`` (or ``.safetensors``).

    Keys of modalities that were not requested are ignored; the requested ones load strictly: missing or
    unexpected keys and shape mismatches raise one ValueError naming the file, the keys and the shapes.
    The model is built on the meta device and the (memory-mapped) tensors assigned, so weights are not
    held twice. ``dtype`` defaults to the default float dtype (float32).
    """
    cfg = _as_config(cfg)
    state = _strip_prefix(read_state_dict(path))
    with torch.device("meta"):
        model = ImageBindModel(cfg, modalities)
    expected = model.state_dict()
    wanted = set(model.modalities)
    selected: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        owner = key_modality(key)
        if owner is None or (owner in wanted and key not in expected):
            unexpected.append(key)
        elif owner in wanted:
            selected[key] = value
    missing = [k for k in expected if k not in selected]
    mismatched = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
                  for k, v in selected.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(_load_error(path, cfg, model.modalities, missing, unexpected, mismatched))
    model.load_state_dict(selected, strict=True, assign=True)
    model.to(device=device, dtype=dtype or torch.get_default_dtype())
    return model.freeze()


def _load_error(path: str | Path, cfg: ImageBindConfig, modalities: Sequence[str], missing: list[str],
                unexpected: list[str], mismatched: list[str], limit: int = 20) -> str:
    lines = [f"ImageBind checkpoint {path} does not match config {cfg.name!r} (modalities {list(modalities)}):"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
            lines.append(f"  {len(items)} {title}: {shown}")
    return "\n".join(lines)


def imagebind_summary(cfg: ImageBindConfig | str, modalities: Sequence[str] | None = None) -> dict[str, Any]:
    """Parameter counts per modality and the state-dict layout, computed on the meta device (no memory).

    Returns ``{"config", "modalities", "params": {modality: n}, "total_params", "num_keys",
    "keys": [...], "shapes": {key: [dims]}, "fp32_bytes"}``.
    """
    cfg = _as_config(cfg)
    with torch.device("meta"):
        model = ImageBindModel(cfg, modalities)
    params = {m: 0 for m in model.modalities}
    for name, p in model.named_parameters():
        owner = key_modality(name)
        assert owner is not None, name
        params[owner] += p.numel()
    state = model.state_dict()
    total = sum(params.values())
    return {
        "config": cfg.name,
        "modalities": list(model.modalities),
        "params": params,
        "total_params": total,
        "num_keys": len(state),
        "keys": list(state),
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "fp32_bytes": 4 * sum(v.numel() for v in state.values()),
    }
