"""Precomputed stage-1 features: ``python -m ibllm features`` and training from them."""

from __future__ import annotations

import io
import os
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from datamodules import WebDatasetCaptions
from ibllm.checkpoints import save_atomic
from ibllm.cli import main
from ibllm.cli.features import main as features_main
from ibllm.lit import PretrainModule
from ibllm.models.imagebind import build_imagebind
from ibllm.processing.image import load_image
from ibllm.processing.shards import rank_shards, world_info

COLORS = ["red", "green", "blue", "yellow"]
PER_SHARD = 5
CORRUPT_KEY = "0_0002"


def noise_png(rng: np.random.Generator, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two shards of random non-square images (one corrupt) and a saved random tiny vision tower."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    images = {}
    for shard in range(2):
        with wds.TarWriter(str(root / f"{shard:06d}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"{shard}_{i:04d}"
                png = b"not an image" if key == CORRUPT_KEY else noise_png(rng, 40 + 8 * i, 32)
                images[key] = png
                sink.write({"__key__": key, "png": png, "txt": f"a {COLORS[i % 4]} square", "json": "{}"})
    torch.manual_seed(123)
    weights = root / "vision.safetensors"
    save_atomic(build_imagebind("tiny", ["vision"]).state_dict(), weights)
    return {"root": root, "pattern": str(root / "{000000..000001}.tar"), "weights": str(weights), "images": images}


def run_features(data: dict, out, *extra: str) -> dict:
    """The command in-process (``features.main`` returns the printed summary; ``cli.main`` is tested below)."""
    return features_main(["--shards", data["pattern"], "--out", str(out), "--imagebind", "tiny",
                 "--imagebind-weights", data["weights"], "--batch-size", "3", "--device", "cpu",
                 "--no-progress", *extra])


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def features(data) -> dict:
    out = data["root"] / "feat"
    summary = run_features(data, out)
    return {"out": out, "summary": summary}


def test_every_sample_gets_the_encoder_output(data, features):
    summary = features["summary"]
    assert summary["shards_written"] == 2 and summary["samples"] == 2 * PER_SHARD
    assert summary["encoded"] == 2 * PER_SHARD - 1 and summary["skipped"] == {"bad_image": 1}
    encoder = build_imagebind("tiny", ["vision"])
    encoder.load_state_dict(load_file(data["weights"]))
    for shard in range(2):
        src = members(data["root"] / f"{shard:06d}.tar")
        out = members(features["out"] / f"{shard:06d}.tar")
        assert {k: v for k, v in out.items() if not k.endswith(".npy")} == src  # every original member, unchanged
        for key in {name.split(".")[0] for name in src}:
            if key == CORRUPT_KEY:
                assert f"{key}.npy" not in out
                continue
            feature = np.load(io.BytesIO(out[f"{key}.npy"]))
            assert feature.dtype == np.float32 and feature.shape == (32,)
            with torch.no_grad():
                expected = encoder({"vision": load_image(data["images"][key], train=False, size=224)[None]})["vision"][0]
            torch.testing.assert_close(torch.from_numpy(feature), expected, atol=1e-5, rtol=1e-5)


def test_rerun_skips_complete_shards(data, features):
    before = {p.name: p.stat().st_mtime_ns for p in features["out"].iterdir()}
    summary = run_features(data, features["out"])
    assert summary["shards_existing"] == 2 and summary["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in features["out"].iterdir()} == before  # no temp files left either


def test_ranks_split_shards_disjointly(data, tmp_path, monkeypatch):
    assert rank_shards(list("abcde"), 1, 2) == ["b", "d"]
    run_features(data, tmp_path / "r0", "--rank", "0", "--world-size", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (world_info().rank, world_info().world_size) == (1, 2)
    run_features(data, tmp_path / "r1", "--dtype", "float16")  # rank from the environment
    r0, r1 = {p.name for p in (tmp_path / "r0").iterdir()}, {p.name for p in (tmp_path / "r1").iterdir()}
    assert r0 == {"000000.tar"} and r1 == {"000001.tar"}
    half = np.load(io.BytesIO(members(tmp_path / "r1" / "000001.tar")["1_0000.npy"]))
    full = np.load(io.BytesIO(members(data["root"] / "feat" / "000001.tar")["1_0000.npy"]))
    assert half.dtype == np.float16 and np.allclose(half, full, atol=1e-3)


def test_unreadable_shard_fails_clearly_without_output(data, tmp_path):
    good = (data["root"] / "000000.tar").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.tar").write_bytes(good[: len(good) // 2 + 100])
    with pytest.raises(SystemExit, match="bad.tar"):
        main(["features", "--shards", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--imagebind", "tiny",
              "--device", "cpu", "--no-progress"])
    assert os.listdir(tmp_path / "out") == []


def test_stage1_trains_from_features_like_from_images(data, features, sp_model, tmp_path):
    module = PretrainModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", modalities=[], lr=5e-3, warmup_steps=1)
    dm = WebDatasetCaptions(train=str(features["out"]), tokenizer=sp_model, batch_size=2, num_workers=0,
                            samples_per_epoch=8, max_words=160, shuffle_buffer=4, use_features=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and module.model.image_bind is None
    gates = torch.stack([layer.attention.gate for layer in module.model.llama.layers])
    assert gates.abs().sum() > 0

    # the same trained weights with the encoder running on the eval-transformed images
    from_images = PretrainModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", imagebind_weights=data["weights"])
    from_images.configure_model()
    missing, unexpected = from_images.model.load_state_dict(module.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("image_bind.") for k in missing)
    feature_batch = next(iter(WebDatasetCaptions(val=str(features["out"]), tokenizer=sp_model, batch_size=3,
                                                 max_words=160, use_features=True).build_val_dataset()))
    image_batch = next(iter(WebDatasetCaptions(val=data["pattern"], tokenizer=sp_model, batch_size=3,
                                               max_words=160, train_transform=False).build_val_dataset()))
    assert feature_batch["key"] == image_batch["key"] and CORRUPT_KEY not in feature_batch["key"]
    module.eval(), from_images.eval()
    with torch.no_grad():
        logits_features = module(feature_batch)
        logits_images = from_images(image_batch)
        logits_blind = module.model(feature_batch["tokens"])
    torch.testing.assert_close(logits_features, logits_images, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_features, logits_blind, atol=1e-4)  # the visual token matters
