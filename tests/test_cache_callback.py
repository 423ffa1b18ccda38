"""The visual cache built by the fit (callbacks.cache_builder.CacheBuilder): inside a real ``Trainer.fit`` with 2
gloo processes (tests/dist_cache_fit.py as a subprocess) it equals a one-process build; it is built only when
training finished, never after Ctrl-C, SIGTERM, a non-finite loss or a preemption / early stop."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

from callbacks.cache_builder import CacheBuilder, unfinished_reason
from dist_train import Data
from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import make_factory
from ibllm.checkpoints import save_atomic
from ibllm.lit import PretrainModule
from ibllm.models.imagebind import build_imagebind

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Three shards of 3, 2 and 4 random PNGs (uneven over 2 ranks) and a tiny vision tower file."""
    root = tmp_path_factory.mktemp("cache_fit")
    rng = np.random.default_rng(1)
    for s, count in enumerate((3, 2, 4)):
        with wds.TarWriter(str(root / f"{s:06d}.tar")) as sink:
            for i in range(count):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"{s}_{i:03d}", "png": buf.getvalue(), "txt": "an image"})
    torch.manual_seed(3)
    weights = root / "vision.safetensors"
    save_atomic(build_imagebind("tiny", ["vision"]).state_dict(), weights)
    return {"root": str(root), "pattern": str(root / "{000000..000002}.tar"), "weights": str(weights)}


def index_vectors(folder: Path) -> tuple[list[str], np.ndarray, dict]:
    index = faiss.read_index(str(folder / "knn.index"))
    meta = json.loads((folder / "cache.json").read_text())
    return (folder / "ids.txt").read_text().split(), index.reconstruct_n(0, index.ntotal), meta


@pytest.mark.system  # two training processes
def test_two_process_fit_builds_the_same_cache_as_one_process(images, tmp_path, cli_env):
    out = tmp_path / "fit_cache"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist_cache_fit.py"), "--devices", "2",
                           "--root", str(tmp_path / "run"), "--shards", images["pattern"], "--weights",
                           images["weights"], "--out", str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: step 2, encoded 2 of 2 shards" in proc.stdout  # shards 0 and 2
    assert "rank 1: step 2, encoded 1 of 1 shards" in proc.stdout  # shard 1

    single = tmp_path / "single"
    factory = make_factory("tiny", images["weights"], 3, "cpu", "fp32", 1)
    build_cache_from_shards(images["pattern"], single, factory, show_progress=False)
    ids, vectors, meta = index_vectors(out)
    ids1, vectors1, meta1 = index_vectors(single)
    assert ids == ids1 and len(ids) == 9
    np.testing.assert_allclose(vectors, vectors1, atol=1e-6)
    for key in ("count", "dim", "metric", "index_type"):
        assert meta[key] == meta1[key], key
    assert meta["metric"] == "inner_product"
    assert meta["embedding_model"]["sha256"] == meta1["embedding_model"]["sha256"]


class StopAt(L.Callback):
    """At the end of global step ``step``: raise ``error``, or request a stop as the preemption callback does."""

    def __init__(self, step: int, error: BaseException | None) -> None:
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            if self.error is not None:
                raise self.error
            trainer.should_stop = True


class PoisonWeights(L.Callback):
    """From step 1 on, a NaN in the bind projection: the loss is no longer finite (the module stops)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == 1:
            with torch.no_grad():
                pl_module.model.image_bind_proj.weight.fill_(float("nan"))


def fit(tmp_path: Path, images: dict, extra: list, max_steps: int = 3) -> CacheBuilder:
    builder = CacheBuilder(images["pattern"], None, batch_size=3, workers=1, show_progress=False)
    module = PretrainModule(llm="tiny", imagebind="tiny", imagebind_weights=images["weights"], lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path), callbacks=[builder, *extra])
    trainer.fit(module, datamodule=Data(2, 16))
    return builder


def test_a_finished_fit_builds_its_cache_under_the_run(images, tmp_path):
    builder = fit(tmp_path, images, [], max_steps=2)
    assert builder.skipped is None and builder.result["index"]["count"] == 9
    assert (tmp_path / "cache" / "knn.index").is_file()  # out_dir None: <default_root_dir>/cache


@pytest.mark.parametrize("stop, raised", [
    (lambda: StopAt(1, KeyboardInterrupt()), SystemExit),  # Ctrl-C: Lightning shuts down and exits 1
    (lambda: StopAt(1, SIGTERMException()), SIGTERMException),
    (lambda: PoisonWeights(), FloatingPointError),
    (lambda: StopAt(1, None), None),  # a preemption requeue (or an early stop) before the last step
    (lambda: StopAt(3, None), None),  # ... at the last step: still a stop, not a finish
], ids=["ctrl-c", "sigterm", "nan", "preempted", "preempted-at-last-step"])
def test_no_cache_after_an_interrupted_fit(images, tmp_path, stop, raised):
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C; give it back
    try:
        if raised is None:
            builder = fit(tmp_path, images, [stop()])
            assert "stopped at global step" in builder.skipped and builder.result is None
        else:
            with pytest.raises(raised):
                fit(tmp_path, images, [stop()])
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert not (tmp_path / "cache").exists()


def test_unfinished_reason_reads_the_loop_limits():
    class Loop:
        class epoch_progress:
            class current:
                processed = 2

    class Trainer:
        interrupted, received_sigterm, should_stop = False, False, False
        global_step, max_steps, max_epochs, fit_loop = 10, -1, 2, Loop

    assert unfinished_reason(Trainer) is None  # max_epochs reached
    Trainer.max_epochs = 3
    assert "before max_steps / max_epochs" in unfinished_reason(Trainer)
    Trainer.max_steps = 10
    assert unfinished_reason(Trainer) is None
    Trainer.received_sigterm = True
    assert unfinished_reason(Trainer) == "training was interrupted"
