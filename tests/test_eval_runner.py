"""``python -m ibllm evaluate`` end to end on a tiny model saved by the test: answers file, report,
resume, the MME official-format files, 2-process CPU evaluation (subprocess) == 1 process, and the
training callback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm import tuning
from ibllm.build import build_model
from ibllm.cli import evaluate
from ibllm.evaluation import runner

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """Stage-1 + stage-2 trainables of a tiny model (open gates, random bind network), saved as a flat file."""
    model = build_model("tiny", "finetune", imagebind="tiny", seed=1)
    state = {**tuning.trainable_state_dict(model, "pretrain"), **tuning.trainable_state_dict(model, "finetune")}
    gen = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith(".gate"):
            state[key] = torch.full_like(value, 3.0)
        elif "prefix_query" in key or "image_bind_proj" in key:
            state[key] = torch.randn(value.shape, generator=gen) * 2
    path = tmp_path_factory.mktemp("adapter") / "adapter.pt"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def ocr_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ocr")
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "text": "red"})
    (folder / "annotations.json").write_text(json.dumps(records))
    return str(folder)


def model_args(adapter, sp_model) -> list[str]:
    return ["--checkpoint", adapter, "--llm", "tiny", "--imagebind", "tiny", "--tokenizer", sp_model,
            "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "2", "--accelerator", "cpu"]


# Sampling at temperature 1 with one sample per batch: each answer comes from a generator seeded by its
# sample id, so answers differ between samples yet do not depend on how the samples are split over ranks.
SAMPLED = ["--temperature", "1.0", "--batch-size", "1"]


def answers_of(out: Path) -> dict[str, str]:
    return {row["id"]: row["answer"] for row in json.loads((out / "answers.json").read_text())["answers"]}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, adapter, sp_model, ocr_data) -> Path:
    out = tmp_path_factory.mktemp("single")
    evaluate.main(["--task", "ocr", "--data", ocr_data, "--out", str(out), "--dataset", "IIIT5K", *model_args(adapter, sp_model), *SAMPLED])
    return out


def test_evaluate_writes_answers_metrics_and_paper_table(single_run, capsys):
    answers = answers_of(single_run)
    assert list(answers) == ["0", "1", "2", "3", "4"]
    assert len(set(answers.values())) > 1, answers  # the image matters, so the 2-process comparison means something
    assert not list(single_run.glob("answers.rank*.jsonl"))  # gathered and removed
    metrics = json.loads((single_run / "metrics.json").read_text())
    assert set(metrics) == {"accuracy"}
    table = (single_run / "results.md").read_text()
    assert "| accuracy |" in table and "13.90" in table  # the paper's IIIT5K number beside ours
    settings = json.loads((single_run / "answers.json").read_text())["settings"]
    assert settings["temperature"] == 1.0 and settings["top_p"] == 0.75 and settings["max_seq_len"] == 256


def test_resume_answers_only_what_is_missing(tmp_path, single_run, adapter, sp_model, ocr_data, capsys):
    full = json.loads((single_run / "answers.json").read_text())
    partial = dict(full, answers=full["answers"][:2])
    (tmp_path / "answers.json").write_text(json.dumps(partial))
    # an interrupted rank file (its last line cut) from the previous run
    row = full["answers"][2]
    (tmp_path / "answers.rank1.jsonl").write_text(json.dumps({"id": row["id"], "answer": row["answer"]}) + '\n{"id": "3", "ans')
    capsys.readouterr()
    evaluate.main(["--task", "ocr", "--data", ocr_data, "--out", str(tmp_path), *model_args(adapter, sp_model), *SAMPLED])
    assert "5 samples, 3 already answered" in capsys.readouterr().out
    assert (tmp_path / "answers.json").read_text() == (single_run / "answers.json").read_text()
    # everything answered: the next run only scores
    evaluate.main(["--task", "ocr", "--data", ocr_data, "--out", str(tmp_path), *model_args(adapter, sp_model), *SAMPLED])
    assert "5 already answered" in capsys.readouterr().out


@pytest.mark.system
def test_two_cpu_processes_give_the_same_answers_file(tmp_path, single_run, adapter, sp_model, ocr_data, run_ibllm,
                                                      cli_env):
    args = ["evaluate", "--task", "ocr", "--data", ocr_data, "--out", str(tmp_path), "--dataset", "IIIT5K",
            *model_args(adapter, sp_model), *SAMPLED, "--devices", "2"]
    proc = run_ibllm(args, REPO, env=cli_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ocr_accuracy: ")
    assert (tmp_path / "answers.json").read_text() == (single_run / "answers.json").read_text()


def test_mme_evaluation_writes_official_files_scored_identically(tmp_path, adapter, sp_model, capsys):
    from test_eval_readers import write_mme

    write_mme(tmp_path / "data")
    out = tmp_path / "out"
    evaluate.main(["--task", "mme", "--data", str(tmp_path / "data"), "--out", str(out), *model_args(adapter, sp_model)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith("mme_perception: ") and printed[-1].startswith("mme_cognition: ")
    assert sorted(p.name for p in (out / "mme_results").iterdir()) == ["code_reasoning.txt", "existence.txt"]
    first = (out / "mme_results" / "existence.txt").read_text().splitlines()[0].split("\t")
    assert first[:3] == ["a.jpg", "Is there a a? Please answer yes or no.", "Yes"]
    from ibllm.cli import main

    main(["score", "mme", str(out / "mme_results")])
    assert capsys.readouterr().out.strip().splitlines()[-2:] == printed[-2:]


def test_bgr_option_reverses_channels(tmp_path):
    Image.fromarray(np.array([[[255, 0, 0]]], dtype=np.uint8)).resize((8, 8)).save(tmp_path / "red.png")
    rgb = runner.load_eval_image(str(tmp_path / "red.png"), bgr=False, size=8)
    bgr = runner.load_eval_image(str(tmp_path / "red.png"), bgr=True, size=8)
    blue = Image.fromarray(np.array([[[0, 0, 255]]], dtype=np.uint8)).resize((8, 8))
    assert torch.allclose(bgr, runner.load_eval_image(blue, size=8)) and not torch.allclose(rgb, bgr)


def test_callback_logs_eval_metrics_to_tensorboard(tmp_path, sp_model, instruction_files):
    import lightning as L

    from callbacks.evaluation import EvaluationCallback
    from datamodules import InstructionData
    from ibllm.lit import FinetuneModule

    root = Path(instruction_files["root"])
    (root / "annotations.json").write_text(json.dumps([{"image": "img.png", "question": "What colour?", "answers": "red"}] * 3))
    callback = EvaluationCallback(task="vqa", data=str(root), every_n_steps=1, limit=2, max_new_tokens=4)
    module = FinetuneModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", lr=1e-3)
    data = InstructionData(train_files=instruction_files["llava"], tokenizer=sp_model, batch_size=2, num_workers=0,
                           max_words=160)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, default_root_dir=str(tmp_path),
                        logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    assert [step for step, _ in callback.history] == [1, 2]
    assert set(callback.history[0][1]) == {"accuracy"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "eval/vqa/accuracy" in events.Tags()["scalars"]


def test_answers_of_another_evaluation_are_refused_or_discarded(tmp_path, single_run, adapter, sp_model, ocr_data,
                                                                 capsys):
    import shutil

    for name in ("answers.json", "run.json"):
        shutil.copy(single_run / name, tmp_path / name)
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["checkpoint"] == adapter and len(recorded["checkpoint_sha256"]) == 64
    greedy = ["--task", "ocr", "--data", ocr_data, "--out", str(tmp_path), *model_args(adapter, sp_model)]
    with pytest.raises(SystemExit, match=r"another evaluation \(differs in: settings\).*--restart"):
        evaluate.main(greedy)  # temperature 0 instead of the recorded sampled run
    assert (tmp_path / "answers.json").read_text() == (single_run / "answers.json").read_text()
    capsys.readouterr()
    evaluate.main([*greedy, "--restart"])
    out = capsys.readouterr().out
    assert "discarding the answers" in out and "5 samples, 0 already answered" in out
    assert json.loads((tmp_path / "answers.json").read_text())["settings"]["temperature"] == 0.0
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["temperature"] == 0.0
