"""Shared fixtures: a tiny sentencepiece tokenizer and tiny image–caption / instruction data."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests must never see a SLURM job around them (Lightning would become SLURM-aware).
for _key in [k for k in os.environ if k.startswith("SLURM_")]:
    del os.environ[_key]

WORDS = "red green blue yellow circle square digit one two three four five six seven eight nine zero image photo of a the".split()


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A tiny sentencepiece model (bos 1, eos 2, unk 0, no pad) trained on generated text."""
    import sentencepiece as spm

    from ibllm.processing.templates import caption_prompt, format_prompt

    folder = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    lines = [caption_prompt(), format_prompt("Which digit is this?")]
    lines += [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=120,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    return str(folder / "sp.model")


def color_png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def caption_shards(tmp_path_factory) -> str:
    """Two small image–caption shards (coloured squares) in the img2dataset layout; returns a brace pattern."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("shards")
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rng = random.Random(0)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as sink:
            for i in range(12):
                name = rng.choice(sorted(colors))
                sink.write({"__key__": f"{shard}_{i:04d}", "png": color_png(colors[name]), "txt": f"a {name} square",
                            "json": json.dumps({"label": name})})
    return str(folder / "{000000..000001}.tar")


@pytest.fixture(scope="session")
def instruction_files(tmp_path_factory) -> dict[str, str]:
    """An Alpaca file and a LLaVA file with images, for stage 2."""
    folder = tmp_path_factory.mktemp("instructions")
    (folder / "img.png").write_bytes(color_png((255, 0, 0)))
    alpaca = [{"instruction": f"Say {w}", "input": "", "output": w} for w in WORDS[:10]]
    llava = [{"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                    {"from": "gpt", "value": "red"},
                                                    {"from": "human", "value": "Which shape?"},
                                                    {"from": "gpt", "value": "a square"}]}] * 6
    (folder / "alpaca.json").write_text(json.dumps(alpaca))
    (folder / "llava.json").write_text(json.dumps(llava))
    return {"alpaca": str(folder / "alpaca.json"), "llava": str(folder / "llava.json"), "root": str(folder)}
