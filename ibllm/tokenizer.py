"""Tokenizers behind one small interface: LLaMA SentencePiece, Hugging Face ``tokenizer.json``, and the
GPT-2-style byte-level BPE stored in GGUF metadata (SmolLM2).

BOS/EOS are never added by the underlying library: :meth:`Tokenizer.encode` adds them from its flags, as
the official SentencePiece wrapper does. Decoding drops control tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ibllm.files import CheckpointError, PathLike, gguf_field, open_gguf

log = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int | None
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _with_flags(ids: list[int], bos_id: int, eos_id: int, bos: bool, eos: bool) -> list[int]:
    return ([bos_id] if bos else []) + ids + ([eos_id] if eos else [])


class SentencePieceTokenizer:
    """LLaMA's SentencePiece ``tokenizer.model`` (bos 1, eos 2, unk 0, no pad piece: ``pad_id`` is None)."""

    def __init__(self, model_path: PathLike) -> None:
        import sentencepiece as spm

        p = Path(model_path)
        if not p.is_file():
            raise CheckpointError(f"SentencePiece tokenizer file not found: {p}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(p))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read SentencePiece tokenizer file {p}: {e}") from e
        self.path = p
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        pad = self.sp.pad_id()
        self.pad_id: int | None = pad if pad >= 0 else None
        self.add_bos = True  # LLaMA prompts start with BOS

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS/EOS added as the flags say."""
        return _with_flags(self.sp.encode(text), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (BOS/EOS/control pieces decode to nothing; ids past the vocabulary, which a model
        with a padded output layer can emit, are dropped)."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (e.g. an HF ``tokenizer.json``) with explicit BOS/EOS/pad ids."""

    def __init__(self, tokenizer: Any, bos_id: int, eos_id: int, pad_id: int | None = None,
                 add_bos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # Whether the model was trained with a BOS in front (informational; encode() obeys its flag).
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, path: PathLike) -> "HFTokenizer":
        """Load ``tokenizer.json``; BOS/EOS/pad come from ``tokenizer_config.json`` / ``config.json`` beside it
        when present, else from the usual special-token spellings."""
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"tokenizer.json file not found: {p}")
        try:
            tok = _Tok.from_file(str(p))
        except Exception as e:
            raise CheckpointError(f"cannot read tokenizer file {p}: {e}") from e
        bos, eos, pad = _hf_special_ids(tok, p.parent)
        if eos is None:
            raise CheckpointError(f"tokenizer file {p}: cannot determine the EOS token id")
        return cls(tok, bos if bos is not None else eos, eos, pad, add_bos=bos is not None)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in the text map to their ids), BOS/EOS by flag."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return _with_flags(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _hf_special_ids(tok: Any, folder: Path) -> tuple[int | None, int | None, int | None]:
    ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for name in ids:
            value = cfg.get(f"{name}_token_id")
            ids[name] = value[0] if isinstance(value, list) and value else value
    tcfg_path = folder / "tokenizer_config.json"
    if tcfg_path.is_file():
        tcfg = json.loads(tcfg_path.read_text(encoding="utf-8"))
        for name in ids:
            token = tcfg.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tok.token_to_id(token) is not None:
                ids[name] = tok.token_to_id(token)
    fallbacks = {"bos": ("<s>", "<|begin_of_text|>"), "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>")}
    for name, spellings in fallbacks.items():
        for s in spellings:
            if ids[name] is None and tok.token_to_id(s) is not None:
                ids[name] = tok.token_to_id(s)
    return ids["bos"], ids["eos"], ids["pad"]


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) grouped by the split they perform.
_GPT2_PRE = {"default", "gpt-2", "gpt2", "phi-2", "roberta-bpe", "olmo", "jina-en", "jina-es", "jina-de",
             "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "mpt", "falcon3"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "smaug-bpe"}
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4


def _byte_level_pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:  # llama.cpp: split every digit, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre not in _GPT2_PRE:
        log.warning("GGUF pre-tokenizer %r is not known here; using the GPT-2 split", pre)
    return gpt2


def tokenizer_from_gguf(path: PathLike) -> HFTokenizer:
    """Build the GPT-2-style byte-level BPE tokenizer stored in a GGUF file's metadata.

    Uses ``tokenizer.ggml.{tokens,merges,token_type,bos_token_id,eos_token_id,padding_token_id,pre}``;
    control and user-defined tokens become added (special) tokens, so ``<|im_start|>`` in text maps to its id.
    """
    from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models

    reader = open_gguf(path)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF file {path}: tokenizer model {kind!r} is not supported (only 'gpt2' BPE)")
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        log.warning("GGUF file %s: %d duplicate token strings; the first id of each is used",
                    path, len(tokens) - len(vocab))
    try:
        tok = _Tok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception for inconsistent merges
        raise CheckpointError(f"GGUF file {path}: invalid BPE tokenizer metadata ({e})") from e
    tok.pre_tokenizer = _byte_level_pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    eos = int(gguf_field(reader, "tokenizer.ggml.eos_token_id"))
    bos = int(gguf_field(reader, "tokenizer.ggml.bos_token_id", eos))
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id", None)
    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", True))
    return HFTokenizer(tok, bos, eos, int(pad) if pad is not None else None, add_bos=add_bos)


def find_tokenizer(directory: PathLike) -> Path | None:
    """The tokenizer file belonging to a model folder: ``tokenizer.model`` here or in the parent
    (where Meta releases keep it), else ``tokenizer.json`` here (Hugging Face); None when there is none."""
    d = Path(directory)
    for candidate in (d / "tokenizer.model", d.parent / "tokenizer.model", d / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a tokenizer from ``*.model`` (SentencePiece), ``*.gguf``, ``tokenizer.json``, or a model folder
    (``tokenizer.model`` there or in its parent, else ``tokenizer.json``, else a single ``.gguf``)."""
    p = Path(path)
    if p.is_dir():
        found = find_tokenizer(p)
        ggufs = sorted(p.glob("*.gguf"))
        if found is None and len(ggufs) == 1:
            found = ggufs[0]
        if found is None:
            raise CheckpointError(f"no tokenizer.model, tokenizer.json or .gguf file in {p} (or tokenizer.model "
                                  f"in its parent)")
        p = found
    if not p.exists():
        raise CheckpointError(f"tokenizer file not found: {p}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".gguf":
        return tokenizer_from_gguf(p)
    if p.suffix == ".json":
        return HFTokenizer.from_file(p)
    raise CheckpointError(f"{p}: unrecognised tokenizer file (expected .model, .gguf or tokenizer.json)")
