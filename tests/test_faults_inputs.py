"""Bad and hostile inputs: media that names other files, stage-2 data skips, set-up errors.

* Media: a concat script or an HLS playlist handed to the audio/video loaders (as an upload's bytes or a
  file) is refused, and the file it names is never opened (a FIFO watched from a thread tells).
* Stage 2: missing/corrupt images and malformed items are skipped, counted and carried by the batch like
  stage 1's; items with wrong value types are refused with their file and index.
* Set-up (``python -m ibllm fit``, system tests): every bad input ends the output with one line naming the
  file and the problem, exits 2 and writes nothing into the run folder.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.instruction_files import LOGGED_PER_FILE, load_instruction_records, load_records
from datamodules.instructions import InstructionData, SkipCollate
from datamodules.webdataset_captions import WebDatasetCaptions
from faults_helpers import tiny_experiment
from ibllm.build import check_sources
from ibllm.checkpoints.io import safe_load
from ibllm.cli import main as cli_main
from ibllm.cli.user_errors import one_line_errors
from ibllm.files import InputError
from ibllm.lit import FinetuneModule
from ibllm.processing.audio import read_audio
from ibllm.processing.av_input import ALLOWED_DEMUXERS, open_container
from ibllm.processing.errors import MediaError
from ibllm.processing.shards import SkipTally
from ibllm.processing.video import load_video

REPO = Path(__file__).resolve().parents[1]


# ---- media that names other files --------------------------------------------------------------------------
class OpenWatch:
    """A FIFO at ``path`` that records whether anything opened it for reading.

    A thread keeps trying to open the write end without blocking, which only succeeds while a reader has it
    open; it then closes at once, so the reader sees an empty file instead of blocking.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader
                    raise
                time.sleep(0.002)
                continue
            self.opened = True
            os.close(fd)

    def __enter__(self) -> "OpenWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # let a reader that is just opening be seen
        self._stop.set()
        self._thread.join(timeout=5)


def write_clip(path: Path, fmt: str | None = None, codec: str = "mpeg4") -> Path:
    """A 2.5 s, 32x32 clip at 10 fps."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_concat_script_is_refused_and_the_named_file_never_opened(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an upload's relative names resolve against the working folder
    script = b"ffconcat version 1.0\nfile secret.mp4\nduration 2.5\n"
    (tmp_path / "upload.mp4").write_bytes(script)
    with OpenWatch(tmp_path / "secret.mp4") as watch:
        # the control: FFmpeg left to itself takes the bytes for a concat script and opens the named file
        with pytest.raises(av.error.FFmpegError):
            with av.open(io.BytesIO(script)) as container:
                list(container.decode(video=0))
        assert watch.opened
        watch.opened = False
        for source in (script, tmp_path / "upload.mp4"):
            with pytest.raises(MediaError, match="not an allowed audio/video container"):
                load_video(source)
            with pytest.raises(MediaError, match="not an allowed audio/video container"):
                read_audio(source)
    assert not watch.opened


def test_concat_script_cannot_reach_a_real_video(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "secret.mp4")
    assert load_video(tmp_path / "secret.mp4").shape == (15, 3, 2, 224, 224)  # the file itself is a video
    with pytest.raises(MediaError, match="not an allowed"):
        load_video(b"ffconcat version 1.0\nfile secret.mp4\nduration 2.5\n")


def test_hls_playlist_is_refused_and_its_segment_never_opened(tmp_path) -> None:
    playlist = tmp_path / "list.m3u8"
    segment = tmp_path / "segment.ts"
    playlist.write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n#EXTINF:2.5,\n"
                        f"{segment}\n#EXT-X-ENDLIST\n")
    with OpenWatch(segment) as watch:
        with pytest.raises(av.error.FFmpegError):  # the control: FFmpeg's HLS demuxer opens the segment
            with av.open(str(playlist)) as container:
                list(container.decode(video=0))
        assert watch.opened
        watch.opened = False
        for src in (playlist, io.BytesIO(playlist.read_bytes())):
            with pytest.raises(MediaError, match="not an allowed|cannot open"):
                open_container(src, "video", playlist)
    assert not watch.opened


@pytest.mark.parametrize("suffix,fmt,codec", [(".mp4", None, "mpeg4"), (".mkv", None, "mpeg4"),
                                              (".avi", None, "mpeg4"), (".ts", "mpegts", "mpeg4"),
                                              (".mov", None, "mpeg4"), (".flv", None, "flv"),
                                              (".wmv", "asf", "wmv2"), (".webm", None, "libvpx")])
def test_ordinary_containers_still_open(tmp_path, suffix, fmt, codec) -> None:
    path = write_clip(tmp_path / f"clip{suffix}", fmt, codec)
    for src in (path, io.BytesIO(path.read_bytes())):
        with open_container(src, "video", path) as container:
            assert any(part in ALLOWED_DEMUXERS for part in container.format.name.split(","))
            assert len(list(container.decode(video=0))) == 25


# ---- stage-2 data: skips counted and carried, wrong value types refused --------------------------------------
def write_png(path: Path, value: int = 90) -> Path:
    Image.new("RGB", (16, 16), (value, value, value)).save(path)
    return path


def good_items(n: int, image: str | None = None) -> list[dict]:
    items = [{"instruction": f"Say {k}", "input": "", "output": f"{k}"} for k in range(n)]
    if image:
        items += [{"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "grey"}]}]
    return items


MALFORMED = [
    ({"instruction": 42, "output": "x"}, "'instruction' must be a string, got int 42"),
    ({"instruction": ["x"], "output": "y"}, "'instruction' must be a string, got list ['x']"),
    ({"instruction": "x", "output": None}, "'output' must be a string, got NoneType"),
    ({"conversations": "human: hi"}, "'conversations' must be a list, got str"),
    ({"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
     "message 0 'value' must be a string, got list"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}, {"role": "assistant", "content": "y"}]},
     "message 0 'content' must be a string, got dict"),
    ({"conversations": ["hi", "there"]}, "message 0 must be an object, got str"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "unknown conversation role 'narrator'"),
    ({"image": 7, "conversations": []}, "'image' must be a string, got int 7"),
    (["not", "an", "object"], "expected an object, got list"),
    ({"question": "x"}, "neither 'instruction' nor 'conversations'/'messages'"),
]


def test_wrong_value_types_are_refused_with_file_and_index(tmp_path, caplog) -> None:
    path = tmp_path / "mixed.json"
    items = good_items(2) + [item for item, _ in MALFORMED]
    path.write_text(json.dumps(items))
    caplog.set_level(logging.WARNING)
    records, skipped = load_instruction_records(path)
    assert skipped == {"malformed_item": len(MALFORMED)}
    assert [r.turns for r in records] == [[("Say 0", "0")], [("Say 1", "1")]]
    assert all(isinstance(text, str) and "[" not in text for r in records for turn in r.turns for text in turn)
    logged = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    for k, (_, reason) in enumerate(MALFORMED[:LOGGED_PER_FILE]):
        assert f"{path}: item {k + 2} skipped (malformed): {reason}" in logged[k]
    assert f"{path}: skipped {len(MALFORMED)} malformed_item of {len(items)} items" in caplog.text
    # a file with no usable item: one error naming the file, the counts and the first problem
    only_bad = tmp_path / "bad.json"
    only_bad.write_text(json.dumps([{"instruction": 42}, {"image": "gone.png", "instruction": "x", "output": "y"}]))
    with pytest.raises(InputError) as err:
        load_records(only_bad)
    assert str(err.value) == (f"no usable instruction items in {only_bad} (1 malformed_item, 1 missing_image); "
                              f"first: {only_bad}: item 0: 'instruction' must be a string, got int 42")


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, "instruction file not found"),
    ("empty.json", "", "instruction file is empty"),
    ("blank.json", "  \n\n", "instruction file is empty"),
    ("corrupt.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c", ',
     "invalid JSON at line 2, column 23: Expecting property name enclosed in double quotes"),
    ("lines.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c" "output": "d"}\n',
     "line 2: invalid JSON (Expecting ',' delimiter, column 21) in a file of one JSON object per line"),
    ("scalar.json", "42", "expected a JSON list of items (or one JSON object per line), got int"),
    ("binary.json", b"\xff\xfe\x00[", "not UTF-8 text"),
    ("folder.json", "DIR", "is a folder, expected an instruction file"),
    ("meta.yaml", "META: [a.json\n", "cannot read instruction data config"),
    ("meta2.yaml", "META: 3\n", "expected a mapping with META: a list of instruction file paths"),
])
def test_unusable_instruction_files_name_the_file(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as err:
        InstructionData(train_files=str(path), tokenizer=CharTok(), num_workers=0).setup("fit")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


class CharTok:
    """Char-level tokenizer: BOS=1, EOS=2, char -> 3 + byte (capped to a tiny vocabulary)."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [3 + b % 100 for b in text.encode("utf-8")] + [2] * eos


def skip_fixture(tmp_path: Path) -> Path:
    """Instruction file: 6 good text items, 2 good image items, one item with a corrupt image, one whose
    image is deleted after loading, one with a missing image, one malformed and one without an answer."""
    (tmp_path / "img").mkdir()
    write_png(tmp_path / "img" / "ok.png")
    write_png(tmp_path / "img" / "vanishes.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = good_items(6, "img/ok.png") + good_items(0, "img/ok.png")
    items += good_items(0, "img/corrupt.png") + good_items(0, "img/vanishes.png") + good_items(0, "img/gone.png")
    items += [{"instruction": 42, "output": "x"}, {"conversations": [{"from": "human", "value": "unanswered"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items))
    return path


def test_stage2_skips_are_carried_by_the_batch_like_stage1(tmp_path) -> None:
    path = skip_fixture(tmp_path)
    expected = {"bad_image": 1, "missing_image": 2, "malformed_item": 1, "no_turn": 1}
    for workers in (0, 2):
        dm = InstructionData(train_files=str(path), tokenizer=CharTok(), batch_size=1, num_workers=workers,
                             image_size=32, train_transform=False)
        dm.setup("fit")
        assert dm.train_dataset.load_skipped == {"missing_image": 1, "malformed_item": 1, "no_turn": 1}
        (tmp_path / "img" / "vanishes.png").unlink(missing_ok=True)
        dm.train_dataset.records.sort(key=lambda r: r.image or "")  # deterministic: every record once
        tally = SkipTally()
        readers = set()
        for batch in DataLoader(dm.train_dataset, batch_size=1, num_workers=workers,
                                collate_fn=SkipCollate(dm.train_dataset, "train")):
            tally.update(batch)
            readers.add(batch["reader"])
            assert batch["tokens"].dtype == torch.long and set(batch["skipped"]) <= set(expected)
        assert tally.totals == expected, workers
        assert readers == ({"train/0"} if workers == 0 else {"train/0", "train/1"})
        write_png(tmp_path / "img" / "vanishes.png")


def test_stage2_training_logs_the_skips(tmp_path, sp_model) -> None:
    path = skip_fixture(tmp_path)
    (tmp_path / "img" / "vanishes.png").unlink()
    dm = InstructionData(train_files=str(path), tokenizer=sp_model, batch_size=2, num_workers=0, image_size=224,
                         train_transform=False, max_words=48)
    module = FinetuneModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", lr=1e-4)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("data/skipped_")}
    # the load-time skips are logged from the first step on; the two images that fail to load count each time
    # an item is replaced because of them (5 shuffled batches of 2 of the 11 records: how often is not fixed)
    assert logged["data/skipped_malformed_item"] == 1 and logged["data/skipped_no_turn"] == 1
    assert logged["data/skipped_missing_image"] >= 1 and set(logged) <= {f"data/skipped_{r}" for r in (
        "malformed_item", "no_turn", "missing_image", "bad_image")}


# ---- set-up errors: one last line naming the input, exit status 2, nothing written ---------------------------
def test_check_sources_names_the_setting_and_the_file(tmp_path) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.ckpt"
    torch.save({"global_step": 1, "w": torch.randn(4000)}, cut)
    cut.write_bytes(cut.read_bytes()[:3000])
    cases = [
        (dict(llm="llama-7b-typo"), "model.init_args.llm: LLM source 'llama-7b-typo': no such preset"),
        (dict(imagebind="hugee"),
         "model.init_args.imagebind: unknown ImageBind preset 'hugee'; choose from demo, huge, huge_w3d, tiny"),
        (dict(init_from=str(tmp_path / "nope.ckpt")), f"init_from checkpoint file not found: {tmp_path / 'nope.ckpt'}"),
        (dict(init_from=str(empty)), f"init_from checkpoint file {empty} is empty (0 bytes)"),
        (dict(init_from=str(cut)), f"init_from checkpoint file {cut} is truncated or corrupt"),
        (dict(imagebind_weights=str(tmp_path)), f"ImageBind weights path is not a file: {tmp_path}"),
        (dict(tokenizer=str(tmp_path / "sp.model")), f"tokenizer file not found: {tmp_path / 'sp.model'}"),
    ]
    for overrides, message in cases:
        with pytest.raises(InputError) as err:
            check_sources(**{"llm": "tiny", "imagebind": "tiny", **overrides}, key="model.init_args.")
        assert message in str(err.value)
    check_sources("tiny", None, "tiny", None, None)  # presets alone are fine


def test_checkpoint_reader_says_empty_and_truncated(tmp_path) -> None:
    empty = tmp_path / "zero.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"training checkpoint file .*zero\.ckpt is empty \(0 bytes\)"):
        safe_load(empty, "training checkpoint")
    cut = tmp_path / "cut.ckpt"
    torch.save({"global_step": 1, "w": torch.randn(4000)}, cut)
    cut.write_bytes(cut.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"cut\.ckpt is truncated or corrupt"):
        safe_load(cut, "training checkpoint")


def test_shard_patterns_that_list_no_existing_file_are_refused(tmp_path, caption_shards) -> None:
    missing = str(tmp_path / "none-{0..1}.tar")
    with pytest.raises(InputError, match=r"none of its 2 shard files exists \(first: .*none-0\.tar\)"):
        WebDatasetCaptions(train=missing, tokenizer=CharTok(), num_workers=0).setup("fit")
    with pytest.raises(InputError, match=r"the pattern lists no shard"):
        WebDatasetCaptions(train=str(tmp_path), tokenizer=CharTok(), num_workers=0).setup("fit")
    # one missing shard among existing ones is tolerated (skipped and counted as bad_shard while reading)
    some = [caption_shards, str(tmp_path / "gone.tar")]
    WebDatasetCaptions(train=some, tokenizer=CharTok(), num_workers=0, samples_per_epoch=4).setup("fit")


def test_one_line_errors(capsys, monkeypatch) -> None:
    monkeypatch.delenv("IBLLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        with one_line_errors("python -m ibllm fit"):
            raise InputError("/data/x.json: instruction file\nis empty")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == "python -m ibllm fit: error: /data/x.json: instruction file is empty"
    with pytest.raises(SystemExit):
        with one_line_errors("prog"):
            open("/nonexistent/file.json")
    assert capsys.readouterr().err.splitlines()[-1] == "prog: error: /nonexistent/file.json: No such file or directory"
    monkeypatch.setenv("IBLLM_DEBUG", "1")
    with pytest.raises(SystemExit):
        with one_line_errors("prog"):
            raise MediaError("video", "a.mp4", "cannot open video")
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "prog: error: video ('a.mp4'): cannot open video"
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        with one_line_errors("prog"):
            raise RuntimeError("bug")


def bad_fit_inputs(root: Path, sp_model: str, shards: str) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (experiment, extra flags, expected last line after ``python -m ibllm fit: error: ``)."""
    bad = root / "inputs"
    bad.mkdir(parents=True)
    (bad / "corrupt.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", ')
    (bad / "empty.json").write_text("")
    (bad / "zero.ckpt").write_bytes(b"")
    torch.save({"global_step": 3, "state_dict": {"w": torch.randn(4000)}}, bad / "cut.ckpt")
    (bad / "cut.ckpt").write_bytes((bad / "cut.ckpt").read_bytes()[:4000])

    def stage1(name: str) -> Path:
        return tiny_experiment(root / name, sp_model, shards)

    def stage2(name: str, files: str) -> Path:
        path = stage1(name)
        config = yaml.safe_load(path.read_text())
        config["model"]["class_path"] = "ibllm.lit.FinetuneModule"
        config["data"] = {"class_path": "datamodules.InstructionData",
                          "init_args": {"train_files": files, "batch_size": 2, "num_workers": 0}}
        path.write_text(yaml.safe_dump(config))
        return path

    return {
        "missing_json": (stage2("missing_json", str(bad / "nope.json")), [],
                         f"{bad / 'nope.json'}: instruction file not found"),
        "corrupt_json": (stage2("corrupt_json", str(bad / "corrupt.json")), [],
                         f"{bad / 'corrupt.json'}: invalid JSON at line 2, column 23: Expecting property name "
                         "enclosed in double quotes"),
        "empty_json": (stage2("empty_json", str(bad / "empty.json")), [],
                       f"{bad / 'empty.json'}: instruction file is empty"),
        "no_shards": (stage1("no_shards"), ["--data.init_args.train", str(bad / "none-{0..1}.tar")],
                      f"shards '{bad / 'none-{0..1}.tar'}': none of its 2 shard files exists "
                      f"(first: {bad / 'none-0.tar'})"),
        "llm_typo": (stage1("llm_typo"), ["--model.init_args.llm", str(bad / "llama-7b")],
                     f"model.init_args.llm: LLM source '{bad / 'llama-7b'}': no such preset"),
        "ckpt_empty": (stage1("ckpt_empty"), ["--ckpt_path", str(bad / "zero.ckpt")],
                       f"training checkpoint file {bad / 'zero.ckpt'} is empty (0 bytes)"),
        "ckpt_truncated": (stage1("ckpt_truncated"), ["--ckpt_path", str(bad / "cut.ckpt")],
                           f"training checkpoint file {bad / 'cut.ckpt'} is truncated or corrupt"),
        "init_from": (stage1("init_from"), ["--model.init_args.init_from", str(bad / "stage1.ckpt")],
                      f"model.init_args.init_from: init_from checkpoint file not found: {bad / 'stage1.ckpt'}"),
        "preset": (stage1("preset"), ["--model.init_args.imagebind", "hugee"],
                   "model.init_args.imagebind: unknown ImageBind preset 'hugee'; choose from demo, huge, "
                   "huge_w3d, tiny"),
    }


def written(run_folder: Path) -> list[str]:
    """Everything in a run folder but the experiment file."""
    return sorted(str(p.relative_to(run_folder)) for p in run_folder.rglob("*") if p.name != "fit.yaml")


def test_fit_set_up_errors_end_with_one_line_and_write_nothing(tmp_path, sp_model, caption_shards, capsys,
                                                               monkeypatch) -> None:
    monkeypatch.delenv("IBLLM_DEBUG", raising=False)
    for name, (config, flags, expected) in bad_fit_inputs(tmp_path, sp_model, caption_shards).items():
        with pytest.raises(SystemExit) as stop:
            cli_main(["fit", "--config", str(config), *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2, (name, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("python -m ibllm fit: error: " + expected), (name, last)
        assert "Traceback" not in err and "NoneType" not in err, name
        assert written(config.parent) == [], (name, written(config.parent))


@pytest.mark.system
def test_fit_set_up_error_in_a_real_process(tmp_path, sp_model, caption_shards, cli_env) -> None:
    cases = bad_fit_inputs(tmp_path, sp_model, caption_shards)
    for name, debug in (("corrupt_json", "0"), ("ckpt_empty", "1")):
        config, flags, expected = cases[name]
        proc = subprocess.run([sys.executable, "-m", "ibllm", "fit", "--config", str(config), *flags], cwd=REPO,
                              env=cli_env(IBLLM_DEBUG=debug), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("python -m ibllm fit: error: " + expected)
        assert ("Traceback" in proc.stderr) == (debug == "1")  # IBLLM_DEBUG=1 keeps the full traceback
        assert written(config.parent) == []
