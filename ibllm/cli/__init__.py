"""Command line: ``python -m ibllm {fit,validate,test,...}`` (LightningCLI) and small user commands.

* ``fit`` / ``validate`` / ``test`` / ``predict``: Lightning training from a YAML experiment, any field
  overridable with a dotted flag (``--model.lr 1e-4 --trainer.max_steps 100``).
* ``inspect``: parameter counts and trainable key names of a preset, built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Commands with their own argument parser: name -> (module, one-line help).
DELEGATED_COMMANDS = {
    "demo": ("ibllm.demos.digits.prepare", "prepare the embedded demo (digit shards, instructions, stage-0 towers)"),
    "easyvqa": ("ibllm.demos.easyvqa.command", "easy-VQA demo on real data: `prepare` (shards, instructions, stage-0 towers), `evaluate` a checkpoint (make eval)"),
    "bind": ("ibllm.demos.digits.towers", "stage 0: contrastively bind an ImageBind tower to another (e.g. a new modality)"),
    "score": ("ibllm.cli.score", "score answers the official way: `score mme RESULTS_DIR` (per-subtask <task>.txt)"),
    "evaluate": ("ibllm.cli.evaluate", "evaluate a checkpoint on MME / OCR / VQA / caption / KIE / VisDial data (paper protocols)"),
    "chat": ("ibllm.cli.chat", "interactive multi-turn chat with streaming (/image PATH, /audio PATH, /reset)"),
    "generate": ("ibllm.cli.generate", "one-shot generation for scripts (--json)"),
    "export": ("ibllm.cli.export", "export/import adapters: --format official|safetensors|merged"),
    "consolidate": ("ibllm.cli.consolidate", "sharded (FSDP2) checkpoint folder -> trainable-only file: CKPT_DIR --out FILE"),
    "features": ("ibllm.cli.features", "precompute stage-1 image embeddings (KEY.npy) into copies of caption shards"),
    "cache": ("ibllm.cli.cache", "build the visual cache (FAISS index of image embeddings) from shards, over ranks"),
    "serve": ("ibllm.web", "browser demo (gradio, 127.0.0.1): uploads with weights, cache, streaming multi-turn chat"),
    "crossmodal": ("ibllm.demos.crossmodal.experiment", "demo cross-modal transfer: bind a spoken-digit audio tower, caption image/text/audio x cache"),
}


def inspect_command(args: argparse.Namespace) -> dict:
    """Build the requested model on the meta device and report its parameters."""
    import torch

    from ibllm import tuning
    from ibllm.config import llama_preset
    from ibllm.models.ibllm import ImageBindLLM

    report: dict = {}
    if args.preset:
        with torch.device("meta"):
            model = ImageBindLLM(llama_preset(args.preset), stage=args.stage)
        report["llm"] = {"preset": args.preset, "stage": args.stage,
                         "parameters": tuning.count_parameters(model, args.stage),
                         "trainable_keys": [n for n, _ in tuning.trainable_parameters(model, args.stage)]}
    if args.imagebind:
        from ibllm.models.imagebind import imagebind_summary

        modalities = args.modalities.split(",") if args.modalities else None
        report["imagebind"] = {"preset": args.imagebind, **imagebind_summary(args.imagebind, modalities)}
    return report


def print_inspect(report: dict) -> None:
    """Human-readable form of :func:`inspect_command`'s report."""
    if "llm" in report:
        llm = report["llm"]
        print(f"ImageBind-LLM {llm['preset']} — stage {llm['stage']}")
        for key, value in llm["parameters"].items():
            print(f"  {key:<28} {value:>15,}")
        print(f"  trainable tensors: {len(llm['trainable_keys'])}")
        for name in llm["trainable_keys"]:
            print(f"    {name}")
    if "imagebind" in report:
        ib = report["imagebind"]
        print(f"ImageBind {ib['preset']}")
        for key, value in ib.items():
            if key in ("preset", "keys"):
                continue
            print(f"  {key:<28} {value:>15,}" if isinstance(value, int) else f"  {key}: {value}")
        print(f"  state-dict keys: {len(ib['keys'])}")
        for name in ib["keys"]:
            print(f"    {name}")


def build_parser() -> argparse.ArgumentParser:
    """Parser of the non-Lightning commands."""
    parser = argparse.ArgumentParser(prog="python -m ibllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="parameter counts and trainable keys of a preset (meta device, no memory)")
    ins.add_argument("--preset", help="LLaMA preset (tiny, 7B, 13B, smollm2-135m)")
    ins.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune"))
    ins.add_argument("--imagebind", help="ImageBind preset (huge, huge_w3d, tiny, demo)")
    ins.add_argument("--modalities", help="comma-separated ImageBind branches (default: all)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch ``python -m ibllm``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from ibllm.lit import run_lightning_cli

        run_lightning_cli(argv)
        return
    if argv and argv[0] in DELEGATED_COMMANDS:
        import importlib

        importlib.import_module(DELEGATED_COMMANDS[argv[0]][0]).main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        print(f"\nTraining: python -m ibllm {{{','.join(LIGHTNING_COMMANDS)}}} --config EXPERIMENT.yaml [--help]")
        for name, (_, text) in DELEGATED_COMMANDS.items():
            print(f"python -m ibllm {name} --help: {text}")
        return
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        if not args.preset and not args.imagebind:
            build_parser().error("inspect needs --preset and/or --imagebind")
        report = inspect_command(args)
        print(json.dumps(report, indent=2)) if args.json else print_inspect(report)
