"""Prompt templates, sample construction (prompt tokens masked out of the loss, answer + EOS kept) and collation."""

from __future__ import annotations

import torch
import pytest

from ibllm.processing.samples import (
    IGNORE_INDEX,
    build_conversation_sample,
    build_sample,
    collate,
    conversation_prompt_ids,
    to_official,
)
from ibllm.processing.templates import (
    CAPTION_INSTRUCTION,
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    caption_prompt,
    format_conversation,
    format_prompt,
    strip_image_placeholder,
)


class CharTok:
    """Char-level tokenizer: BOS=1, EOS=2, char c -> 3 + ord(c); optional merge of one char pair."""

    bos_id, eos_id = 1, 2

    def __init__(self, merge: str | None = None, unk: str | None = None) -> None:
        self.merge, self.unk = merge, unk

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if self.merge and text.startswith(self.merge, i):
                ids.append(1000)
                i += len(self.merge)
                continue
            ids.append(0 if text[i] == self.unk else 3 + ord(text[i]))
            i += 1
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) for i in ids if 3 <= i < 1000)


def c(ch: str) -> int:
    return 3 + ord(ch)


def test_templates_exact() -> None:
    assert PROMPT_NO_INPUT.startswith("Below is an instruction that describes a task. Write a response")
    assert format_prompt("Do X") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X\n\n### Response:"
    )
    assert format_prompt("Do X", "") == format_prompt("Do X", None) == PROMPT_NO_INPUT.format(instruction="Do X")
    assert format_prompt("Do X", "ctx") == PROMPT_INPUT.format(instruction="Do X", input="ctx")
    assert format_prompt("Do X", "ctx").endswith("### Instruction:\nDo X\n\n### Input:\nctx\n\n### Response:")
    assert caption_prompt() == format_prompt(CAPTION_INSTRUCTION)
    assert CAPTION_INSTRUCTION == "Generate caption of this image"


def test_format_conversation() -> None:
    parts = format_conversation([("u1", "a1"), ("u2", "a2")])
    assert parts[0] == (format_prompt("u1"), "a1")
    assert parts[1] == ("\n\n### Instruction:\nu2\n\n### Response:", "a2")
    assert format_conversation([("u", "a")], first_input="in")[0][0] == format_prompt("u", "in")
    assert strip_image_placeholder("<image>\nWhat is it?") == "What is it?"
    assert strip_image_placeholder("What is it?\n<image>") == "What is it?"
    with pytest.raises(ValueError):
        format_conversation([])


def test_build_sample_hand_derived() -> None:
    s = build_sample(CharTok(), "ab", "cd", max_words=96)
    assert s["tokens"].tolist() == [1, c("a"), c("b"), c("c"), c("d"), 2]
    assert s["labels"].tolist() == [-100, -100, -100, c("c"), c("d"), 2]
    assert s["tokens"].dtype == torch.long


def test_build_sample_truncation_drops_eos() -> None:
    s = build_sample(CharTok(), "ab", "cd", max_words=4)
    assert s["tokens"].tolist() == [1, c("a"), c("b"), c("c")]
    assert s["labels"].tolist() == [-100, -100, -100, c("c")]
    s = build_sample(CharTok(), "abcdef", "g", max_words=4)
    assert s["labels"].tolist() == [-100] * 4


def test_mask_uses_separate_prompt_length() -> None:
    # "bc" merges only in the joint encoding; as in the official code, the mask still covers
    # len(encode(prompt)) = 3 positions (the prompt's separate tokenisation sets the mask length).
    s = build_sample(CharTok(merge="bc"), "ab", "cd", max_words=96)
    assert s["tokens"].tolist() == [1, c("a"), 1000, c("d"), 2]
    assert s["labels"].tolist() == [-100, -100, -100, c("d"), 2]


def test_ignore_unk_and_official_form() -> None:
    s = build_sample(CharTok(unk="?"), "ab", "c?", max_words=96, ignore_unk=True)
    assert s["labels"].tolist() == [-100, -100, -100, c("c"), -100, 2]
    off = to_official(build_sample(CharTok(), "ab", "cd", 96), max_words=8)
    assert off["tokens"].tolist() == [1, c("a"), c("b"), c("c"), c("d"), 2, 0, 0]
    assert off["labels"].tolist() == [0, 0, 0, c("c"), c("d"), 2, 0, 0]


def test_build_sample_sentencepiece(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")
    words = "a cat dog sat on the mat generate caption of this image below is an instruction that describes task"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{words} {i} ### Response: Instruction" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=80, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))

    class Adapter:
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=True, eos=False):
            return [1] * bos + proc.encode(text) + [2] * eos

        def decode(self, ids):
            return proc.decode(list(ids))

    tok, prompt = Adapter(), caption_prompt()
    s = build_sample(tok, prompt, "a cat sat on the mat", 96)
    full = tok.encode(prompt + "a cat sat on the mat", True, True)
    n_p = len(tok.encode(prompt, True, False))
    assert s["tokens"].tolist() == full[:96]
    assert s["labels"][:n_p].eq(IGNORE_INDEX).all()
    assert s["labels"][n_p:].tolist() == full[n_p:96]


def test_conversation_masks_only_assistant_turns() -> None:
    tok = CharTok()
    turns = [("hi", "yo"), ("q2", "a2")]
    s = build_conversation_sample(tok, turns, max_words=1000)
    (p1, a1), (p2, a2) = format_conversation(turns)
    expected = tok.encode(p1 + a1, True, True) + tok.encode(p2 + a2, False, True)
    assert s["tokens"].tolist() == expected
    kept = s["labels"][s["labels"] != IGNORE_INDEX].tolist()
    assert kept == [c("y"), c("o"), 2, c("a"), c("2"), 2]
    one = build_conversation_sample(tok, turns[:1], 1000)
    assert torch.equal(one["tokens"], build_sample(tok, format_prompt("hi"), "yo", 1000)["tokens"])
    prefix = conversation_prompt_ids(tok, turns[:1], "q2")
    assert s["tokens"].tolist()[: len(prefix)] == prefix
    short = build_conversation_sample(tok, turns, max_words=20)
    assert len(short["tokens"]) == 20


def test_collate_pads_to_longest() -> None:
    tok = CharTok()
    a = build_sample(tok, "ab", "cd", 96) | {"image": torch.ones(3, 4, 4), "caption": "cd", "inject": True}
    b = build_sample(tok, "ab", "cdefgh", 96) | {"caption": "cdefgh", "inject": False}
    batch = collate([a, b])
    assert batch["tokens"].shape == (2, 10)  # longest sample, not max_words
    assert batch["tokens"][0, 6:].eq(0).all() and batch["labels"][0, 6:].eq(IGNORE_INDEX).all()
    assert batch["image"].shape == (2, 3, 4, 4) and batch["image"][1].eq(0).all()
    assert batch["inject"].tolist() == [True, False]
    assert batch["caption"] == ["cd", "cdefgh"]
    assert "feature" not in batch
    f = collate([a | {"feature": torch.ones(5)}, b | {"feature": torch.zeros(5)}])
    assert f["feature"].shape == (2, 5)
