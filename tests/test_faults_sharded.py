"""No code runs from a sharded (FSDP2 / torch.distributed.checkpoint) checkpoint folder.

A real 2-process FSDP2 run (gloo, tests/dist_train.py as a subprocess) writes ``last.ckpt/``; copies of it are
tampered three ways with a ``__reduce__`` payload that would create a marker file: Lightning's ``meta.pt``, the
DCP ``.metadata`` index, and an object stored inside a ``.distcp`` data file behind a clean index. Resuming
(``fit --ckpt_path`` under FSDP2) and consolidating must refuse each with an error naming the file, and the
marker must never appear.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibllm.checkpoints.consolidate import read_sharded_checkpoint
from ibllm.checkpoints.sharded import load_dcp_metadata
from ibllm.files import CheckpointError

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "dist_train.py"
FSDP = ("--strategy", "fsdp", "--devices", "2", "--stage", "pretrain", "--rows", "4", "--global-batch", "4",
        "--steps", "3")


class Payload:
    """Unpickling this runs code that creates ``marker`` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def run_fsdp(tmp: Path, name: str, cli_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "--root", str(tmp / name), "--out", str(tmp / f"{name}.pt"),
                           *FSDP, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory, cli_env) -> Path:
    """``last.ckpt/`` of a 2-step FSDP2 run (2 gloo processes)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    result = run_fsdp(tmp, "run", cli_env, "--stop-at", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ckpt = tmp / "run" / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    return ckpt


def tampered_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.system
def test_meta_pt_payload_is_refused_on_fsdp2_resume(tmp_path, sharded_ckpt, cli_env):
    ckpt = tampered_copy(sharded_ckpt, tmp_path / "meta" / "last.ckpt")
    marker = tmp_path / "MARKER"
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    torch.save({**meta, "payload": Payload(marker)}, ckpt / "meta.pt")
    result = run_fsdp(tmp_path, "resume", cli_env, "--resume", str(ckpt))
    assert result.returncode != 0
    assert not marker.exists(), "unpickling meta.pt ran code"
    assert str(ckpt / "meta.pt") in result.stderr and "refusing" in result.stderr
    with pytest.raises(CheckpointError, match="meta.pt"):
        read_sharded_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.system
def test_dcp_index_payload_is_refused_by_consolidate_and_resume(tmp_path, sharded_ckpt, run_ibllm, cli_env):
    ckpt = tampered_copy(sharded_ckpt, tmp_path / "index" / "last.ckpt")
    marker = tmp_path / "MARKER"
    metadata = load_dcp_metadata(ckpt / ".metadata")
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump([Payload(marker), metadata], f)
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        read_sharded_checkpoint(ckpt)
    result = run_ibllm(["consolidate", str(ckpt), "--out", str(tmp_path / "adapter.pth")])
    assert result.returncode != 0 and not (tmp_path / "adapter.pth").exists()
    last_line = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1]
    assert str(ckpt / ".metadata") in last_line and "refusing" in last_line
    result = run_fsdp(tmp_path, "resume", cli_env, "--resume", str(ckpt))
    assert result.returncode != 0 and str(ckpt / ".metadata") in result.stderr
    assert not marker.exists(), "unpickling .metadata ran code"


def payload_behind_clean_index(ckpt: Path, marker: Path) -> tuple[Path, int]:
    """Append a pickled payload to a ``.distcp`` file and point a stored (non-tensor) optimizer entry at it,
    rewriting ``.metadata`` with DCP's own classes only. Returns the data file and the payload's offset."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = load_dcp_metadata(ckpt / ".metadata")
    key = next(k for k, m in metadata.state_dict_metadata.items()
               if k.startswith("optimizer_0.param_groups") and isinstance(m, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if isinstance(i, MetadataIndex) and i.fqn == key)
    info = metadata.storage_data[index]
    data_file = ckpt / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as f:
        torch.save(Payload(marker), f)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=data_file.stat().st_size - offset)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return data_file, offset


@pytest.mark.system
def test_payload_inside_distcp_is_refused_on_fsdp2_resume(tmp_path, sharded_ckpt, cli_env):
    ckpt = tampered_copy(sharded_ckpt, tmp_path / "data" / "last.ckpt")
    marker = tmp_path / "MARKER"
    data_file, offset = payload_behind_clean_index(ckpt, marker)
    load_dcp_metadata(ckpt / ".metadata")  # the index itself is clean
    result = run_fsdp(tmp_path, "resume", cli_env, "--resume", str(ckpt))
    assert result.returncode != 0
    assert not marker.exists(), "an object stored in the .distcp file ran code"
    assert str(data_file) in result.stderr and "refusing" in result.stderr
    # control: the stored object is live; read as torch's default planner reads it (weights_only=False) it runs
    torch.load(io.BytesIO(data_file.read_bytes()[offset:]), weights_only=False)
    assert marker.exists()
