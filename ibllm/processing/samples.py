"""Sample construction and batch collation.

Differences from the official dataset, on purpose:

* no padding per sample: samples are variable length and :func:`collate` pads to the longest sample
  of the batch (the official code pads every sample to ``max_words`` with token 0);
* ignored label positions are ``-100`` (``IGNORE_INDEX``), not 0. The official loss uses
  ``ignore_index=0``, so officially label 0 marks prompt + padding **and** any real token id 0
  (``<unk>``) in an answer is silently ignored too. ``build_sample(..., ignore_unk=True)``
  reproduces that; :func:`to_official` converts a sample to the exact official fixed-length tensors.

Kept from the official procedure: the prompt mask length is the length of the *separately*
tokenised prompt (BOS included) while the tokens come from tokenising ``prompt + answer`` as one
string with BOS and EOS; truncation to ``max_words`` keeps the first ids and can drop EOS.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch

from ibllm.processing.templates import format_conversation

IGNORE_INDEX = -100


class Tokenizer(Protocol):
    """The tokenizer interface the data side needs (SentencePiece-like)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _masked_segment(tokenizer: Tokenizer, prompt: str, answer: str, bos: bool) -> tuple[list[int], list[int]]:
    """Tokens and labels of one prompt/answer segment, official style (joint encoding, EOS appended)."""
    p_ids = tokenizer.encode(prompt, bos=bos, eos=False)
    f_ids = tokenizer.encode(prompt + answer, bos=bos, eos=True)
    n_mask = min(len(p_ids), len(f_ids))
    labels = [IGNORE_INDEX] * n_mask + list(f_ids[n_mask:])
    return list(f_ids), labels


def _finish(tokens: list[int], labels: list[int], max_words: int, ignore_unk: bool) -> dict[str, torch.Tensor]:
    tokens, labels = tokens[:max_words], labels[:max_words]
    if ignore_unk:
        labels = [IGNORE_INDEX if lab == 0 else lab for lab in labels]
    return {"tokens": torch.tensor(tokens, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def build_sample(
    tokenizer: Tokenizer, prompt: str, answer: str, max_words: int, ignore_unk: bool = False
) -> dict[str, torch.Tensor]:
    """Build one training sample exactly as the official dataset does, minus the padding.

    1. ``p_ids = encode(prompt, bos=True, eos=False)``;
    2. ``f_ids = encode(prompt + answer, bos=True, eos=True)`` (one string, one encoding);
    3. keep the first ``max_words`` ids (EOS may be lost);
    4. ``labels = f_ids`` with the first ``len(p_ids)`` positions set to ``IGNORE_INDEX`` (-100).

    Args:
        tokenizer: object with ``encode(text, bos, eos)``.
        prompt: the formatted template (ends with ``### Response:``).
        answer: caption or response, appended directly after the prompt.
        max_words: maximum sequence length.
        ignore_unk: also ignore label positions whose token id is 0 (``<unk>``), as the official
            ``ignore_index=0`` loss does.

    Returns:
        ``{"tokens": LongTensor[L], "labels": LongTensor[L]}`` with ``L <= max_words``.
    """
    tokens, labels = _masked_segment(tokenizer, prompt, answer, bos=True)
    return _finish(tokens, labels, max_words, ignore_unk)


def build_conversation_sample(
    tokenizer: Tokenizer,
    turns: Sequence[tuple[str, str]],
    max_words: int,
    first_input: Optional[str] = None,
    ignore_unk: bool = False,
) -> dict[str, torch.Tensor]:
    """Build a multi-turn sample where only the assistant turns (each followed by EOS) are in the loss.

    The text follows ``templates.format_conversation``. Each turn's ``prompt_part + answer_part`` is
    tokenised as one unit (BOS only on the first turn, EOS after every turn) and its prompt part is
    masked by the length of the separately tokenised prompt part: turn 1 is therefore identical to
    :func:`build_sample` on the official single-turn prompt. The result is truncated to ``max_words``.
    """
    tokens: list[int] = []
    labels: list[int] = []
    for i, (prompt, answer) in enumerate(format_conversation(turns, first_input)):
        seg_tokens, seg_labels = _masked_segment(tokenizer, prompt, answer, bos=(i == 0))
        tokens += seg_tokens
        labels += seg_labels
        if len(tokens) >= max_words:
            break
    return _finish(tokens, labels, max_words, ignore_unk)


def conversation_prompt_ids(
    tokenizer: Tokenizer,
    history: Sequence[tuple[str, str]],
    user: str,
    first_input: Optional[str] = None,
) -> list[int]:
    """Token ids to generate the next assistant turn, consistent with :func:`build_conversation_sample`.

    ``history`` holds the completed ``(user, assistant)`` turns; generation continues after the
    returned ids (which end with the new turn's ``### Response:``).
    """
    parts = format_conversation(list(history) + [(user, "")], first_input)
    ids: list[int] = []
    for i, (prompt, answer) in enumerate(parts[:-1]):
        ids += tokenizer.encode(prompt + answer, bos=(i == 0), eos=True)
    ids += tokenizer.encode(parts[-1][0], bos=(len(parts) == 1), eos=False)
    return ids


def to_official(sample: dict[str, torch.Tensor], max_words: int) -> dict[str, torch.Tensor]:
    """Convert a sample to the official fixed-length form: pad tokens with 0 and use label 0 = ignore."""
    tokens = torch.zeros(max_words, dtype=torch.long)
    labels = torch.zeros(max_words, dtype=torch.long)
    n = min(len(sample["tokens"]), max_words)
    tokens[:n] = sample["tokens"][:n]
    lab = sample["labels"][:n].clone()
    lab[lab == IGNORE_INDEX] = 0
    labels[:n] = lab
    return {"tokens": tokens, "labels": labels}


def collate(samples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Collate variable-length samples into a batch padded to the longest sample.

    Input samples hold ``tokens``/``labels`` (1-D LongTensors) and optionally ``image`` ``[3,H,W]``,
    ``feature`` ``[C]`` (precomputed embedding), ``inject`` (bool), ``caption``/``text``/``key`` (str).

    Returns a dict with:
        ``tokens`` ``[B,S]`` padded with ``pad_id`` (0, what the official model is fed; padding is on
        the right and attention is causal, so no mask is needed), ``labels`` ``[B,S]`` padded with -100,
        ``image`` ``[B,3,H,W]`` when any sample has one (missing ones are zeros, the official stand-in
        for text-only rows), ``feature`` ``[B,C]`` when present, ``inject`` ``[B]`` bool (False = no visual injection
        for that row), and lists ``caption``/``text``/``key`` passed through for logging.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    seq = max(len(s["tokens"]) for s in samples)
    bsz = len(samples)
    tokens = torch.full((bsz, seq), pad_id, dtype=torch.long)
    labels = torch.full((bsz, seq), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["tokens"])
        tokens[i, :n] = s["tokens"]
        labels[i, :n] = s["labels"]
    batch: dict[str, Any] = {"tokens": tokens, "labels": labels}
    for name in ("image", "feature"):
        present = [s.get(name) for s in samples]
        if any(x is not None for x in present):
            ref = next(x for x in present if x is not None)
            batch[name] = torch.stack([x if x is not None else torch.zeros_like(ref) for x in present])
    batch["inject"] = torch.tensor([bool(s.get("inject", True)) for s in samples], dtype=torch.bool)
    for name in ("caption", "text", "key"):
        if any(name in s for s in samples):
            batch[name] = [s.get(name) for s in samples]
    return batch
