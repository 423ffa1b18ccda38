"""MME scoring, as the benchmark's official eval tool does it.

Answer parsing (:func:`parse_yes_no`): the response is lowercased; exactly ``yes`` / ``no`` is taken as
is; otherwise ``yes`` found in its first 4 characters means yes, else ``no`` found there means no, else
the answer is ``other`` (always wrong). So ``"Yes."`` -> yes, ``"yes, it is"`` -> yes, ``"nope"`` -> no,
``"Not sure"`` -> no, ``"I think yes"`` -> other.

Per subtask: ``acc`` = fraction of questions right; ``acc+`` = fraction of images whose two questions
(consecutive lines) are both right; score = 100 x (acc + acc+) (max 200). Perception = sum over the 10
perception subtasks (max 2000), Cognition = sum over the 4 cognition subtasks (max 800).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ibllm.atomic import write_text_atomic

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORIES = {"perception": PERCEPTION, "cognition": COGNITION}

# The paper's ImageBind-LLM MME scores (Tables 3/4).
PAPER_MME = {"existence": 128.33, "count": 60.00, "position": 46.67, "color": 73.33, "posters": 64.97,
             "celebrity": 76.47, "scene": 113.25, "landmark": 62.00, "artwork": 70.75, "OCR": 80.00,
             "commonsense_reasoning": 48.57, "numerical_calculation": 55.00, "text_translation": 50.00,
             "code_reasoning": 60.00, "perception": 775.77, "cognition": 213.57}


def parse_yes_no(response: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` for a model response (the official rule, see the module doc)."""
    text = response.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass
class MMERow:
    """One line of an official results file: ``image<TAB>question<TAB>gt<TAB>response``."""

    image: str
    question: str
    gt: str
    response: str

    def correct(self) -> bool:
        """Whether the parsed response equals the (lowercased) ground truth."""
        return parse_yes_no(self.response) == self.gt.strip().lower()


@dataclass
class SubtaskScore:
    """acc, acc+ (fractions) and the subtask score 100 x (acc + acc+)."""

    acc: float
    acc_plus: float
    questions: int
    images: int

    @property
    def score(self) -> float:
        return 100.0 * (self.acc + self.acc_plus)


def score_rows(rows: Sequence[MMERow], source: str = "<rows>") -> SubtaskScore:
    """Score one subtask; rows come in consecutive pairs, the two questions of one image."""
    if not rows:
        raise ValueError(f"{source}: no answers to score")
    if len(rows) % 2:
        raise ValueError(f"{source}: {len(rows)} lines; MME needs the two questions of each image on consecutive lines")
    right = [row.correct() for row in rows]
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    for a, b in pairs:
        if a.image != b.image:
            raise ValueError(f"{source}: consecutive lines are about different images ({a.image!r}, {b.image!r}); "
                             "the two questions of an image must be adjacent")
    both = [right[i] and right[i + 1] for i in range(0, len(rows), 2)]
    return SubtaskScore(acc=sum(right) / len(right), acc_plus=sum(both) / len(both), questions=len(rows),
                        images=len(pairs))


def format_row(image: str, question: str, gt: str, response: str) -> str:
    """One results-file line; tabs and newlines inside fields become spaces (they would break the format)."""
    clean = [re.sub(r"[\t\r\n]", " ", str(field)) for field in (image, question, gt, response)]
    return "\t".join(clean)


def read_results_file(path: str | Path) -> list[MMERow]:
    """Rows of an official-format ``<task>.txt`` (blank lines skipped)."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            raise ValueError(f"{path}:{number}: expected image<TAB>question<TAB>gt<TAB>response, "
                             f"got {len(fields)} field(s)")
        rows.append(MMERow(fields[0], fields[1], fields[2], "\t".join(fields[3:])))
    return rows


def write_results_files(rows_by_task: dict[str, Iterable[tuple[str, str, str, str]]], folder: str | Path) -> list[Path]:
    """Write one official-format ``<task>.txt`` per subtask (atomically); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, rows in rows_by_task.items():
        text = "".join(format_row(*row) + "\n" for row in rows)
        write_text_atomic(folder / f"{task}.txt", text)
        paths.append(folder / f"{task}.txt")
    return paths


def score_tasks(rows_by_task: dict[str, Sequence[MMERow]]) -> dict[str, SubtaskScore]:
    """:func:`score_rows` per subtask."""
    return {task: score_rows(rows, task) for task, rows in rows_by_task.items()}


def category_totals(scores: dict[str, SubtaskScore]) -> dict[str, float]:
    """``{"perception": sum, "cognition": sum}`` over the subtasks present."""
    return {name: sum(scores[t].score for t in tasks if t in scores) for name, tasks in CATEGORIES.items()}


def score_results_dir(folder: str | Path) -> tuple[dict[str, SubtaskScore], dict[str, float], list[str]]:
    """Score every ``<task>.txt`` of a results folder: (per-subtask scores, category totals, missing subtasks)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MME results folder not found: {folder}")
    files = {p.stem: p for p in sorted(folder.glob("*.txt"))}
    known = [t for t in PERCEPTION + COGNITION if t in files]
    extra = [t for t in files if t not in PERCEPTION + COGNITION]
    if not known and not extra:
        raise FileNotFoundError(f"{folder}: no <task>.txt results files")
    scores = {t: score_rows(read_results_file(files[t]), str(files[t])) for t in known + extra}
    missing = [t for t in PERCEPTION + COGNITION if t not in files]
    return scores, category_totals(scores), missing


def report_lines(scores: dict[str, SubtaskScore], totals: dict[str, float]) -> list[str]:
    """Human-readable per-subtask lines, then (last) ``mme_perception: X`` and ``mme_cognition: Y``."""
    lines = []
    for name, tasks in (*CATEGORIES.items(), ("other", tuple(t for t in scores if t not in PERCEPTION + COGNITION))):
        present = [t for t in tasks if t in scores]
        if not present:
            continue
        lines.append(f"=== {name} ===")
        for t in present:
            s = scores[t]
            lines.append(f"{t:<24} score {s.score:7.2f}   acc {100 * s.acc:6.2f}   acc+ {100 * s.acc_plus:6.2f}"
                         f"   ({s.questions} questions, {s.images} images)")
    lines.append(f"mme_perception: {totals['perception']:.2f}")
    lines.append(f"mme_cognition: {totals['cognition']:.2f}")
    return lines
