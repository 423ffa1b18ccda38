"""Frozen ImageBind encoders (vision, text, audio, depth, thermal, IMU) and the Point-Bind branch."""

from ibllm.models.imagebind.encoder import (
    TRUNK_MODALITIES,
    ImageBindModel,
    build_imagebind,
    imagebind_summary,
    key_modality,
    load_imagebind,
    read_state_dict,
    resolve_modalities,
)

__all__ = [
    "TRUNK_MODALITIES",
    "ImageBindModel",
    "build_imagebind",
    "imagebind_summary",
    "key_modality",
    "load_imagebind",
    "read_state_dict",
    "resolve_modalities",
]
