"""Evaluation readers on tiny fixtures in every documented on-disk format, and the paper's prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ibllm.evaluation.prompts import EvalSettings, build_prompt, instruction
from ibllm.evaluation.readers import DataError, Sample, mme_layout, read_task


def png(path, value=0, ext="png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path, format="PNG" if ext == "png" else "JPEG")
    return path


def write_mme(root, layout="split"):
    """existence (split layout, .jpg) and code_reasoning (flat layout, .png) under the release folder."""
    release = root / "MME_Benchmark_release_version"
    ex = release / "existence"
    for stem in ("b", "a"):
        png(ex / "images" / f"{stem}.jpg", ext="jpg")
        (ex / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (ex / "questions_answers_YN" / f"{stem}.txt").write_text(
            f"Is there a {stem}? Please answer yes or no.\tYes\nIs there no {stem}?  Please answer yes or no.\tNo\n")
    code = release / "code_reasoning"
    png(code / "0001.png")
    (code / "0001.txt").write_text("Does it print 3? Please answer yes or no.\tYes\nDoes it print 4? Please answer yes or no.\tNo")
    return release


def test_mme_layouts_auto_detected(tmp_path):
    release = write_mme(tmp_path)
    assert mme_layout(release / "existence") == "split" and mme_layout(release / "code_reasoning") == "flat"
    for data in (tmp_path, release):  # the release folder or the folder holding it
        samples = read_task("mme", data)
        assert [s.id for s in samples] == ["existence/a/0", "existence/a/1", "existence/b/0", "existence/b/1",
                                           "code_reasoning/0001/0", "code_reasoning/0001/1"]
    s = samples[1]
    assert s.answers == ["No"] and s.subtask == "existence" and s.image.endswith("images/a.jpg")
    assert s.question == "Is there no a?  Please answer yes or no."  # double space kept
    assert samples[4].image.endswith("code_reasoning/0001.png")
    assert len(read_task("mme", tmp_path, limit=3)) == 2  # whole image pairs only


def test_mme_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no MME subtask folders"):
        read_task("mme", tmp_path)
    release = write_mme(tmp_path)
    (release / "code_reasoning" / "0001.txt").write_text("just one line\tYes\n")
    with pytest.raises(DataError, match=r"0001.txt: an MME annotation file holds 2 questions, found 1"):
        read_task("mme", tmp_path)
    (release / "code_reasoning" / "0001.txt").write_text("q\tMaybe\nq\tNo\n")
    with pytest.raises(DataError, match=r"0001.txt:1: expected"):
        read_task("mme", tmp_path)
    (release / "code_reasoning" / "0001.png").unlink()
    (release / "code_reasoning" / "0001.txt").write_text("q\tYes\nq\tNo\n")
    with pytest.raises(DataError, match="no image"):
        read_task("mme", tmp_path)


RECORDS = {
    "ocr": {"image": "i.png", "text": "STOP"},
    "vqa": {"image": "i.png", "question": "What colour?", "answers": ["red", "dark red"]},
    "caption": {"image": "i.png", "references": ["a red square", "red"]},
    "kie": {"image": "i.png", "question": "What is the total?", "answer": "12.00"},
    "visdial": {"image": "i.png", "question": "Is it red?", "answer_options": ["yes", "no"]},
}


@pytest.mark.parametrize("task", sorted(RECORDS))
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_annotation_formats(tmp_path, task, fmt):
    png(tmp_path / "i.png")
    records = [RECORDS[task], {**RECORDS[task], "id": "second"}]
    text = json.dumps(records) if fmt == "json" else "\n".join(json.dumps(r) for r in records)
    (tmp_path / f"annotations.{fmt}").write_text(text)
    samples = read_task(task, tmp_path)
    assert [s.id for s in samples] == ["0", "second"] and samples[0].task == task
    assert samples[0].image == str(tmp_path / "i.png")
    if task == "visdial":
        assert samples[0].options == ["yes", "no"]
    else:
        assert samples[0].answers  # the ground truth


def test_annotation_errors(tmp_path):
    with pytest.raises(DataError, match="no annotations.json"):
        read_task("vqa", tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps([{"image": "missing.png", "question": "q", "answers": "a"}]))
    with pytest.raises(DataError, match="record 0: image not found"):
        read_task("vqa", tmp_path)
    png(tmp_path / "i.png")
    (tmp_path / "annotations.json").write_text(json.dumps([{"image": "i.png", "question": "q"}]))
    with pytest.raises(DataError, match="record 0: missing field 'answers' / 'answer'"):
        read_task("vqa", tmp_path)
    (tmp_path / "annotations.jsonl").write_text("{not json")
    (tmp_path / "annotations.json").unlink()
    with pytest.raises(DataError, match="annotations.jsonl:1: not valid JSON"):
        read_task("vqa", tmp_path)


def test_easy_vqa_from_pypi():
    pytest.importorskip("easy_vqa", reason="easy-vqa (PyPI, in the dev extra) is not installed")
    vqa = read_task("vqa", "easy-vqa")
    assert len(vqa) == 9673 and vqa[0].question == "what is the red shape?" and vqa[0].answers == ["triangle"]
    pairs = read_task("mme", "easy-vqa")
    assert len(pairs) == 2 * 954  # images with both a yes and a no question
    assert [s.answers[0] for s in pairs[:2]] == ["Yes", "No"] and pairs[0].image == pairs[1].image
    assert all(s.question.endswith("Please answer yes or no.") for s in pairs)


def test_paper_prompts():
    def sample(task, **kw):
        return Sample(id="0", task=task, image="x.png", **kw)

    assert instruction(sample("ocr")) == "what is written in the image?"
    assert instruction(sample("caption")) == "what is described in the image?"
    assert instruction(sample("vqa", question="What colour?")) == "What colour?"
    assert instruction(sample("vqa", question="Which?", options=["A", "B"])) == "Question: Which?\nOptions: A B\n"
    assert instruction(sample("vqa", question="", extra={"caption": "The cat is left of the dog."})) == \
        "Question: Is the following caption right? The cat is left of the dog.\nOptions: No Yes\n"
    prompt = build_prompt(sample("mme", question="Is it red? Please answer yes or no."))
    assert prompt.startswith("Below is an instruction") and prompt.endswith(
        "### Instruction:\nIs it red? Please answer yes or no.\n\n### Response:")
    assert build_prompt(sample("ocr"), EvalSettings(template=False)) == "what is written in the image?"
    s = EvalSettings()
    assert (s.temperature, s.top_p, s.max_seq_len, s.bgr) == (0.1, 0.75, 256, False)
    assert s.new_tokens("caption") == 16 and s.new_tokens("vqa") == 256
    assert s.with_overrides(temperature=0.0, top_p=None).temperature == 0.0
