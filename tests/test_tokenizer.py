"""Tokenizers: a SentencePiece model trained here, HF tokenizer.json, GGUF BPE (tiny and the real SmolLM2)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ibllm.checkpoints import CheckpointError
from ibllm.tokenizer import (
    HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, tokenizer_from_gguf,
)

ROUND_TRIP = [
    "The capital of France is",
    "Hello, world! It's 2024; prices rose 3.5% (see §2).",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "naïve café, 日本語 and emoji 🙂",
    "### Instruction:\nDescribe the 3D object in detail.\n\n### Response:",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A ~100-piece SentencePiece model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "image", "caption", "of", "red", "blue", "big"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=100, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2,
    )
    return d / "tokenizer.model"


def test_sentencepiece(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None) and 50 <= tok.vocab_size <= 100
    text = "The cat sat on a red mat."
    plain = tok.encode(text, bos=False)
    assert tok.encode(text) == [1] + plain
    assert tok.encode(text, bos=True, eos=True) == [1] + plain + [2]
    assert 0 not in plain and tok.decode(plain) == text
    assert tok.decode(tok.encode(text, eos=True)) == text  # BOS/EOS decode to nothing


def test_load_tokenizer_dispatch(sp_model, tmp_path):
    assert isinstance(load_tokenizer(sp_model), SentencePieceTokenizer)
    model_dir = sp_model.parent / "7B"  # Meta layout: tokenizer.model beside the model folders
    model_dir.mkdir(exist_ok=True)
    assert isinstance(load_tokenizer(model_dir), SentencePieceTokenizer)
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def byte_level_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    return {c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, **byte_level_vocab()}
    vocab["</s>"] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<s>", "</s>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, len(vocab) - 1, None)
    ids = tok.encode("hi there", eos=True)
    assert ids[0] == 0 and ids[-1] == tok.eos_id and tok.decode(ids) == "hi there"


def write_gguf_tokenizer(path: Path) -> None:
    """A tiny GGUF holding only gpt2 tokenizer metadata: bytes, a few merges and one control token."""
    import gguf

    vocab = ["<|endoftext|>", *sorted(byte_level_vocab(), key=byte_level_vocab().get)]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at"]
    vocab += ["Ġt", "he", "Ġthe", "Ġc", "at", "Ġcat"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab)
    w.add_token_types([3] + [1] * (len(vocab) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_tokenizer(tmp_path):
    write_gguf_tokenizer(tmp_path / "tok.gguf")
    tok = load_tokenizer(tmp_path / "tok.gguf")
    raw = tok.tokenizer
    ids = tok.encode("a the cat", bos=False)
    assert [raw.id_to_token(i) for i in ids] == ["a", "Ġthe", "Ġcat"]
    assert tok.encode("x<|endoftext|>", bos=False)[-1] == 0
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s)) == s


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


def test_smollm2_gguf_tokenizer(smol):
    assert (smol.bos_id, smol.eos_id, smol.vocab_size) == (1, 2, 49152) and not smol.add_bos
    ids = smol.encode("The capital of France is", bos=False)
    assert [smol.tokenizer.id_to_token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert smol.encode("The capital of France is") == [1] + ids
    digits = smol.encode("2024", bos=False)
    assert [smol.tokenizer.id_to_token(i) for i in digits] == ["2", "0", "2", "4"]  # llama.cpp 'smollm' split
    chat = smol.encode("<|im_start|>user\nhi<|im_end|>", bos=False)
    assert chat[0] == 1 and chat[-1] == 2
    for s in ROUND_TRIP:
        assert smol.decode(smol.encode(s, eos=True)) == s, s


def test_gguf_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        tokenizer_from_gguf(tmp_path / "none.gguf")
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "no_tok.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"no_tok\.gguf.*tokenizer\.ggml\.model"):
        tokenizer_from_gguf(tmp_path / "no_tok.gguf")

    w = gguf.GGUFWriter(str(tmp_path / "broken.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_token_merges(["a c"])
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"broken\.gguf.*tokenizer"):
        tokenizer_from_gguf(tmp_path / "broken.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF garbage")
    with pytest.raises(CheckpointError, match=r"bad\.gguf"):
        tokenizer_from_gguf(tmp_path / "bad.gguf")


def test_decode_drops_ids_past_the_vocabulary(tmp_path):
    """A model whose output layer is larger than the tokenizer (padded vocab) must not crash decoding."""
    import sentencepiece as spm

    from ibllm.tokenizer import SentencePieceTokenizer

    (tmp_path / "c.txt").write_text("\n".join(["red green blue square circle"] * 50))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "m"), vocab_size=18,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    tok = SentencePieceTokenizer(tmp_path / "m.model")
    ids = tok.encode("red square", bos=False)
    assert tok.decode(ids + [tok.vocab_size + 5]) == tok.decode(ids) == "red square"
