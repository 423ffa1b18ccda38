"""Run an evaluation: read the data, generate the answers (all ranks), score them, write the report.

``python -m ibllm evaluate --task mme|ocr|vqa|caption|kie|visdial --data DIR --out OUT [model options]``

* Samples are spread over every rank by Lightning ``predict`` (one process per device; ``--devices 2``
  on CPU starts two processes). Each rank appends its answers, batch by batch, to
  ``OUT/answers.rank<R>.jsonl``; rank 0 gathers them into ``OUT/answers.json`` (sample order,
  deterministic) and removes the partial files.
* Resumable: a run that finds ``answers.json`` or partial files in ``OUT`` answers only the samples not
  answered yet (rank 0 decides and broadcasts, so every rank splits the same list). ``OUT/run.json``
  records what produced them (task, data, checkpoint sha256, model files, decoding settings); answers of
  a different evaluation are refused (``--restart`` discards them).
* Scores go to ``OUT/metrics.json`` and ``OUT/results.md`` (ours beside the paper's numbers); MME also
  writes ``OUT/mme_results/<task>.txt`` in the official tool's format (score it with
  ``python -m ibllm score mme OUT/mme_results``).
* Decoding follows :mod:`ibllm.evaluation.prompts` (the paper's settings; every one overridable).
  Sampling (temperature > 0) draws from a generator seeded by ``--seed`` and the batch's first sample
  id: reruns are identical for the same world size and batch size; with greedy decoding
  (``--temperature 0``) or ``--batch-size 1`` the answers do not depend on how samples are split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

import ibllm
from ibllm.atomic import write_text_atomic
from ibllm.distributed import shutdown_process_group
from ibllm.evaluation import mme
from ibllm.evaluation.prompts import EvalSettings
from ibllm.evaluation.readers import EASY_VQA, TASKS, DataError, read_task
from ibllm.evaluation.runner import (claim_output, mme_rows, predict_answers, read_done, results_table, score_answers,
                                     summary_lines, wait_for_claim, write_answers)
from ibllm.processing.shards import world_info
from ibllm.stage0_recipe import file_sha256
from ibllm.verbs.registry import parse, verb
from ibllm.verbs.registry import run as run_verb


def load_model(args: SimpleNamespace) -> tuple[Any, Any]:
    """(ImageBindLLM, tokenizer) for the evaluation, via :func:`ibllm.load` (seeded: random preset weights
    are the same in every process)."""
    torch.manual_seed(args.seed)
    loaded = ibllm.load(adapter=args.checkpoint, llama=args.llm, tokenizer=args.tokenizer,
                        imagebind=args.imagebind_weights, imagebind_preset=args.imagebind, modalities=["vision"],
                        dtype=args.dtype)
    return loaded.model, loaded.tokenizer


@verb("evaluate", aliases={"--llama": "--llm"}, description=__doc__)
def evaluate_command(task: Literal[TASKS], data: str, out: str | None = None, dataset: str | None = None,
                     limit: int | None = None, checkpoint: str | None = None, llm: str | None = None,
                     tokenizer: str | None = None, imagebind: str | None = None, imagebind_weights: str | None = None,
                     dtype: str | None = None, temperature: float | None = None, top_p: float | None = None,
                     max_seq_len: int | None = None, max_new_tokens: int | None = None, bgr: bool = False,
                     template: bool = True, seed: int = 0, batch_size: int = 8, accelerator: str = "auto",
                     devices: str = "1", num_nodes: int = 1, restart: bool = False) -> dict[str, float] | None:
    """Evaluate a checkpoint; returns the metrics on rank 0 (None on other ranks).

    Args:
        task: which benchmark protocol
        data: data folder (layouts: ibllm.evaluation.readers) or easy-vqa[:test|:train]
        out: output folder (default: eval/<task>)
        dataset: dataset name for the paper column (e.g. TextVQA, IIIT5K, NoCaps)
        limit: evaluate only the first N samples
        checkpoint: adapter: our Lightning checkpoint / export, or an official file
        llm: base LLM (default: recorded in the checkpoint)
        tokenizer: tokenizer file (default: the LLM's)
        imagebind: ImageBind preset (default: inferred from the weights)
        imagebind_weights: ImageBind weights (default: recorded in the checkpoint)
        dtype: float32 (default), bfloat16, float16
        temperature: default 0.1 (0 = greedy)
        top_p: default 0.75
        max_seq_len: prompt + answer tokens, default 256
        max_new_tokens: default 16 for captions, 256 otherwise
        bgr: feed BGR images like LVLM-eHub's wrapper (a quirk)
        template: the Alpaca template (false, or --no-template: the raw instruction)
        seed: sampling seed
        batch_size: samples per generation batch
        accelerator: Lightning accelerator
        devices: devices (= processes) to spread the samples over
        num_nodes: nodes
        restart: discard answers already in --out (default: resume them; an error if they came from another
            checkpoint, data or decoding settings)
    """
    args = SimpleNamespace(**{k: v for k, v in locals().items()}, on_change="always" if restart else "error")
    try:
        metrics = run(args)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    shutdown_process_group()
    return metrics


def evaluate_args(argv: Sequence[str]) -> SimpleNamespace:
    """The settings :func:`run` takes, from ``python -m ibllm evaluate`` options (raises
    :class:`~ibllm.verbs.errors.CommandLineError` for a bad one)."""
    values = parse("evaluate", argv)
    return SimpleNamespace(**values, on_change="always" if values["restart"] else "error")


def settings_from(args: SimpleNamespace) -> EvalSettings:
    """:class:`EvalSettings` with the command-line overrides."""
    return EvalSettings().with_overrides(temperature=args.temperature, top_p=args.top_p, max_seq_len=args.max_seq_len,
                                         max_new_tokens=args.max_new_tokens, bgr=args.bgr or None,
                                         template=None if args.template else False, seed=args.seed)


def run_identity(args: SimpleNamespace, settings: EvalSettings) -> dict[str, Any]:
    """What makes answers reusable: task, data, model files (the checkpoint by sha256) and decoding settings."""
    checkpoint = args.checkpoint
    return {"task": args.task, "data": str(args.data), "checkpoint": checkpoint,
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
            "llm": args.llm, "tokenizer": args.tokenizer, "imagebind": args.imagebind,
            "imagebind_weights": args.imagebind_weights, "dtype": args.dtype, "settings": asdict(settings)}


def run(args: SimpleNamespace) -> dict[str, float] | None:
    """Everything ``evaluate`` does; returns the metrics on rank 0 (None on other ranks)."""
    settings = settings_from(args)
    samples = read_task(args.task, args.data, args.limit)
    out = Path(args.out or f"eval/{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    on_change = getattr(args, "on_change", "error")
    identity = run_identity(args, settings)
    rank = world_info(worker=0, num_workers=1).rank  # as the launcher set it: no process group exists yet
    if rank == 0:  # the other ranks leave the folder to rank 0 ...
        claim_output(out, identity, on_change)
    elif on_change != "always":  # ... and read the answers only once it has claimed it
        wait_for_claim(out, identity)
    devices: int | str = int(args.devices) if str(args.devices).lstrip("-").isdigit() else args.devices
    done = read_done(out) if rank == 0 or on_change != "always" else {}
    pending = [s for s in samples if s.id not in done]
    print(f"{args.task}: {len(samples)} samples, {len(samples) - len(pending)} already answered in {out}", flush=True)
    if pending:
        model, tokenizer = load_model(args)
        if not predict_answers(model, tokenizer, samples, settings, out, args.batch_size, args.accelerator,
                               devices, args.num_nodes):
            return None
    answers = read_done(out)
    missing = [s.id for s in samples if s.id not in answers]
    if missing:
        raise RuntimeError(f"{len(missing)} samples have no answer after the run (e.g. {missing[:3]})")
    write_answers(out, args.task, args.data, samples, answers, settings)
    metrics = score_answers(args.task, samples, answers)
    if args.task == "mme":
        mme.write_results_files(mme_rows(samples, answers), out / "mme_results")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    table = results_table(args.task, metrics, args.dataset)
    write_text_atomic(out / "results.md", table)
    print(table)
    print("\n".join(summary_lines(args.task, args.data, metrics)), flush=True)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float] | None:
    """``python -m ibllm evaluate ...``."""
    return run_verb("evaluate", argv)
