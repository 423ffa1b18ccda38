"""The easy-VQA demo on real data: stage 0 towers, caption shards and instructions from the ``easy-vqa`` package.

``python -m ibllm easyvqa prepare [--root data/easyvqa]`` builds (once; later calls reuse the files):

* ``ROOT/encoder.safetensors`` — the ``demo`` preset's vision + text towers bound contrastively (stage 0) on
  the labelled easy-VQA train images against captions naming colour and shape (``a teal circle``), with
  the stage-1 crop augmentation; ``ROOT/encoder.json`` reports the zero-shot 24-way accuracy on the test
  images (and per attribute);
* ``ROOT/shards/train/*.tar`` — stage-1 caption shards; ``ROOT/instructions/llava_train.json`` — every
  train question for stage 2 (:mod:`ibllm.demos.easyvqa.data`).

Then ``make eval`` trains stage 1 (``experiments/easyvqa_pretrain.yaml``) and stage 2
(``experiments/easyvqa_finetune.yaml``) and runs ``python -m ibllm easyvqa evaluate``: every test question
scored with the VQA scorer (``eval/easyvqa/vqa``) and the 954 MME-style yes/no image pairs (``eval/easyvqa/mme``,
official MME parsing), both through ``python -m ibllm evaluate --data easy-vqa``. It prints, last,
``easyvqa_accuracy: 0.xx`` and ``easyvqa_mme_style_score: S`` (out of 200 = 100 * (acc + acc+)).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from ibllm.atomic import write_text_atomic
from ibllm.cli.evaluate import evaluate_args
from ibllm.cli.evaluate import run as run_evaluation
from ibllm.demos.easyvqa.data import COLORS, write_easyvqa_instructions, write_easyvqa_shards
from ibllm.demos.easyvqa.towers import EasyVQARecipe, build_easyvqa_encoder
from ibllm.distributed import shutdown_process_group
from ibllm.evaluation.readers import DataError
from ibllm.evaluation.vqa import vqa_accuracy
from ibllm.verbs.errors import CommandLineError, report
from ibllm.verbs.registry import run, verb

DEFAULT_ROOT = Path("data/easyvqa")


def prepare_easyvqa(root: str | Path = DEFAULT_ROOT, seed: int = 0, stage0_steps: int | None = None,
                    force: bool = False, progress: bool = True, balance_yes_no: bool = False,
                    recipe: EasyVQARecipe | None = None) -> dict[str, str]:
    """Build every easy-VQA demo asset under ``root`` (idempotent) and return their paths. ``recipe``: the
    stage-0 recipe (default: ``EasyVQARecipe(seed=seed)``); ``stage0_steps`` overrides its steps."""
    root = Path(root)
    shards = write_easyvqa_shards(root / "shards", seed=seed)
    instructions = write_easyvqa_instructions(root / "instructions", seed=seed, balance=balance_yes_no)
    recipe = recipe or EasyVQARecipe(seed=seed)
    if stage0_steps is not None:
        recipe = dataclasses.replace(recipe, steps=stage0_steps)
    encoder = build_easyvqa_encoder(root / "encoder.safetensors", recipe, force=force, progress=progress)
    test = encoder.info["accuracy"]["test"]
    print(f"easy-vqa shards: {shards.n_images} labelled train images in {root / 'shards'}")
    print(f"easy-vqa instructions: {instructions.n_questions} train questions on {instructions.n_images} images "
          f"({instructions.n_mme_style} in MME phrasing)"
          + (f", {instructions.n_items} items with yes/no balanced" if balance_yes_no else ""))
    print(f"easy-vqa encoder: {encoder.path} ({'trained' if encoder.trained else 'up to date'}); zero-shot on the "
          f"test images: {test['acc']:.3f} (colour {test['color_acc']:.3f}, shape {test['shape_acc']:.3f})")
    return {"shards": shards.pattern, "instructions": instructions.train, "encoder": str(encoder.path)}


DEFAULT_CHECKPOINT = "runs/easyvqa_finetune/checkpoints/last.ckpt"
DEFAULT_EVAL_DIR = Path("eval/easyvqa")
# Answers are one word; a short budget keeps a batch from running on when one row misses EOS.
EVAL_MAX_NEW_TOKENS = 10
# The frozen weights trained in bf16 (frozen_dtype); bf16 answers match fp32's and come 1.7x faster on CPU.
EVAL_DTYPE = "bfloat16"


def evaluate_easyvqa(checkpoint: str, out: str | Path = DEFAULT_EVAL_DIR, extra: Sequence[str] = ()) -> dict[str, float]:
    """Evaluate ``checkpoint`` on the easy-VQA test split: every question with the VQA scorer (``OUT/vqa``),
    and the MME-style yes/no pairs (``OUT/mme``). Resumes answers of the same checkpoint and settings, starts
    over when they changed. ``extra``: more ``python -m ibllm evaluate`` flags (decoding, batch size, limit).

    Returns ``{"easyvqa_accuracy": fraction, "easyvqa_mme_style_score": score out of 200}``.
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint {checkpoint}: train first (make eval does both stages)")
    results = {}
    for task in ("vqa", "mme"):
        args = evaluate_args(["--task", task, "--data", "easy-vqa", "--out", str(Path(out) / task),
                              "--checkpoint", checkpoint, "--max-new-tokens", str(EVAL_MAX_NEW_TOKENS),
                              "--batch-size", "32", "--dtype", EVAL_DTYPE, *extra])
        args.on_change = "always" if args.on_change == "always" else "restart"
        metrics = run_evaluation(args)
        if metrics is not None:  # None on the other ranks of a multi-process evaluation: they only answer
            results[task] = metrics
    if not results:
        return {}
    by_type = accuracy_by_answer_type(Path(out) / "vqa" / "answers.json")
    summary = {"easyvqa_accuracy": results["vqa"]["accuracy"] / 100, "by_answer_type": by_type,
               "mme_style": {"acc": results["mme"]["easyvqa_acc"] / 100,
                             "acc_plus": results["mme"]["easyvqa_acc_plus"] / 100},
               "easyvqa_mme_style_score": results["mme"]["easyvqa"], "checkpoint": checkpoint}
    write_text_atomic(Path(out) / "summary.json", json.dumps(summary, indent=1) + "\n")
    for kind, (accuracy, n) in by_type.items():
        print(f"easyvqa {kind} questions: {accuracy:.4f} ({n})")
    print(f"easyvqa MME-style pairs: acc {summary['mme_style']['acc']:.4f}, acc+ {summary['mme_style']['acc_plus']:.4f}")
    return {"easyvqa_accuracy": summary["easyvqa_accuracy"], "easyvqa_mme_style_score": summary["easyvqa_mme_style_score"]}


def accuracy_by_answer_type(answers_file: Path) -> dict[str, tuple[float, int]]:
    """``{"yes/no" | "colour" | "shape": (accuracy in [0, 1], count)}`` of an easy-VQA answers file."""
    groups: dict[str, tuple[list[str], list[list[str]]]] = {}
    for row in json.loads(answers_file.read_text())["answers"]:
        truth = row["answers"][0]
        kind = "yes/no" if truth in ("yes", "no") else "colour" if truth in COLORS else "shape"
        preds, gts = groups.setdefault(kind, ([], []))
        preds.append(row["answer"])
        gts.append(row["answers"])
    return {kind: (vqa_accuracy(*groups[kind]) / 100, len(groups[kind][0]))
            for kind in ("yes/no", "colour", "shape") if kind in groups}


@verb("easyvqa prepare", flat=("recipe",), skip=("templates", "version", "dataset"),
      aliases={"--stage0-steps": "--steps", "--fp32": "--bf16=false"}, description=__doc__)
def prepare_command(root: str = str(DEFAULT_ROOT), recipe: EasyVQARecipe = EasyVQARecipe(), force: bool = False,
                    quiet: bool = False, balance_yes_no: bool = False) -> dict[str, str]:
    """Shards, instructions and stage-0 towers (``--config experiments/stage0_easyvqa.yaml``: the recipe as YAML).

    Args:
        root: where the assets go
        recipe: the stage-0 recipe (its seed also draws the captions and instructions)
        force: retrain the towers even if a matching file exists
        quiet: no progress bar
        balance_yes_no: repeat yes/no questions until yes and no are equally frequent per kind of question
            (delete runs/easyvqa_finetune to retrain stage 2 on the new file)
    """
    try:
        return prepare_easyvqa(root, recipe.seed, force=force, progress=not quiet, balance_yes_no=balance_yes_no,
                               recipe=recipe)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


@verb("easyvqa evaluate", rest="extra", description=__doc__,
      epilog="Options not listed here go on to `python -m ibllm evaluate` (e.g. --limit 200 --temperature 0 "
             "--devices 2)")
def evaluate_command(checkpoint: str = DEFAULT_CHECKPOINT, out: str = str(DEFAULT_EVAL_DIR),
                     extra: list[str] | None = None) -> dict[str, float]:
    """Score a checkpoint on the test split (``make eval``); prints ``easyvqa_accuracy`` and the MME-style score.

    Args:
        checkpoint: the adapter
        out: results folder
        extra: more ``python -m ibllm evaluate`` options
    """
    try:
        scores = evaluate_easyvqa(checkpoint, out, extra or ())
    except CommandLineError as e:
        report("python -m ibllm easyvqa evaluate", str(e))
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    shutdown_process_group()
    for name, value in scores.items():
        print(f"{name}: {value:.2f}", flush=True)
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm easyvqa prepare|evaluate``."""
    run("easyvqa", argv)
