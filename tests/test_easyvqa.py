"""The easy-VQA demo on real data (the ``easy-vqa`` PyPI package, in the dev extra): labels read off the
questions, the stage-1 / stage-2 writers, the stage-0 binding task, and the whole `make eval` flow shortened
(tiny random LM, a few steps, a few test questions) through the real CLI and experiment files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ibllm.demos.easyvqa.data import (
    COLORS,
    SHAPES,
    balance_yes_no,
    class_index,
    image_attributes,
    question_facts,
    write_easyvqa_instructions,
    write_easyvqa_shards,
    yes_no_group,
)
from ibllm.evaluation.readers import easy_vqa_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("question, answer, facts", [
    ("what color is the triangle?", "blue", {"blue", "triangle"}),
    ("what shape is in the image?", "circle", {"circle"}),
    ("what is the teal shape?", "rectangle", {"teal", "rectangle"}),
    ("does the image contain a green shape?", "yes", {"green"}),
    ("is there a rectangle?", "no", set()),
    ("is there not a red shape?", "no", {"red"}),
    ("is there not a red shape in the image?", "yes", set()),
    ("is no circle present?", "no", {"circle"}),
    ("does the image not contain a gray shape?", "no", {"gray"}),
])
def test_question_facts(question, answer, facts):
    assert question_facts(question, answer) == facts


def test_image_attributes_need_one_colour_and_one_shape():
    questions = [
        ("what color is the shape?", "red", 1), ("is there a circle?", "yes", 1),  # complete
        ("what color is the shape?", "blue", 2),  # shape unknown
        ("is there a green shape?", "yes", 3), ("what color is the shape?", "teal", 3),  # contradictory
        ("what shape is present?", "triangle", 3),
    ]
    assert image_attributes(questions) == {1: ("red", "circle")}
    assert class_index("red", "circle") == 0 and class_index("yellow", "triangle") == 23


@pytest.mark.parametrize("split", ["train", "test"])
def test_derived_labels_answer_every_question_of_the_real_data(split):
    questions, _ = easy_vqa_split(split)
    labels = image_attributes(questions)
    assert len(labels) > 0.85 * len({i for _, _, i in questions})
    checked = 0
    for question, answer, image_id in questions:
        if image_id not in labels:
            continue
        color, shape = labels[image_id]
        named = [w for w in (*COLORS, *SHAPES) if re.search(rf"\b{w}\b", question)]
        if answer in ("yes", "no"):
            negated = bool(re.search(r"\b(not|no)\b", question))
            present = named[0] in (color, shape)
            assert answer == ("yes" if present != negated else "no"), (question, answer, labels[image_id])
        else:
            assert answer in (color, shape) and all(w in (color, shape) for w in named), (question, answer)
        checked += 1
    assert checked > 0.85 * len(questions)


def test_writers_are_idempotent_and_readable(tmp_path):
    import webdataset as wds

    from datamodules.instructions import load_records

    shards = write_easyvqa_shards(tmp_path / "shards", max_images=40, shard_size=16)
    assert shards.n_images == 40 and len(shards.paths) == 3
    rows = list(wds.WebDataset(shards.paths, shardshuffle=False, empty_check=False))
    assert len(rows) == 40
    for row in rows:
        meta = json.loads(row["json"])
        caption = row["txt"].decode()
        assert meta["color"] in caption and meta["shape"] in caption, caption
        assert row["png"][:8] == b"\x89PNG\r\n\x1a\n"

    made = write_easyvqa_instructions(tmp_path / "instructions", max_images=6, mme_style_fraction=0.5, balance=True)
    questions, _ = easy_vqa_split("train")
    kept = sorted({i for _, _, i in questions})[:6]
    assert made.n_questions == sum(i in kept for _, _, i in questions) and made.n_images == 6
    records = load_records(made.train)
    assert len(records) == made.n_items > made.n_questions and all(Path(r.image).is_file() for r in records)
    originals = json.loads(Path(made.train).read_text())[: made.n_questions]
    assert all("repeat" not in item["id"] for item in originals)
    mme = [r for r in records[: made.n_questions] if r.turns[0][0].endswith("Please answer yes or no.")]
    assert len(mme) == made.n_mme_style > 0
    assert all(r.turns[0][1] in ("yes", "no") and r.turns[0][0][0].isupper() for r in mme)
    # balanced: within each kind of yes/no question, as many yes as no answers
    counts: dict = {}
    for r in records:
        question, answer = r.turns[0]
        if answer in ("yes", "no"):
            group = yes_no_group(question.removesuffix(" Please answer yes or no."))
            counts.setdefault(group, {"yes": 0, "no": 0})[answer] += 1
    assert counts and all(c["yes"] == c["no"] for c in counts.values()), counts

    stamp = Path(made.train).stat().st_mtime_ns
    assert write_easyvqa_instructions(tmp_path / "instructions", max_images=6, mme_style_fraction=0.5,
                                      balance=True) == made
    assert Path(made.train).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="mme_style_fraction"):
        write_easyvqa_instructions(tmp_path / "other", mme_style_fraction=1.5)


def test_balance_repeats_the_rarer_answer_per_question_kind():
    import random

    rows = [("is there a red shape?", "no")] * 5 + [("is there a blue shape?", "yes")] * 2 + \
           [("is there not a circle?", "yes")] * 3 + [("is there not a triangle?", "no")] + [("what color?", "red")]
    items = [{"id": str(k), "q": q} for k, (q, _) in enumerate(rows)]
    out = balance_yes_no(items, [a for _, a in rows], [q for q, _ in rows], random.Random(0))
    assert out[: len(items)] == items
    extra = out[len(items):]
    # plain colour questions: 5 no vs 2 yes -> 3 more yes; negated shape questions: 3 yes vs 1 no -> 2 more no
    assert sorted(e["q"] for e in extra) == ["is there a blue shape?"] * 3 + ["is there not a triangle?"] * 2
    assert len({e["id"] for e in out}) == len(out)
    assert yes_no_group("Is no circle present?") == (True, "shape") and yes_no_group("is a red shape present?") == (False, "colour")


def test_binding_task_pairs_images_with_captions_of_their_class():
    from ibllm.demos.easyvqa.towers import ShapeBinding, load_split_images
    from ibllm.processing.clip_tokenizer import tokenize

    images, labels = load_split_images("train")
    task = ShapeBinding(images[:64], labels[:64], templates=("a {color} {shape}", "one {color} {shape}"))
    pixels, tokens, mask = task.train_batch(32, torch.Generator().manual_seed(0))
    assert pixels.shape == (32, 3, 224, 224)
    # the task's sampler draws its first epoch with randperm before anything else uses the generator
    batch_labels = labels[:64][torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32]]
    # Recover which class each caption names, then compare the mask with the image labels.
    prompts = {c: tokenize([f"a {c[0]} {c[1]}", f"one {c[0]} {c[1]}"]) for c in
               [(col, sh) for col in COLORS for sh in SHAPES]}
    caption_class = []
    for row in tokens:
        for (col, sh), toks in prompts.items():
            if any(torch.equal(row, t[: len(row)]) for t in toks):
                caption_class.append(class_index(col, sh))
                break
    assert len(caption_class) == len(tokens) == len(set(map(tuple, tokens.tolist())))
    assert mask.shape == (32, len(tokens)) and bool(mask.any(dim=1).all())
    # an image's positives are exactly the captions naming its own class
    for label, row in zip(batch_labels.tolist(), mask):
        assert {caption_class[j] for j in row.nonzero().flatten().tolist()} == {label}
        assert all(row[j] == (caption_class[j] == label) for j in range(len(tokens)))


def test_tiny_towers_learn_colour_from_the_real_images(tmp_path):
    from ibllm.demos.easyvqa.towers import EasyVQARecipe, build_easyvqa_encoder

    recipe = EasyVQARecipe(cfg="tiny", steps=30, batch_size=32, warmup=5, lr=3e-3)
    built = build_easyvqa_encoder(tmp_path / "enc.safetensors", recipe, progress=False)
    info = json.loads(built.info_path.read_text())
    assert built.trained and info["data"]["n_test_images"] > 800
    assert info["accuracy"]["test"]["color_acc"] > 0.5, info["accuracy"]  # chance: 1/8
    again = build_easyvqa_encoder(tmp_path / "enc.safetensors", recipe, progress=False)
    assert not again.trained and again.info == info


@pytest.mark.system
def test_make_eval_flow_shortened(tmp_path, sp_model, run_ibllm):
    """prepare -> stage 1 -> stage 2 -> evaluate, as `make eval` runs it (tiny LM, 3 steps, 12 questions)."""
    def run_cli(args: list[str], cwd: Path) -> str:
        return run_ibllm(args, cwd, check=True).stdout

    out = run_cli(["easyvqa", "prepare", "--stage0-steps", "3", "--quiet"], tmp_path)
    assert "easy-vqa encoder: data/easyvqa/encoder.safetensors (trained)" in out
    tiny = ["--model.init_args.llm", "tiny", "--model.init_args.tokenizer", sp_model, "--data.init_args.tokenizer",
            sp_model, "--data.init_args.num_workers", "0", "--trainer.max_steps", "3"]
    for stage in ("pretrain", "finetune"):
        run_cli(["fit", "--config", str(ROOT / f"experiments/easyvqa_{stage}.yaml"), *tiny], tmp_path)
        assert (tmp_path / f"runs/easyvqa_{stage}/checkpoints/last.ckpt").is_file()
    evaluate = ["easyvqa", "evaluate", "--llm", "tiny", "--tokenizer", sp_model, "--limit", "12", "--batch-size", "4",
                "--temperature", "0"]
    lines = run_cli(evaluate, tmp_path).strip().splitlines()
    assert re.fullmatch(r"easyvqa_accuracy: \d\.\d\d", lines[-2]), lines[-2:]
    assert re.fullmatch(r"easyvqa_mme_style_score: \d+\.\d\d", lines[-1]), lines[-2:]
    answers = json.loads((tmp_path / "eval/easyvqa/vqa/answers.json").read_text())["answers"]
    assert len(answers) == 12 and (tmp_path / "eval/easyvqa/mme/mme_results/easyvqa.txt").is_file()
    summary = json.loads((tmp_path / "eval/easyvqa/summary.json").read_text())
    assert sum(n for _, n in summary["by_answer_type"].values()) == 12
    assert f"{summary['easyvqa_accuracy']:.2f}" == lines[-2].split()[-1]
    # two processes (both tasks, one after the other) give the same answers files
    two = run_cli([*evaluate, "--devices", "2", "--out", "eval/two"], tmp_path).strip().splitlines()
    assert two[-2:] == lines[-2:]
    for task in ("vqa", "mme"):
        assert (tmp_path / f"eval/two/{task}/answers.json").read_text() == \
            (tmp_path / f"eval/easyvqa/{task}/answers.json").read_text()
    # a second run reuses the answers; a retrained checkpoint starts over
    assert "12 already answered" in run_cli(evaluate, tmp_path)
    run_cli(["fit", "--config", str(ROOT / "experiments/easyvqa_finetune.yaml"), *tiny[:-1], "6"], tmp_path)
    assert "discarding the answers of the previous evaluation" in run_cli(evaluate, tmp_path)
