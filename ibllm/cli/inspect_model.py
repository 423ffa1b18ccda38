"""``python -m ibllm inspect``: parameter counts and trainable key names of a preset, built on the meta device."""

from __future__ import annotations

import json as json_module
from collections.abc import Sequence
from typing import Literal

import torch

from ibllm import tuning
from ibllm.config import llama_preset
from ibllm.models.ibllm import ImageBindLLM
from ibllm.models.imagebind import imagebind_summary
from ibllm.verbs.errors import report
from ibllm.verbs.registry import run, verb


def inspect_report(preset: str | None = None, stage: str = "pretrain", imagebind: str | None = None,
                   modalities: str | None = None) -> dict:
    """Build the requested models on the meta device and report their parameters."""
    result: dict = {}
    if preset:
        with torch.device("meta"):
            model = ImageBindLLM(llama_preset(preset), stage=stage)
        result["llm"] = {"preset": preset, "stage": stage,
                         "parameters": tuning.count_parameters(model, stage),
                         "trainable_keys": [n for n, _ in tuning.trainable_parameters(model, stage)]}
    if imagebind:
        branches = modalities.split(",") if modalities else None
        result["imagebind"] = {"preset": imagebind, **imagebind_summary(imagebind, branches)}
    return result


def print_inspect(result: dict) -> None:
    """Human-readable form of :func:`inspect_report`'s report."""
    if "llm" in result:
        llm = result["llm"]
        print(f"ImageBind-LLM {llm['preset']} — stage {llm['stage']}")
        for key, value in llm["parameters"].items():
            print(f"  {key:<28} {value:>15,}")
        print(f"  trainable tensors: {len(llm['trainable_keys'])}")
        for name in llm["trainable_keys"]:
            print(f"    {name}")
    if "imagebind" in result:
        ib = result["imagebind"]
        print(f"ImageBind {ib['preset']}")
        for key, value in ib.items():
            if key in ("preset", "keys"):
                continue
            print(f"  {key:<28} {value:>15,}" if isinstance(value, int) else f"  {key}: {value}")
        print(f"  state-dict keys: {len(ib['keys'])}")
        for name in ib["keys"]:
            print(f"    {name}")


@verb("inspect")
def inspect_command(preset: str | None = None, stage: Literal["pretrain", "finetune"] = "pretrain",
                    imagebind: str | None = None, modalities: str | None = None, json: bool = False) -> dict:
    """Parameter counts and trainable keys of a preset (meta device, no memory).

    Args:
        preset: LLaMA preset (tiny, 7B, 13B, smollm2-135m)
        stage: which stage's trainable parameters to count
        imagebind: ImageBind preset (huge, huge_w3d, tiny, demo)
        modalities: comma-separated ImageBind branches (default: all)
        json: print JSON instead of text
    """
    if not preset and not imagebind:
        report("python -m ibllm inspect", "inspect needs --preset and/or --imagebind")
    result = inspect_report(preset, stage, imagebind, modalities)
    print(json_module.dumps(result, indent=2)) if json else print_inspect(result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm inspect``."""
    run("inspect", argv)
