"""The easy-VQA demo's data: the PyPI package ``easy-vqa`` (MIT; 64x64 images of one coloured shape).

The package ships questions and answers only; each image's colour and shape are read off its own questions
(:func:`image_attributes`: "what color is the shape?" -> teal, "is there not a circle?" -> no, ...). Images
whose questions reveal both become caption data:

* :func:`write_easyvqa_shards` — stage 1: WebDataset shards (``KEY.png`` + ``KEY.txt`` + ``KEY.json``) of
  the labelled *train* images with captions naming colour and shape;
* :func:`write_easyvqa_instructions` — stage 2: every *train* question as a one-turn LLaVA item (images
  copied under ``OUT/images``). A share of the yes/no questions is phrased the MME way (capitalised, then
  ``Please answer yes or no.``), the prompt form of the MME-style evaluation.

Test questions are never written: they are only read by the evaluation (``--data easy-vqa``). Both writers
are idempotent through a marker file holding their parameters.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds

from ibllm.atomic import write_text_atomic
from ibllm.demos.markers import read_marker, write_marker
from ibllm.evaluation.readers import easy_vqa_split, mme_question

COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
# The first template is the zero-shot prompt of the stage-0 evaluation.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape}",
    "a picture of a {color} {shape}",
    "a {color} {shape} on a light background",
    "a simple drawing of a {color} {shape}",
    "one {color} {shape}",
    "the image shows a {color} {shape}",
    "a {shape}, coloured {color}",
    "a {color} shape: a {shape}",
)
DONE_SHARDS = "done_shards.json"
DONE_INSTRUCTIONS = "done_instructions.json"

_COLOR_RE = re.compile(rf"\b({'|'.join(COLORS)})\b")
_SHAPE_RE = re.compile(rf"\b({'|'.join(SHAPES)})\b")
_NEGATION_RE = re.compile(r"\b(not|no)\b")


def question_facts(question: str, answer: str) -> set[str]:
    """Attributes (colours / shapes) that one question–answer pair says the image has.

    ``what color is the triangle? -> blue`` gives {blue, triangle}; ``is there not a red shape? -> no``
    gives {red}; a ``yes`` to a negated question, or a ``no`` to a plain one, gives nothing.
    """
    q = question.lower()
    named = {m.group(1) for m in _COLOR_RE.finditer(q)} | {m.group(1) for m in _SHAPE_RE.finditer(q)}
    if answer not in ("yes", "no"):
        return named | {answer}
    negated = bool(_NEGATION_RE.search(q))
    return named if (answer == "yes") != negated else set()


def image_attributes(questions: Iterable[tuple[str, str, int]]) -> dict[int, tuple[str, str]]:
    """``{image_id: (colour, shape)}`` for the images whose questions reveal both (one of each, unambiguous)."""
    facts: dict[int, set[str]] = {}
    for question, answer, image_id in questions:
        facts.setdefault(image_id, set()).update(question_facts(question, answer))
    labels = {}
    for image_id, known in facts.items():
        colors = [c for c in COLORS if c in known]
        shapes = [s for s in SHAPES if s in known]
        if len(colors) == 1 and len(shapes) == 1:
            labels[image_id] = (colors[0], shapes[0])
    return labels


def class_index(color: str, shape: str) -> int:
    """The 24-way class of a (colour, shape) pair: ``colour * 3 + shape``."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_captions(template: str) -> list[str]:
    """``template`` filled for the 24 classes, in :func:`class_index` order."""
    return [template.format(color=c, shape=s) for c in COLORS for s in SHAPES]


def shape_caption(color: str, shape: str, rng: random.Random) -> str:
    """A stage-1 caption (a random template, capitalised, with a full stop)."""
    text = rng.choice(CAPTION_TEMPLATES).format(color=color, shape=shape)
    return text[0].upper() + text[1:] + "."


def labelled_split(split: str) -> tuple[list[tuple[int, str, str]], dict[int, str]]:
    """``([(image_id, colour, shape)] sorted by id, {image_id: png path})`` of an easy-VQA split."""
    questions, paths = easy_vqa_split(split)
    labels = image_attributes(questions)
    return [(i, *labels[i]) for i in sorted(labels)], paths


@dataclass
class EasyVQAShards:
    """Where :func:`write_easyvqa_shards` put the stage-1 data."""

    paths: list[str] = field(default_factory=list)
    pattern: str = ""
    n_images: int = 0


def write_easyvqa_shards(out_dir: str | Path, seed: int = 0, shard_size: int = 1024,
                         max_images: int | None = None) -> EasyVQAShards:
    """Write the labelled easy-VQA train images (the first ``max_images``; None = all) as caption shards
    under ``out_dir/train`` (idempotent)."""
    out = Path(out_dir)
    params = {"kind": "easyvqa_shards", "seed": seed, "shard_size": shard_size, "max_images": max_images,
              "templates": list(CAPTION_TEMPLATES)}
    if (info := read_marker(out, DONE_SHARDS, params)) is not None:
        return EasyVQAShards(**info["result"])
    items, paths = labelled_split("train")
    items = items[:max_images]
    folder = out / "train"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    written = []
    for s, start in enumerate(range(0, len(items), shard_size)):
        path = folder / f"{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for image_id, color, shape in items[start:start + shard_size]:
                caption = shape_caption(color, shape, rng)
                sink.write({"__key__": f"{image_id:09d}", "png": Path(paths[image_id]).read_bytes(), "txt": caption,
                            "json": json.dumps({"image_id": image_id, "color": color, "shape": shape})})
        written.append(str(path))
    pattern = str(folder / (f"{{000000..{len(written) - 1:06d}}}.tar" if len(written) > 1 else "000000.tar"))
    result = EasyVQAShards(written, pattern, len(items))
    write_marker(out, DONE_SHARDS, params, asdict(result))
    return result


@dataclass
class EasyVQAInstructions:
    """Where :func:`write_easyvqa_instructions` put the stage-2 data."""

    train: str = ""
    n_items: int = 0
    n_questions: int = 0
    n_mme_style: int = 0
    n_images: int = 0


def yes_no_group(question: str) -> tuple[bool, str]:
    """``(negated, "colour" | "shape")`` of a yes/no question: the groups whose answer priors differ."""
    return bool(_NEGATION_RE.search(question.lower())), "colour" if _COLOR_RE.search(question.lower()) else "shape"


def balance_yes_no(items: list[dict], answers: list[str], questions: list[str], rng: random.Random) -> list[dict]:
    """``items`` plus repeats of the rarer answer's yes/no items, so that in every :func:`yes_no_group`
    yes and no are equally frequent (the minority repeated whole times, then a random remainder)."""
    groups: dict[tuple[bool, str], dict[str, list[dict]]] = {}
    for item, answer, question in zip(items, answers, questions):
        if answer in ("yes", "no"):
            groups.setdefault(yes_no_group(question), {"yes": [], "no": []})[answer].append(item)
    extra = []
    for by_answer in groups.values():
        few, many = sorted(by_answer.values(), key=len)
        if not few:
            continue
        missing = len(many) - len(few)
        repeats = few * (missing // len(few)) + rng.sample(few, missing % len(few))
        extra += [dict(item, id=f"{item['id']}-repeat{k}") for k, item in enumerate(repeats)]
    return items + extra


def write_easyvqa_instructions(out_dir: str | Path, seed: int = 0, mme_style_fraction: float = 0.25,
                               balance: bool = False, max_images: int | None = None) -> EasyVQAInstructions:
    """Every train question as a one-turn LLaVA item in ``out_dir/llava_train.json`` (idempotent).

    ``mme_style_fraction`` of the yes/no questions get the MME phrasing
    (:func:`ibllm.evaluation.readers.mme_question`); answers stay easy-VQA's own (``yes``, ``teal``, ...).
    ``balance`` repeats yes/no items until yes and no are equally frequent within each :func:`yes_no_group`.
    In the raw data "is there a red shape?" is "no" for 7 images in 8, and the demo's stage 2 answers such
    questions from the question alone; balanced, 400 steps do not get past chance on them (README).
    ``max_images`` keeps the first N images' questions.
    """
    if not 0.0 <= mme_style_fraction <= 1.0:
        raise ValueError(f"mme_style_fraction must be in [0, 1], got {mme_style_fraction}")
    out = Path(out_dir)
    params = {"kind": "easyvqa_instructions", "seed": seed, "mme_style_fraction": mme_style_fraction,
              "balance": balance, "max_images": max_images}
    if (info := read_marker(out, DONE_INSTRUCTIONS, params)) is not None:
        return EasyVQAInstructions(**info["result"])
    questions, paths = easy_vqa_split("train")
    keep = set(sorted(paths)[:max_images]) if max_images is not None else set(paths)
    shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True)
    for image_id in sorted(keep):
        shutil.copyfile(paths[image_id], out / "images" / f"{image_id}.png")
    rng = random.Random(seed)
    items, answers, texts, n_mme = [], [], [], 0
    for k, (question, answer, image_id) in enumerate(questions):
        if image_id not in keep:
            continue
        texts.append(question)
        if answer in ("yes", "no") and rng.random() < mme_style_fraction:
            question, n_mme = mme_question(question), n_mme + 1
        items.append({"id": f"easyvqa-train-{k}", "image": f"images/{image_id}.png",
                      "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                        {"from": "gpt", "value": answer}]})
        answers.append(answer)
    n_questions = len(items)
    if balance:
        items = balance_yes_no(items, answers, texts, rng)
    path = out / "llava_train.json"
    write_text_atomic(path, json.dumps(items, indent=0))
    result = EasyVQAInstructions(str(path), len(items), n_questions, n_mme, len(keep))
    write_marker(out, DONE_INSTRUCTIONS, params, asdict(result))
    return result
