"""Fault handling in one process: non-finite features and adapters, atomic checkpoint files and folders, the
clean-up of killed writes, resume choice and the resume command line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.captions import CaptionDecoder, SkipSample
from ibllm.build import build_model
from ibllm.checkpoints.adapters import load_trainable
from ibllm.checkpoints.io import save_atomic
from ibllm.checkpoints.lightning_io import (AtomicCheckpointIO, clean_partial_saves, hidden_sibling, replace_folder,
                                            save_file_atomic)
from ibllm.checkpoints.recovery import rank_checkpoints, reset_optimizer_state, resume_command
from ibllm.files import CheckpointError
from ibllm.tokenizer import load_tokenizer


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_a_single_inf_in_a_feature_is_a_bad_sample(sp_model):
    decoder = CaptionDecoder(load_tokenizer(sp_model), use_features=True)
    good = np.ones(8, dtype=np.float32)
    assert decoder.media({"__key__": "k", "npy": npy(good)}, None)["feature"].shape == (8,)
    for value in (np.inf, -np.inf, np.nan):
        bad = good.copy()
        bad[3] = value
        with pytest.raises(SkipSample) as info:
            decoder.media({"__key__": "k", "npy": npy(bad)}, None)
        assert info.value.reason == "bad_feature" and "non-finite" in str(info.value)


def test_an_adapter_with_non_finite_tensors_is_refused(tmp_path):
    model = build_model("tiny", "pretrain", "tiny", None, [], 0)
    state = {"llama.layers.0.attention.gate": torch.zeros_like(model.llama.layers[0].attention.gate)}
    save_atomic(state, tmp_path / "ok.safetensors")
    load_trainable(model, tmp_path / "ok.safetensors")
    state["llama.layers.0.attention.gate"][0] = float("nan")
    save_atomic(state, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: non-finite values .*attention\.gate"):
        load_trainable(model, tmp_path / "nan.safetensors")


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_checkpoint_files_are_written_beside_the_target(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "ckpt" / "last.ckpt"
    seen = []
    real_save = torch.save

    def spy(obj, f, *args, **kwargs):
        seen.append(Path(f.name))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, target)
    assert seen == [hidden_sibling(target, "tmp")]  # written in the target folder, under a hidden name
    assert torch.load(target, weights_only=True) == {"global_step": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert not list((tmp_path / "elsewhere").iterdir())
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "last.ckpt"
    save_file_atomic({"global_step": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_file_atomic({"global_step": 2, "x": Unpicklable()}, target)
    assert torch.load(target, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_folders_are_replaced_whole_and_leftovers_cleaned(tmp_path):
    final = tmp_path / "last.ckpt"
    final.mkdir()
    (final / "a").write_text("old")
    new = hidden_sibling(final, "tmp")
    new.mkdir()
    (new / "a").write_text("new")
    replace_folder(new, final)
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    pid = dead_pid()
    partial = hidden_sibling(tmp_path / "epoch=0-step=4.ckpt", "tmp", pid)
    partial.write_bytes(b"half")
    partial_dir = hidden_sibling(final, "tmp", pid)
    partial_dir.mkdir()
    live = hidden_sibling(tmp_path / "other.ckpt", "tmp", os.getpid())  # a writer still running: kept
    live.write_bytes(b"in progress")
    actions = clean_partial_saves(tmp_path)
    assert len(actions) == 2 and not partial.exists() and not partial_dir.exists() and live.exists()

    # killed between the two renames: the old folder is put back
    os.replace(final, hidden_sibling(final, "old", pid))
    actions = clean_partial_saves(tmp_path)
    assert (final / "a").read_text() == "new" and "restored" in actions[0]


def test_resume_ranks_by_steps_and_skips_unreadable_files(tmp_path):
    torch.save({"global_step": 4}, tmp_path / "last.ckpt")
    torch.save({"global_step": 2}, tmp_path / "interrupted.ckpt")
    (tmp_path / "last-v1.ckpt").write_bytes(b"\0" * 100)
    ranked, notes = rank_checkpoints([tmp_path / "interrupted.ckpt", tmp_path / "last.ckpt", tmp_path / "last-v1.ckpt"])
    assert [(s, p.name) for s, _, p in ranked] == [(4, "last.ckpt"), (2, "interrupted.ckpt")]
    assert len(notes) == 1 and "last-v1.ckpt" in notes[0]


def test_resume_command_replaces_earlier_values():
    argv = ["python", "-m", "ibllm", "fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt",
            "--model.init_args.lr=1", "--trainer.max_steps", "9"]
    assert resume_command("runs/x/last.ckpt", ["--model.init_args.lr", "0.1"], argv=argv) == (
        "python -m ibllm fit --config 'a b.yaml' --trainer.max_steps 9 --ckpt_path runs/x/last.ckpt "
        "--model.init_args.lr 0.1")


def test_reset_optimizer_state_keeps_the_schedule_position():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        param.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.state and opt.param_groups[0]["lr"] == pytest.approx(0.25)

    class Trainer:
        optimizers = [opt]
        lr_scheduler_configs = [type("C", (), {"scheduler": sched})()]

    reset_optimizer_state(Trainer(), 0.1)
    assert not opt.state and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
