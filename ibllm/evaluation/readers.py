"""Readers of the evaluation data on disk; every reader returns a list of :class:`Sample`.

MME (``--task mme``): ``DIR`` is ``MME_Benchmark_release_version/`` (or a folder holding it); every
subtask folder is read in one of the two published layouts, detected per subtask:

* split: ``<task>/images/<stem>.{jpg,png}`` + ``<task>/questions_answers_YN/<stem>.txt``;
* flat:  ``<task>/<stem>.{jpg,png}`` + ``<task>/<stem>.txt``.

Each ``.txt`` holds the image's two ``question<TAB>Yes|No`` lines (yes first).

Other tasks: ``DIR/annotations.json`` (a JSON list) or ``DIR/annotations.jsonl`` (one object a line);
``image`` is a path relative to ``DIR``; an optional ``id`` names the sample (default: its index).

=========  =================================================================================
task       fields of one record
=========  =================================================================================
ocr        ``image``, ``text`` (the ground-truth word(s))
vqa        ``image``, ``question``, ``answers`` (list or one string); optional ``options`` (list:
           ScienceQA / IconQA style prompt) or ``caption`` (VSR style prompt)
caption    ``image``, ``references`` (list of captions)
kie        ``image``, ``question``, ``answer``
visdial    ``image``, ``question``, ``answer_options`` (the 100 options, file order)
=========  =================================================================================

Real data shipped on PyPI: ``--data easy-vqa`` (or ``easy-vqa:train``) reads the ``easy-vqa`` package's
test (train) split: ``--task vqa`` gives all its questions, ``--task mme`` the MME-style pairs (per
image its first yes question and first no question, each ending "Please answer yes or no.").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ibllm.evaluation.mme import COGNITION, PERCEPTION
from ibllm.processing.shards import IMAGE_EXTENSIONS

TASKS = ("mme", "ocr", "vqa", "caption", "kie", "visdial")
# Image files of benchmark folders: the shard image extensions in either case, plus bitmaps.
IMAGE_SUFFIXES = (*(f".{e}" for e in IMAGE_EXTENSIONS), *(f".{e.upper()}" for e in IMAGE_EXTENSIONS), ".bmp")
MME_SUFFIX = "Please answer yes or no."
EASY_VQA = "easy-vqa"


class DataError(ValueError):
    """A data folder or file that does not have the documented layout."""


@dataclass
class Sample:
    """One evaluation question. ``answers``: the ground truth(s); ``options``: VisDial / multiple choice."""

    id: str
    task: str
    image: str
    question: str = ""
    answers: list[str] = field(default_factory=list)
    options: list[str] | None = None
    subtask: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


# ---- MME ------------------------------------------------------------------------------------------
def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem.<ext>`` for the first image extension that exists."""
    for ext in IMAGE_SUFFIXES:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def mme_layout(task_dir: Path) -> str:
    """``"split"`` when ``task_dir/images/`` exists, else ``"flat"``."""
    return "split" if (task_dir / "images").is_dir() else "flat"


def read_mme_pairs(txt: Path) -> list[tuple[str, str]]:
    """The ``(question, Yes|No)`` lines of one MME annotation file."""
    pairs = []
    for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        question, sep, answer = line.rstrip("\r").rpartition("\t")
        if not sep or answer.strip() not in ("Yes", "No", "yes", "no"):
            raise DataError(f"{txt}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
        pairs.append((question, answer.strip().capitalize()))
    if len(pairs) != 2:
        raise DataError(f"{txt}: an MME annotation file holds 2 questions, found {len(pairs)}")
    return pairs


def mme_root(data: Path) -> Path:
    """The folder whose children are the MME subtasks (``data`` itself or its release folder)."""
    known = set(PERCEPTION + COGNITION)
    for candidate in (data, data / "MME_Benchmark_release_version", data / "MME_Benchmark"):
        if candidate.is_dir() and any((candidate / t).is_dir() for t in known):
            return candidate
    raise DataError(f"{data}: no MME subtask folders ({', '.join(PERCEPTION + COGNITION)}) found here "
                    "or in MME_Benchmark_release_version/")


def read_mme_task(task_dir: Path, task: str | None = None) -> list[Sample]:
    """Both questions of every image of one subtask folder (layout auto-detected), sorted by stem."""
    task = task or task_dir.name
    layout = mme_layout(task_dir)
    ann_dir = task_dir / "questions_answers_YN" if layout == "split" else task_dir
    img_dir = task_dir / "images" if layout == "split" else task_dir
    if not ann_dir.is_dir():
        raise DataError(f"{task_dir}: split layout (has images/) but no questions_answers_YN/ folder")
    samples = []
    for txt in sorted(ann_dir.glob("*.txt")):
        image = find_image(img_dir, txt.stem)
        if image is None:
            raise DataError(f"{txt}: no image {img_dir / txt.stem}.{{jpg,png}} for this annotation file")
        for k, (question, answer) in enumerate(read_mme_pairs(txt)):
            samples.append(Sample(id=f"{task}/{txt.stem}/{k}", task="mme", image=str(image), question=question,
                                  answers=[answer], subtask=task, extra={"image_name": image.name}))
    if not samples:
        raise DataError(f"{task_dir}: no annotation .txt files ({layout} layout)")
    return samples


def read_mme(data: str | Path) -> list[Sample]:
    """Every MME subtask present under ``data`` (perception then cognition order)."""
    root = mme_root(Path(data))
    samples = []
    for task in PERCEPTION + COGNITION:
        if (root / task).is_dir():
            samples += read_mme_task(root / task, task)
    return samples


# ---- generic annotation files -----------------------------------------------------------------------
def read_records(folder: Path) -> list[dict]:
    """``annotations.json`` (list) or ``annotations.jsonl`` of ``folder``."""
    json_path, jsonl_path = folder / "annotations.json", folder / "annotations.jsonl"
    if json_path.is_file():
        try:
            records = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{json_path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise DataError(f"{json_path}: expected a JSON list of records")
        return records
    if jsonl_path.is_file():
        records = []
        for number, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{jsonl_path}:{number}: not valid JSON ({e})") from None
        return records
    raise DataError(f"{folder}: no annotations.json or annotations.jsonl")


def _field(record: dict, names: tuple[str, ...], where: str) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise DataError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")


def _strings(value: Any, where: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: expected a string or a non-empty list of strings, got {value!r}")
    return values


def read_annotations(task: str, data: str | Path) -> list[Sample]:
    """Samples of ``task`` (ocr, vqa, caption, kie, visdial) from ``data``'s annotation file."""
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    samples = []
    for index, record in enumerate(read_records(folder)):
        where = f"{folder} record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object")
        image = folder / str(_field(record, ("image",), where))
        if not image.is_file():
            raise DataError(f"{where}: image not found: {image}")
        sample = Sample(id=str(record.get("id", index)), task=task, image=str(image))
        if task == "ocr":
            sample.answers = _strings(_field(record, ("text", "answer", "answers"), where), where)
        elif task == "vqa":
            sample.question = str(_field(record, ("question",), where))
            sample.answers = _strings(_field(record, ("answers", "answer"), where), where)
            if "options" in record:
                sample.options = _strings(record["options"], where)
            if "caption" in record:
                sample.extra["caption"] = str(record["caption"])
        elif task == "caption":
            sample.answers = _strings(_field(record, ("references", "captions", "caption"), where), where)
        elif task == "kie":
            sample.question = str(_field(record, ("question",), where))
            sample.answers = _strings(_field(record, ("answer", "answers"), where), where)[:1]
        elif task == "visdial":
            sample.question = str(_field(record, ("question",), where))
            sample.options = _strings(_field(record, ("answer_options", "options"), where), where)
            if "answer" in record:
                sample.answers = _strings(record["answer"], where)
        else:
            raise DataError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
        samples.append(sample)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{folder}: sample ids are not unique")
    return samples


# ---- easy-VQA (PyPI) --------------------------------------------------------------------------------
def easy_vqa_split(split: str = "test") -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """``([(question, answer, image_id)], {image_id: png path})`` of the installed ``easy-vqa`` package."""
    try:
        import easy_vqa  # an optional package, needed only for this data set
    except ImportError:
        raise DataError("the easy-vqa data needs the PyPI package easy-vqa (pip install easy-vqa==1.0)") from None
    if split not in ("test", "train"):
        raise DataError(f"easy-vqa has splits test and train, not {split!r}")
    texts, answers, ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    return list(zip(texts, answers, ids)), paths


def mme_question(question: str) -> str:
    """An easy-VQA yes/no question in MME's phrasing: ``is there a circle?`` ->
    ``Is there a circle? Please answer yes or no.``"""
    return f"{question[0].upper()}{question[1:]} {MME_SUFFIX}"


def read_easy_vqa(task: str, split: str = "test") -> list[Sample]:
    """easy-VQA questions as VQA samples, or (``task="mme"``) as MME-style yes/no pairs."""
    questions, paths = easy_vqa_split(split)
    if task == "vqa":
        return [Sample(id=f"{split}/{i}", task="vqa", image=paths[image_id], question=q, answers=[a],
                       extra={"image_id": image_id})
                for i, (q, a, image_id) in enumerate(questions)]
    if task != "mme":
        raise DataError(f"easy-vqa provides the vqa and mme tasks, not {task!r}")
    first: dict[int, dict[str, str]] = {}
    for q, a, image_id in questions:
        if a in ("yes", "no"):
            first.setdefault(image_id, {}).setdefault(a, q)
    samples = []
    for image_id in sorted(first):
        pair = first[image_id]
        if "yes" not in pair or "no" not in pair:
            continue
        for k, answer in enumerate(("yes", "no")):
            question = mme_question(pair[answer])
            samples.append(Sample(id=f"easyvqa/{image_id}/{k}", task="mme", image=paths[image_id], question=question,
                                  answers=[answer.capitalize()], subtask="easyvqa", extra={"image_name": f"{image_id}.png"}))
    return samples


def read_task(task: str, data: str | Path, limit: int | None = None) -> list[Sample]:
    """The samples of ``task`` from ``data`` (a folder, or ``easy-vqa[:split]``); the first ``limit`` only
    (whole MME image pairs: an odd limit is rounded down)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    spec = str(data)
    if spec == EASY_VQA or spec.startswith(EASY_VQA + ":"):
        samples = read_easy_vqa(task, spec.partition(":")[2] or "test")
    elif task == "mme":
        samples = read_mme(data)
    else:
        samples = read_annotations(task, data)
    if limit is not None:
        samples = samples[: (limit - limit % 2) if task == "mme" else limit]
    return samples
