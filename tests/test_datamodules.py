"""Data modules: WebDataset captions (skips, rank/worker splits, resampling), instructions, demo writer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.captions import CaptionShardDataset
from datamodules.instructions import InstructionData, load_records
from datamodules.shards import parse_sources
from datamodules.webdataset_captions import WebDatasetCaptions
from ibllm.lit import PretrainModule
from ibllm.processing.samples import IGNORE_INDEX
from ibllm.processing.shards import SkipTally, WorldInfo, expand_urls, read_tar_samples, tar_samples, world_info

SIZE = 32


class CharTok:
    """Char-level tokenizer: BOS=1, EOS=2, char -> 3 + byte."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [3 + b for b in text.encode("utf-8")] + [2] * eos

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = "s", bad: bool = False,
                 npy: bool = False) -> str:
    """Write shards with keys '{prefix}{shard}_{i}'; ``bad`` adds one corrupt image, one missing caption,
    one bad-UTF-8 caption and one missing image to shard 0."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{prefix}{s:04d}.tar")) as sink:
            for i in range(per_shard):
                sample = {"__key__": f"{prefix}{s}_{i:03d}", "png": png(s * 1000 + i), "txt": f"caption {s} {i}",
                          "json": json.dumps({"i": i})}
                if npy:
                    b = io.BytesIO()
                    np.save(b, np.full(8, s + i / 100, dtype=np.float32))
                    sample["npy"] = b.getvalue()
                sink.write(sample)
            if bad and s == 0:
                sink.write({"__key__": "bad_img", "jpg": b"not an image at all", "txt": "x"})
                sink.write({"__key__": "no_caption", "png": png(7)})
                sink.write({"__key__": "bad_utf8", "png": png(8), "txt": b"\xff\xfe\xfa"})
                sink.write({"__key__": "no_image", "txt": "lonely caption"})
    return str(folder / f"{prefix}{{0000..{n_shards - 1:04d}}}.tar")


def module(train=None, val=None, **kw) -> WebDatasetCaptions:
    args = dict(tokenizer=CharTok(), batch_size=4, num_workers=0, image_size=SIZE, max_words=48, shuffle_buffer=8,
                resume_count=0)
    args.update(kw)
    return WebDatasetCaptions(train=train, val=val, **args)


def keys_of(ds: CaptionShardDataset, info: WorldInfo) -> list[str]:
    return [k for b in ds.iter_reader(info) for k in b["key"]]


def test_expand_urls(tmp_path) -> None:
    lst = tmp_path / "shards.txt"
    lst.write_text("a/{0..2}.tar\n# comment\nb.tar\n")
    assert expand_urls(str(lst)) == ["a/0.tar", "a/1.tar", "a/2.tar", "b.tar"]
    assert expand_urls("x/{00..01}.tar::y.tar") == ["x/00.tar", "x/01.tar", "y.tar"]
    (tmp_path / "dir").mkdir()
    for name in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / "dir" / name).write_bytes(b"")
    assert expand_urls(tmp_path / "dir") == [str(tmp_path / "dir" / "a.tar"), str(tmp_path / "dir" / "b.tar")]
    src = parse_sources([{"urls": "a/{0..1}.tar", "weight": 3}, {"urls": ["c.tar"], "weight": 1}])
    assert [s.weight for s in src] == [3.0, 1.0] and src[0].urls == ["a/0.tar", "a/1.tar"]


def test_expand_globs(tmp_path) -> None:
    for name in ("b-1.tar", "a-0.tar", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(str(tmp_path / "*-?.tar")) == [str(tmp_path / "a-0.tar"), str(tmp_path / "b-1.tar")]
    assert expand_urls(str(tmp_path / "{a,b}-*.tar")) == [str(tmp_path / "a-0.tar"), str(tmp_path / "b-1.tar")]
    assert expand_urls("https://host/x-*.tar") == ["https://host/x-*.tar"]  # remote: no local globbing


def test_world_info_from_launchers(monkeypatch) -> None:
    assert world_info(env={}, worker=0, num_workers=1) == WorldInfo(0, 1, 0, 1, 0)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert world_info(env=torchrun, worker=0, num_workers=1) == WorldInfo(3, 4, 0, 1, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert world_info(env=slurm, worker=1, num_workers=2) == WorldInfo(5, 8, 1, 2, 1)
    mpi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert world_info(env=mpi, worker=0, num_workers=1).rank == 2
    lightning_child = {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert world_info(env=lightning_child, worker=0, num_workers=1).rank == 1
    assert world_info(env={"LOCAL_RANK": "1"}, worker=0, num_workers=1).rank == 0  # no world size: one process
    assert world_info(1, 2, env=slurm, worker=0, num_workers=1).rank == 1  # explicit values win
    with pytest.raises(ValueError, match="invalid rank 2 for world size 2"):
        world_info(2, 2, env={})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (world_info().rank, world_info().world_size, world_info().global_worker) == (1, 2, 1)


def test_tar_reader_groups_members_and_reports_damage(tmp_path) -> None:
    pattern = write_shards(tmp_path / "d", 1, 3)
    (url,) = expand_urls(pattern)
    samples = list(read_tar_samples(url))
    assert [s.key for s in samples] == ["s0_000", "s0_001", "s0_002"]
    assert sorted(i.name for i, _ in samples[0].members) == ["s0_000.json", "s0_000.png", "s0_000.txt"]
    assert samples[1].image()[0] == "s0_001.png" and samples[1].fields()["txt"] == b"caption 0 1"
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(url).read_bytes()[:3000])
    errors: list[Exception] = []
    got = list(tar_samples([str(tmp_path / "missing.tar"), str(truncated), url], errors.append))
    assert [type(e) for e in errors][0] is FileNotFoundError and len(errors) == 2
    assert [f["__key__"] for f in got][-3:] == ["s0_000", "s0_001", "s0_002"]  # the next shard still reads
    assert got[-1]["__url__"] == url and set(got[-1]) == {"__key__", "__url__", "png", "txt", "json"}


def test_training_step_logs_skips_from_the_batch(sp_model) -> None:
    module = PretrainModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", modalities=[])
    module.configure_model()
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    module._trainer = SimpleNamespace(world_size=1)  # all a training step asks of its trainer here
    tokens = torch.randint(3, 100, (2, 6))
    feature = torch.randn(2, module.model.cfg.visual_dim)
    batch = {"tokens": tokens, "labels": tokens.clone(), "feature": feature, "inject": torch.ones(2, dtype=torch.bool)}
    module.training_step({**batch, "skipped": {"bad_image": 2}, "reader": "train/0"}, 0)
    module.validation_step({**batch, "skipped": {"bad_image": 1, "missing_caption": 4}, "reader": "val/0"}, 0)
    module.training_step({**batch, "skipped": {"bad_image": 3}, "reader": "train/1"}, 1)
    assert logged["data/skipped_bad_image"] == 6.0 and logged["data/skipped_missing_caption"] == 4.0


def test_skips_counted_never_crash(tmp_path) -> None:
    pattern = write_shards(tmp_path / "d", 2, 5, bad=True)
    dm = module(val=pattern)
    ds = dm.build_val_dataset()
    batches = list(ds.iter_reader(WorldInfo()))
    assert sum(len(b["key"]) for b in batches) == 10
    assert batches[-1]["skipped"] == {"bad_image": 1, "missing_caption": 1, "bad_utf8": 1, "missing_image": 1}
    b = batches[0]
    assert b["image"].shape == (4, 3, SIZE, SIZE) and b["tokens"].shape == b["labels"].shape
    assert b["inject"].all() and b["caption"][0].startswith("caption")
    # through a real DataLoader with two workers (+ an unreadable shard): counts summed over workers
    dm = module(val=[pattern, str(tmp_path / "missing.tar")], num_workers=2)
    dm.setup("validate")
    tally = SkipTally()
    for batch in dm.val_dataloader():
        tally.update(batch)
    assert tally.totals == {"bad_image": 1, "missing_caption": 1, "bad_utf8": 1, "missing_image": 1, "bad_shard": 1}


def test_val_path_disjoint_across_ranks_and_workers(tmp_path) -> None:
    pattern = write_shards(tmp_path / "d", 8, 3)
    dm = module(val=pattern)
    seen: list[str] = []
    for rank in range(2):
        ds = dm.build_val_dataset(rank=rank, world_size=2)
        for worker in range(2):
            keys = keys_of(ds, WorldInfo(rank, 2, worker, 2))
            assert len({k.split("_")[0] for k in keys}) == 2  # two whole shards per reader
            seen += keys
    assert len(seen) == len(set(seen)) == 24
    # deterministic order
    ds = dm.build_val_dataset(rank=0, world_size=2)
    assert keys_of(ds, WorldInfo(0, 2, 1, 2)) == keys_of(ds, WorldInfo(0, 2, 1, 2))


def test_resampled_order_depends_on_epoch_seed_reader(tmp_path) -> None:
    pattern = write_shards(tmp_path / "d", 8, 2)
    ds = module(train=pattern, samples_per_epoch=64).build_train_dataset(rank=0, world_size=2)
    info = WorldInfo(0, 2, 0, 2)

    def order(d=ds, i=info, n=30):
        it = d.shard_stream(i)
        return [next(it) for _ in range(n)]

    first = order()
    assert first == order()  # reproducible
    ds.set_epoch(1)
    assert order() != first
    ds.set_epoch(0)
    assert order(i=WorldInfo(0, 2, 1, 2)) != first and order(i=WorldInfo(1, 2, 0, 2)) != first
    other = module(train=pattern, samples_per_epoch=64, resume_count=1).build_train_dataset(rank=0, world_size=2)
    assert order(d=other) != first
    # length: ceil(64 / (4*2)) = 8 batches per rank, 4 per worker
    assert len(ds) == 8
    assert len(list(ds.iter_reader(info))) == 4
    # the loader's sampler forwards Lightning's set_epoch to the dataset
    dm = module(train=pattern, samples_per_epoch=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(5)
    assert dm.train_dataset.epoch.get() == 5
    assert len(loader) == 16


def test_hopeless_spec_fails_loudly(tmp_path) -> None:
    ds = module(train=str(tmp_path / "nope{0..1}.tar"), samples_per_epoch=8).build_train_dataset()
    ds.max_consecutive_failures = 20
    with pytest.raises(RuntimeError, match="consecutive unreadable"):
        next(ds.iter_reader(WorldInfo()))


def test_weighted_sources(tmp_path) -> None:
    a = write_shards(tmp_path / "a", 2, 1, prefix="a")
    b = write_shards(tmp_path / "b", 2, 1, prefix="b")
    ds = module(train=[{"urls": a, "weight": 3}, {"urls": b, "weight": 1}], samples_per_epoch=8).build_train_dataset()
    it = ds.shard_stream(WorldInfo())
    draws = [next(it) for _ in range(4000)]
    frac_a = sum("/a/" in u for u in draws) / len(draws)
    assert 0.72 < frac_a < 0.78


def test_features_path(tmp_path) -> None:
    pattern = write_shards(tmp_path / "d", 1, 4, npy=True)
    ds = module(val=pattern, use_features=True).build_val_dataset()
    (batch,) = list(ds.iter_reader(WorldInfo()))
    assert batch["feature"].shape == (4, 8) and "image" not in batch


def _write_instruction_files(tmp: Path) -> dict[str, Path]:
    (tmp / "imgs").mkdir(parents=True)
    Image.open(io.BytesIO(png(1))).save(tmp / "imgs" / "one.png")
    alpaca = tmp / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Add", "input": "two and three", "output": "five"},
    ]))
    llava = tmp / "llava.json"
    llava.write_text(json.dumps([
        {"image": "imgs/one.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Noise."}]},
        {"image": "imgs/missing.png", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
    ]))
    sharegpt = tmp / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "Hello"},
                           {"from": "gpt", "value": "Hey."}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
    ]))
    return {"alpaca": alpaca, "llava": llava, "sharegpt": sharegpt}


def test_instruction_formats(tmp_path) -> None:
    files = _write_instruction_files(tmp_path)
    recs = load_records([files["alpaca"], files["llava"], files["sharegpt"]], image_root=tmp_path)
    assert len(recs) == 5  # the item with a missing image is dropped
    llava = recs[2]
    assert llava.turns == [("What is it?", "A square."), ("Colour?", "Noise.")]
    assert llava.image == str(tmp_path / "imgs/one.png")
    assert recs[1].input == "two and three"
    assert recs[3].turns == [("Hello", "Hey.")]
    assert recs[4].turns == [("2+2?", "4"), ("and 3+3?", "6")]
    official = load_records(files["llava"], image_root=tmp_path, official_first_turn=True)
    assert official[0].turns == [("<image>\nWhat is it?", "A square.")] and official[0].official


def test_instruction_module_batches(tmp_path) -> None:
    files = _write_instruction_files(tmp_path)
    tok = CharTok()
    dm = InstructionData(train_files=[str(f) for f in files.values()], tokenizer=tok, image_root=str(tmp_path),
                         batch_size=5, num_workers=0, image_size=SIZE, max_words=512)
    dm.setup("fit")
    ds = dm.train_dataset
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["image"].eq(0).all() and items[0]["inject"]  # fake image, injected (official)
    assert not items[2]["image"].eq(0).all()  # real image
    kept = items[2]["labels"][items[2]["labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(kept) == "A square.Noise." and kept.count(2) == 2  # assistant turns + EOS only
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape[0] == 5 and batch["tokens"].shape[1] == max(len(x["tokens"]) for x in items)
    assert batch["image"].shape == (5, 3, SIZE, SIZE) and batch["inject"].all()
    dm2 = InstructionData(train_files=str(files["alpaca"]), tokenizer=tok, batch_size=2, num_workers=0,
                          image_size=SIZE, text_only_injection=False)
    batch = next(iter(dm2.train_dataloader()))
    assert not batch["inject"].any() and batch["image"].eq(0).all()


def test_demo_writer(tmp_path) -> None:
    from ibllm.demos.digits.captions import caption_mentions_digit, digit_word
    from ibllm.demos.digits.data import write_digit_instructions, write_digit_shards

    out = write_digit_shards(tmp_path / "digits", seed=0, shard_size=1000)
    assert out.n_train + out.n_heldout == 1797 and out.n_heldout == 360
    marker = tmp_path / "digits" / "done_shards.json"
    stamp = marker.stat().st_mtime_ns
    assert write_digit_shards(tmp_path / "digits", seed=0, shard_size=1000) == out
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    held = list(wds.WebDataset(out.heldout_pattern, shardshuffle=False))
    train_keys = {s["__key__"] for s in wds.WebDataset(out.train, shardshuffle=False)}
    assert len(held) == 360 and len(train_keys) == 1437 and not train_keys & {s["__key__"] for s in held}
    for s in held[:50]:
        d = json.loads(s["json"])["label"]
        assert caption_mentions_digit(s["txt"].decode(), d)
    img = Image.open(io.BytesIO(held[0]["png"]))
    assert img.size == (224, 224) and img.mode == "RGB"
    assert digit_word(7) == "seven" and not caption_mentions_digit("someone", 1)
    other = write_digit_shards(tmp_path / "digits2", seed=1, shard_size=1000)
    assert {s["__key__"] for s in wds.WebDataset(other.heldout, shardshuffle=False)} != {s["__key__"] for s in held}
    inst = write_digit_instructions(tmp_path / "inst", max_images=20)
    items = json.loads(Path(inst.llava_train).read_text())
    assert len(items) == 16 and (Path(inst.image_root) / items[0]["image"]).is_file()
    assert len(load_records([inst.llava_train, inst.alpaca_train])) == 16 + inst.counts["alpaca_train"]
