"""Command line: ``python -m ibllm {fit,validate,test,...}`` (LightningCLI) and the other verbs.

* ``fit`` / ``validate`` / ``test`` / ``predict``: Lightning training from a YAML experiment, any field
  overridable with a dotted flag (``--model.lr 1e-4 --trainer.max_steps 100``).
* every other verb is a typed function registered with :func:`ibllm.verbs.registry.verb` in the module
  :data:`VERBS` names (imported only when the verb runs, through its ``main(argv)``): its options come
  from the signature, its help from the docstring, and ``--config FILE.yaml`` sets any of them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# verb -> (module that registers it, one-line help). The module is imported only when its verb runs.
VERBS = {
    "inspect": ("ibllm.cli.inspect_model", "parameter counts and trainable keys of a preset (meta device, no memory)"),
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
    "serve": ("ibllm.web", "browser demo (gradio, 127.0.0.1): uploads with weights, cache, streaming multi-turn chat; --api: OpenAI-compatible HTTP API"),
    "crossmodal": ("ibllm.demos.crossmodal.experiment", "demo cross-modal transfer: bind a spoken-digit audio tower, caption image/text/audio x cache"),
}


def print_overview() -> None:
    """``python -m ibllm --help``: every verb with its one-line help (imports no verb module)."""
    print(__doc__)
    print(f"Training: python -m ibllm {{{','.join(LIGHTNING_COMMANDS)}}} --config EXPERIMENT.yaml [--help]")
    for name, (_, text) in VERBS.items():
        print(f"python -m ibllm {name} --help: {text}")


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch ``python -m ibllm``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from ibllm.cli.user_errors import one_line_errors  # imports torch: only for training verbs
        from ibllm.lit import run_lightning_cli  # Lightning and torch: only for training verbs

        with one_line_errors(f"python -m ibllm {argv[0]}"):  # a bad input: one last line naming it, exit 2
            run_lightning_cli(argv)
        return
    if argv and argv[0] in VERBS:
        importlib.import_module(VERBS[argv[0]][0]).main(argv[1:])  # each verb module's main(argv)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return
    print(f"python -m ibllm: error: unknown verb {argv[0]!r}; choose from "
          f"{', '.join([*LIGHTNING_COMMANDS, *VERBS])} (python -m ibllm --help)", file=sys.stderr)
    raise SystemExit(2)
