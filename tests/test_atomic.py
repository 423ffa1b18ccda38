"""Atomic writes: the target appears whole or not at all, with the permissions a plain open() gives."""

from __future__ import annotations

import os
import stat

import pytest

from ibllm.atomic import atomic_write, write_bytes_atomic, write_text_atomic


def test_written_files_get_umask_permissions_and_no_temporaries(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "sub" / "a.json", '{"x": 1}\n')
        binary = write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert path.read_text() == '{"x": 1}\n' and binary.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 == stat.S_IMODE(binary.stat().st_mode)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "b.bin"]


def test_a_failing_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half_written(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_written)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
