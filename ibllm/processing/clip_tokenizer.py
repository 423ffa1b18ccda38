"""CLIP byte-level BPE tokenizer for the ImageBind text tower."""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_BPE_PATH = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # 48894
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable-character map, in vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the other 68
    bytes map, in increasing order, to ``chr(256 + n)``. Dict order = vocabulary order of the 256 base ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean_text(text: str) -> str:
    """``ftfy.fix_text``, HTML-unescape twice, collapse whitespace runs, strip, lowercase."""
    import re

    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP BPE tokenizer: ``tok(texts) -> [B, context_length]`` int64 (``<sot> tokens <eot>`` zero-padded).

    Vocabulary (49408 ids): 256 byte symbols, the same with ``</w>``, the 48894 merges in rank order,
    then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.

    ``keep_eot_on_truncate=False`` (default) reproduces the official behaviour: a sequence longer than
    the context is cut at ``context_length`` and loses its EOT, so the text tower's EOT-argmax pooling
    reads an ordinary token (a defect inherited from ImageBind). ``True`` cuts to ``context_length - 1`` tokens and re-appends EOT.
    """

    sot_token = 49406
    eot_token = 49407

    def __init__(self, bpe_path: str | Path = DEFAULT_BPE_PATH, keep_eot_on_truncate: bool = False) -> None:
        import regex

        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1: NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self.keep_eot_on_truncate = keep_eot_on_truncate
        assert self.encoder[SOT] == self.sot_token and self.encoder[EOT] == self.eot_token

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """Merge one byte-mapped pre-token by lowest merge rank; returns space-separated symbols."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        if len(self.cache) < 100_000:
            self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Clean, pre-tokenise and BPE-encode one text (no SOT/EOT)."""
        ids: list[int] = []
        for piece in self.pattern.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: list[int] | Tensor) -> str:
        """Ids back to text (``</w>`` becomes a space; SOT/EOT/padding zeros are dropped)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[i] for i in ids if i not in (0, self.sot_token, self.eot_token))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str], context_length: int = 77) -> Tensor:
        """Tokenise one text or a list -> ``[B, context_length]`` int64, ``[sot] + ids + [eot]``, zero-padded."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token, *self.encode(text), self.eot_token]
            if len(ids) > context_length and self.keep_eot_on_truncate:
                ids = ids[: context_length - 1] + [self.eot_token]
            ids = ids[:context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=2)
def default_tokenizer(keep_eot_on_truncate: bool = False) -> ClipTokenizer:
    """A process-wide tokenizer on the packaged merge list (loading it takes a fraction of a second)."""
    return ClipTokenizer(keep_eot_on_truncate=keep_eot_on_truncate)


def tokenize(texts: str | list[str], context_length: int = 77, keep_eot_on_truncate: bool = False) -> Tensor:
    """``default_tokenizer()(texts)`` -> ``[B, context_length]`` int64."""
    return default_tokenizer(keep_eot_on_truncate)(texts, context_length)
