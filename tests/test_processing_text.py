"""CLIP BPE tokenizer for the ImageBind text tower."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from ibllm.processing import ClipTokenizer, MediaError, load_modality, tokenize
from ibllm.processing.clip_tokenizer import DEFAULT_BPE_PATH, bytes_to_unicode, clean_text


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


def test_asset_is_the_clip_merge_list():
    assert hashlib.sha256(DEFAULT_BPE_PATH.read_bytes()).hexdigest() == (
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")
    assert (DEFAULT_BPE_PATH.parent / "README.md").read_text().count("MIT")
    with gzip.open(DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        assert len(f.read().split("\n")) > 48894


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 49408
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407
    b2u = bytes_to_unicode()
    assert len(set(b2u.values())) == 256 and b2u[ord("a")] == "a" and b2u[ord(" ")] == "Ġ"
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256
    assert list(tok.encoder)[512] == "".join(next(iter(tok.bpe_ranks)))  # first merge "i n"


@pytest.mark.parametrize(
    "text,ids",
    [
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),
        ("a diagram", [320, 22697]),
        ("a dog", [320, 1929]),
        ("Hello   World", [3306, 1002]),
        ("", []),
    ],
)
def test_known_clip_ids(tok, text, ids):
    out = tok(text)
    assert out.shape == (1, 77) and out.dtype == torch.int64
    n = len(ids) + 2
    assert out[0, :n].tolist() == [49406, *ids, 49407]
    assert (out[0, n:] == 0).all()


def test_cleaning_and_pretokenisation(tok):
    assert clean_text("  Caf&amp;amp;é \n\t BAR  ") == "caf&é bar"
    assert clean_text("ï¬\x81sh") == "fish"  # ftfy repairs mojibake ("ﬁ" ligature)
    assert tok("It's") [0, 1:4].tolist() == tok.encode("it 's") + [49407]
    assert tok.encode("123") == [tok.encoder["1</w>"], tok.encoder["2</w>"], tok.encoder["3</w>"]]
    assert tok.decode(tok("naïve café, ok?")[0]) == "naïve café , ok ?"
    assert tok.encode("<|endoftext|>") == [49407]


def test_batch_and_truncation(tok):
    long_text = " ".join(["word"] * 100)
    out = tok(["short", long_text])
    assert out.shape == (2, 77)
    assert out[1, 0] == 49406 and out[1, -1] != 49407 and (out[1] == 49407).sum() == 0  # official: truncation drops the end token
    fixed = ClipTokenizer(keep_eot_on_truncate=True)(long_text)
    assert fixed[0, -1] == 49407 and torch.equal(fixed[0, :76], out[1, :76])
    assert fixed[0].argmax() == 76
    assert torch.equal(tokenize(["short", long_text]), out)
    assert tok("a b c", context_length=4)[0].tolist() == [49406, 320, 321, 322]


def test_load_modality_text(tmp_path):
    p = tmp_path / "caption.txt"
    p.write_text("a dog", encoding="utf-8")
    batch = load_modality("text", ["a photo of a cat", Path(p), "a dog".encode(), tokenize("x")[0]])
    assert batch.shape == (4, 77) and batch.dtype == torch.int64
    assert torch.equal(batch[1], batch[2])
    with pytest.raises(MediaError, match=r"text item 1 .*missing\.txt"):
        load_modality("text", ["ok", tmp_path / "missing.txt"])
    with pytest.raises(MediaError, match=r"text item 0"):
        load_modality("text", [b"\xff\xfe\xfa"])
