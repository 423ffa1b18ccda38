"""The embedded demo's one-time preparation: digit shards, digit instructions and the stage-0 towers.

``python -m ibllm demo prepare [--root data/demo]`` builds (once; later calls reuse the files):

* ``ROOT/shards/{train,heldout}/*.tar`` — scikit-learn's 1,797 real digits with captions;
* ``ROOT/instructions/`` — LLaVA-format questions about digit images and text-only number questions;
* ``ROOT/encoder.safetensors`` — tiny ImageBind vision + text towers bound contrastively on the
  training digits (stage 0), then frozen by stages 1 and 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ibllm.demos.digits.data import write_digit_instructions, write_digit_shards
from ibllm.demos.digits.towers import build_demo_encoder
from ibllm.verbs.registry import run, verb

DEFAULT_ROOT = Path("data/demo")


def prepare_demo(root: str | Path = DEFAULT_ROOT, seed: int = 0, stage0_steps: int | None = None) -> dict[str, str]:
    """Build every demo asset under ``root`` (idempotent) and return their paths."""
    root = Path(root)
    shards = write_digit_shards(root / "shards", seed=seed)
    instructions = write_digit_instructions(root / "instructions", seed=seed)
    kwargs = {} if stage0_steps is None else {"steps": stage0_steps}
    encoder = build_demo_encoder(root / "encoder.safetensors", seed=seed, **kwargs)
    print(f"demo data: {shards.n_train} train / {shards.n_heldout} held-out digit images in {root / 'shards'}")
    print(f"demo instructions: {instructions.counts}")
    print(f"demo encoder: {encoder}")
    return {"train": shards.train_pattern, "heldout": shards.heldout_pattern, "encoder": str(root / "encoder.safetensors")}


@verb("demo prepare")
def prepare_command(root: str = str(DEFAULT_ROOT), seed: int = 0, stage0_steps: int | None = None) -> dict[str, str]:
    """Build the demo data and stage-0 towers (once; later calls reuse the files).

    Args:
        root: where the demo assets go
        seed: split / caption / stage-0 seed
        stage0_steps: override the stage-0 step count
    """
    return prepare_demo(root, seed, stage0_steps)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm demo prepare``."""
    run("demo", argv)
