"""Answering and scoring an evaluation: generation with the paper's prompts, scorers, answers files, ranks.

What ``python -m ibllm evaluate`` (:mod:`ibllm.cli.evaluate`) and the training callback
``callbacks.evaluation.EvaluationCallback`` are made of:

* :func:`answer_batch` / :func:`generate_answers` — one answer per sample with the paper's prompt and
  decoding (:mod:`ibllm.evaluation.prompts`). Sampling (temperature > 0) draws from a generator seeded by
  the settings' seed and the batch's first sample id, so reruns are identical for the same world size
  and batch size; with greedy decoding or batch size 1 the answers do not depend on how samples are split.
* :func:`predict_answers` — spreads the pending samples over every rank with Lightning ``predict``; each
  rank appends its answers, batch by batch, to ``OUT/answers.rank<R>.jsonl``.
* :func:`read_done` / :func:`write_answers` / :func:`claim_output` — the answers files: rank 0 gathers the
  partial files into ``OUT/answers.json`` (sample order); ``OUT/run.json`` records what produced them, and
  answers of a different evaluation are refused or discarded.
* :func:`score_answers` / :func:`results_table` / :func:`summary_lines` — metrics, the markdown table
  beside the paper's numbers, and the final ``name: value`` lines.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ibllm.atomic import write_text_atomic
from ibllm.evaluation import cider as cider_mod
from ibllm.evaluation import kie, mme, ocr, visdial, vqa
from ibllm.evaluation.prompts import EvalSettings, build_prompt
from ibllm.evaluation.readers import EASY_VQA, DataError, Sample
from ibllm.generation import generate_tokens
from ibllm.processing.image import image_transform, open_rgb

ANSWERS = "answers.json"
PARTIAL = "answers.rank{rank}.jsonl"
RUN_FILE = "run.json"
PAPER_BY_TASK = {"ocr": ocr.PAPER_OCR, "vqa": vqa.PAPER_VQA, "caption": cider_mod.PAPER_CAPTION, "kie": kie.PAPER_KIE,
                 "visdial": {"VisDial": visdial.PAPER_VISDIAL_MRR}}
MAIN_METRIC = {"ocr": "accuracy", "vqa": "accuracy", "caption": "cider", "kie": "f1", "visdial": "mrr"}


# ---- generation -----------------------------------------------------------------------------------
def load_eval_image(path: str, bgr: bool = False, size: int = 224) -> torch.Tensor:
    """The evaluation transform of one image (resize + centre crop), channels reversed when ``bgr``."""
    img = open_rgb(path)
    if bgr:
        img = Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., ::-1]))
    return image_transform(img, train=False, size=size)


def safe_decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode ``ids``, dropping ids beyond the tokenizer's vocabulary (padded model vocabularies)."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None:
        ids = [i for i in ids if 0 <= i < vocab]
    return tokenizer.decode(ids).strip()


def _image_size(model: Any) -> int:
    cfg = getattr(getattr(model, "image_bind", None), "cfg", None)
    return int(getattr(cfg, "image_size", 224) or 224)


@torch.no_grad()
def answer_batch(model: Any, tokenizer: Any, samples: Sequence[Sample], settings: EvalSettings) -> list[str]:
    """Generate one answer per sample with the paper's prompt and decoding (``settings``).

    Each row is capped at ``min(new tokens of its task, settings.max_seq_len - prompt length)`` new tokens.
    """
    if not samples:
        return []
    was_training = model.training
    model.eval()
    device = model.prefix_query.weight.device
    images = torch.stack([load_eval_image(s.image, settings.bgr, _image_size(model)) for s in samples])
    visual = model.visual_token(image=images.to(device))
    ids = [tokenizer.encode(build_prompt(s, settings), bos=True, eos=False) for s in samples]
    limit = min(settings.max_seq_len, model.cfg.max_seq_len)
    budgets = []
    for s, row in zip(samples, ids):
        if len(row) >= limit:
            raise ValueError(f"sample {s.id}: its prompt has {len(row)} tokens, no room under max_seq_len {limit}")
        budgets.append(min(settings.new_tokens(s.task), limit - len(row)))
    generator = None
    if settings.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed * 1_000_003 + zlib.crc32(samples[0].id.encode()))
    outputs = generate_tokens(model, ids, visual, max(budgets), temperature=settings.temperature,
                              top_p=settings.top_p, eos_id=tokenizer.eos_id, generator=generator)
    model.train(was_training)
    return [safe_decode(tokenizer, out[:budget]) for out, budget in zip(outputs, budgets)]


def generate_answers(model: Any, tokenizer: Any, samples: Sequence[Sample], settings: EvalSettings,
                     batch_size: int = 8, progress: bool = True) -> dict[str, str]:
    """Answers of every sample, batch by batch on the current process (``{id: answer}``)."""
    answers: dict[str, str] = {}
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
        chunk = samples[start : start + batch_size]
        answers.update(zip([s.id for s in chunk], answer_batch(model, tokenizer, chunk, settings)))
    return answers


# ---- scoring ----------------------------------------------------------------------------------------
def mme_rows(samples: Sequence[Sample], answers: dict[str, str]) -> dict[str, list[tuple[str, str, str, str]]]:
    """Official-format rows per subtask: ``(image name, question, gt, response)`` in sample order."""
    rows: dict[str, list[tuple[str, str, str, str]]] = {}
    for s in samples:
        name = s.extra.get("image_name", Path(s.image).name)
        rows.setdefault(s.subtask or "mme", []).append((name, s.question, s.answers[0], answers[s.id]))
    return rows


def score_answers(task: str, samples: Sequence[Sample], answers: dict[str, str]) -> dict[str, float]:
    """Metrics of ``task`` over the samples that have answers (percent scale; MME scores out of 200 per subtask).

    caption: ``cider`` (CIDEr-D, raw whitespace words, x100 as the paper), ``cider_ptb`` (tokenised),
    ``bleu4``, ``rougeL``. vqa: ``accuracy`` (+ ``yes_no_accuracy`` on yes/no questions).
    """
    done = [s for s in samples if s.id in answers]
    if not done:
        raise ValueError("no answered samples to score")
    preds = [answers[s.id] for s in done]
    if task == "mme":
        rows = {t: [mme.MMERow(*r) for r in rs] for t, rs in mme_rows(done, answers).items()}
        scores = mme.score_tasks(rows)
        out = {t: s.score for t, s in scores.items()}
        out.update({f"{t}_acc": 100 * s.acc for t, s in scores.items()})
        out.update({f"{t}_acc_plus": 100 * s.acc_plus for t, s in scores.items()})
        totals = mme.category_totals(scores)
        if any(t in scores for t in mme.PERCEPTION):
            out["perception"] = totals["perception"]
        if any(t in scores for t in mme.COGNITION):
            out["cognition"] = totals["cognition"]
        return out
    if task == "ocr":
        return {"accuracy": ocr.ocr_accuracy(preds, [s.answers[0] for s in done])}
    if task == "vqa":
        out = {"accuracy": vqa.vqa_accuracy(preds, [s.answers for s in done])}
        yes_no = [(p, s.answers) for p, s in zip(preds, done) if s.answers[0].lower() in ("yes", "no")]
        if yes_no:
            out["yes_no_accuracy"] = vqa.vqa_accuracy(*zip(*yes_no))
        return out
    if task == "kie":
        return {"f1": kie.kie_f1(preds, [s.answers[0] for s in done])}
    if task == "visdial":
        return {"mrr": visdial.visdial_mrr(preds, [s.options or [] for s in done])}
    if task == "caption":
        refs = [s.answers for s in done]
        out = {"cider": 10 * cider_mod.cider_d(preds, refs, "raw")[0],
               "cider_ptb": 10 * cider_mod.cider_d(preds, refs, "ptb")[0]}
        out.update(cider_mod.bleu_rouge(preds, refs))
        return out
    raise ValueError(f"unknown task {task!r}")


def results_table(task: str, metrics: dict[str, float], dataset: str | None = None) -> str:
    """Markdown table: metric, ours, the paper's (ImageBind-LLM) where it reported one."""
    lines = [f"# Evaluation: {task}" + (f" ({dataset})" if dataset else ""), "",
             "| metric | ours | paper (ImageBind-LLM) |", "| --- | ---: | ---: |"]
    if task == "mme":
        paper = mme.PAPER_MME
        keys = [k for k in (*mme.PERCEPTION, "perception", *mme.COGNITION, "cognition") if k in metrics]
        keys += [k for k in metrics if k not in keys and not k.endswith(("_acc", "_acc_plus"))]
        for k in keys:
            lines.append(f"| {k} | {metrics[k]:.2f} | {paper[k]:.2f} |" if k in paper else f"| {k} | {metrics[k]:.2f} | — |")
    else:
        paper_value = PAPER_BY_TASK.get(task, {}).get(dataset or "") if dataset else None
        for k, v in metrics.items():
            ref = f"{paper_value:.2f}" if paper_value is not None and k == MAIN_METRIC.get(task) else "—"
            lines.append(f"| {k} | {v:.2f} | {ref} |")
        if dataset and paper_value is None:
            known = ", ".join(PAPER_BY_TASK.get(task, {}))
            lines += ["", f"The paper reports no {task} number for {dataset!r} (it does for: {known})."]
    return "\n".join(lines) + "\n"


# ---- answers files ----------------------------------------------------------------------------------
def read_done(out: Path) -> dict[str, str]:
    """Answers already written in ``out`` (``answers.json`` and any partial rank files)."""
    done: dict[str, str] = {}
    path = out / ANSWERS
    if path.is_file():
        try:
            for row in json.loads(path.read_text(encoding="utf-8"))["answers"]:
                done.setdefault(row["id"], row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not an answers file of ours ({e}); remove it or pick another --out") from None
    for part in sorted(out.glob("answers.rank*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            done.setdefault(row["id"], row["answer"])
    return done


def wait_for_claim(out: Path, identity: dict[str, Any], timeout: float = 300.0) -> None:
    """Wait (up to ``timeout`` s) until ``OUT/run.json`` records ``identity``: rank 0 has claimed the folder
    (and discarded answers of another run) before this rank reads which answers exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((out / RUN_FILE).read_text(encoding="utf-8")) == identity:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)


def write_answers(out: Path, task: str, data: str, samples: Sequence[Sample], answers: dict[str, str],
                  settings: EvalSettings) -> Path:
    """Write ``answers.json`` (sample order) atomically and remove the partial rank files."""
    rows = [{**s.to_dict(), "answer": answers[s.id]} for s in samples if s.id in answers]
    payload = {"task": task, "data": str(data), "settings": asdict(settings), "answers": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / ANSWERS, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    for part in out.glob("answers.rank*.jsonl"):
        part.unlink()
    return out / ANSWERS


def claim_output(out: Path, identity: dict[str, Any], on_change: str = "error") -> None:
    """Record ``identity`` in ``OUT/run.json``. Answers already in ``out`` whose ``run.json`` records another
    identity are an error (``on_change="error"``) or discarded (``"restart"``); ``"always"`` discards any."""
    path = out / RUN_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        previous = {}
    has_answers = (out / ANSWERS).is_file() or any(out.glob("answers.rank*.jsonl"))
    # answers without a run.json (written by hand or an older version) are trusted
    changed = has_answers and previous is not None and previous != identity
    if changed and on_change == "error":
        differs = sorted(k for k in identity if previous.get(k) != identity[k]) or ["run.json"]
        raise DataError(f"{out} holds answers of another evaluation (differs in: {', '.join(differs)}); "
                        "pass --restart to discard them, or choose another --out")
    if has_answers and (changed or on_change == "always"):
        print(f"{out}: discarding the answers of the previous evaluation", flush=True)
        for stale in [out / ANSWERS, *out.glob("answers.rank*.jsonl")]:
            stale.unlink()
    write_text_atomic(path, json.dumps(identity, indent=1) + "\n")


# ---- Lightning --------------------------------------------------------------------------------------
class SampleList(Dataset):
    """The samples as a map-style dataset (batches are lists of :class:`Sample`)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class EvalData(L.LightningDataModule):
    """The samples not answered yet; rank 0 reads ``out`` and broadcasts the list."""

    def __init__(self, samples: Sequence[Sample], out: Path, batch_size: int) -> None:
        super().__init__()
        self.samples, self.out, self.batch_size = list(samples), out, batch_size
        self.pending: list[Sample] = []

    def setup(self, stage: str) -> None:
        """Find the pending samples (rank 0) and share the list with every rank."""
        pending_ids = None
        if self.trainer.is_global_zero:
            done = read_done(self.out)
            pending_ids = [s.id for s in self.samples if s.id not in done]
        pending_ids = set(self.trainer.strategy.broadcast(pending_ids, src=0))
        self.pending = [s for s in self.samples if s.id in pending_ids]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Leave the batch where it is."""
        return batch  # samples are paths and strings; answer_batch moves the images

    def predict_dataloader(self) -> DataLoader:
        """Batches of pending samples (lists of :class:`Sample`), split over ranks by Lightning."""
        return DataLoader(SampleList(self.pending), batch_size=self.batch_size, shuffle=False,
                          collate_fn=list, num_workers=0)


class EvalModule(L.LightningModule):
    """Wraps a loaded model; ``predict_step`` answers a batch and appends it to this rank's file."""

    def __init__(self, model: Any, tokenizer: Any, settings: EvalSettings, out: Path) -> None:
        super().__init__()
        self.model, self.tok, self.settings, self.out = model, tokenizer, settings, out

    def predict_step(self, batch: list[Sample], batch_idx: int) -> list[tuple[str, str]]:
        """Answer ``batch`` and append ``{"id", "answer"}`` lines to this rank's partial file."""
        answers = answer_batch(self.model, self.tok, batch, self.settings)
        with open(self.out / PARTIAL.format(rank=self.global_rank), "a", encoding="utf-8") as handle:
            for s, a in zip(batch, answers):
                handle.write(json.dumps({"id": s.id, "answer": a}, ensure_ascii=False) + "\n")
            handle.flush()
        return list(zip([s.id for s in batch], answers))

    def on_predict_end(self) -> None:
        """Wait until every rank has written its answers."""
        self.trainer.strategy.barrier("ibllm-eval-gather")


def predict_answers(model: Any, tokenizer: Any, samples: Sequence[Sample], settings: EvalSettings, out: Path,
                    batch_size: int = 8, accelerator: str = "auto", devices: int | str = 1,
                    num_nodes: int = 1, precision: str | None = None) -> bool:
    """Answer the pending samples over every rank; returns True on global rank 0 (which then gathers)."""
    multi = (isinstance(devices, int) and devices > 1) or num_nodes > 1 or devices == -1
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        strategy="ddp" if multi else "auto", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=True, precision=precision,
                        use_distributed_sampler=True)
    out.mkdir(parents=True, exist_ok=True)
    trainer.predict(EvalModule(model, tokenizer, settings, out), datamodule=EvalData(samples, out, batch_size),
                    return_predictions=False)
    return trainer.is_global_zero


def summary_lines(task: str, data: str, metrics: dict[str, float]) -> list[str]:
    """The final ``name: value`` lines (MME totals; the easy-VQA figures of the demo)."""
    lines = []
    easy = str(data).startswith(EASY_VQA)
    if task == "mme":
        for key in ("perception", "cognition"):
            if key in metrics:
                lines.append(f"mme_{key}: {metrics[key]:.2f}")
        if easy and "easyvqa" in metrics:
            lines.append(f"easyvqa_mme_style_score: {metrics['easyvqa']:.2f}")
    elif easy and task == "vqa":
        lines.append(f"easyvqa_accuracy: {metrics['accuracy'] / 100:.2f}")
    else:
        key = MAIN_METRIC[task]
        lines.append(f"{task}_{key}: {metrics[key]:.2f}")
    return lines
