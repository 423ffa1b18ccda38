"""Reading stage-2 instruction files (Alpaca, LLaVA, ShareGPT; see :mod:`datamodules.instructions`) into
checked, normalised records.

A file that cannot be used at all (missing, empty, neither JSON nor JSON lines, not a list of objects, a
bad YAML ``META`` config) raises :class:`~ibllm.files.InputError` naming it and the problem. A single bad
item never stops a run, and is never trained on in a garbled form: it is skipped, counted under a reason
and logged with its file and index:

* ``malformed_item``: wrong structure or value types (``"instruction": 42``, ``conversations`` that is not
  a list, a turn whose text is not a string, an unknown role);
* ``missing_image``: its image file does not exist;
* ``no_turn``: no complete user -> assistant exchange.
"""

from __future__ import annotations

import json
import logging
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ibllm.files import InputError
from ibllm.processing.templates import strip_image_placeholder

log = logging.getLogger(__name__)

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot", "chatgpt", "model"}
SKIP_ROLES = {"system"}
LOGGED_PER_FILE = 5  # malformed items logged one by one per file; the rest only counted
Files = Union[str, Path, Sequence[Union[str, Path]]]


class MalformedItem(ValueError):
    """An instruction item whose structure or value types are wrong (the message says which field)."""


@dataclass
class InstructionRecord:
    """One normalised item: ``(user, assistant)`` turns, optional Alpaca input, optional image path.

    ``official`` marks records that must be built exactly like the official single-turn sample
    (prompt = ``format_prompt(first human value)`` verbatim).
    """

    turns: list[tuple[str, str]]
    input: Optional[str] = None
    image: Optional[str] = None
    official: bool = False


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedItem(f"{where} must be a string, got {_shown(value)}")
    return value


def _message(messages: Sequence[Any], j: int) -> tuple[str, Optional[str]]:
    """``(role, text)`` of message ``j``; text None for a system message."""
    m = messages[j]
    if not isinstance(m, dict):
        raise MalformedItem(f"message {j} must be an object, got {_shown(m)}")
    role = m.get("from", m.get("role"))
    role = _text(role, f"message {j} 'from'/'role'").lower()
    if role in SKIP_ROLES:
        return role, None
    if role not in USER_ROLES | ASSISTANT_ROLES:
        raise MalformedItem(f"message {j}: unknown conversation role {role!r}")
    key = "value" if "value" in m else "content"
    if key not in m:
        raise MalformedItem(f"message {j} has no 'value' (or 'content')")
    return role, _text(m[key], f"message {j} {key!r}")


def _pair_turns(messages: Sequence[Any]) -> list[tuple[str, str]]:
    """Pair consecutive user -> assistant messages; drops system messages and unanswered user turns."""
    turns: list[tuple[str, str]] = []
    pending: Optional[str] = None
    for j in range(len(messages)):
        role, text = _message(messages, j)
        if text is None:
            continue
        if role in USER_ROLES:
            pending = text if pending is None else pending + "\n" + text
        elif pending is not None:
            turns.append((pending, text))
            pending = None
    return turns


def parse_item(item: Any, image_root: Optional[Path], official_first_turn: bool = False) -> Optional[InstructionRecord]:
    """Normalise one JSON item (Alpaca / LLaVA / ShareGPT); None if it holds no complete turn.

    Raises :class:`MalformedItem` when its structure or value types are wrong.
    """
    if not isinstance(item, dict):
        raise MalformedItem(f"expected an object, got {_shown(item)}")
    image = item.get("image")
    if image is not None:
        path = Path(_text(image, "'image'"))
        image = str(path if path.is_absolute() or image_root is None else image_root / path)
    if "instruction" in item:
        instruction = _text(item["instruction"], "'instruction'")
        output = _text(item.get("output", ""), "'output'")
        extra = item.get("input")
        extra = None if extra is None else _text(extra, "'input'")
        return InstructionRecord([(instruction, output)], extra or None, image)
    name = "conversations" if "conversations" in item else "messages"
    messages = item.get(name)
    if messages is None:
        raise MalformedItem(f"neither 'instruction' nor 'conversations'/'messages' (keys {sorted(map(str, item))})")
    if not isinstance(messages, list):
        raise MalformedItem(f"{name!r} must be a list, got {_shown(messages)}")
    if official_first_turn and image is not None:
        if len(messages) < 2:
            return None
        first = [m.get("value") if isinstance(m, dict) else m for m in messages[:2]]
        return InstructionRecord([(_text(first[0], "message 0 'value'"), _text(first[1], "message 1 'value'"))],
                                 None, image, official=True)
    turns = [(strip_image_placeholder(u), a) for u, a in _pair_turns(messages)]
    return InstructionRecord(turns, None, image) if turns else None


def expand_files(files: Files) -> list[Path]:
    """A file, a list of files, or a YAML data config (one key, ``META``: a list of file paths, relative to the
    YAML file unless absolute), flattened."""
    if isinstance(files, (str, Path)):
        files = [files]
    out: list[Path] = []
    for f in files:
        p = Path(f)
        if p.suffix in (".yaml", ".yml"):
            meta = _read_meta(p)
            out += expand_files([Path(x) if Path(x).is_absolute() else p.parent / x for x in meta])
        else:
            out.append(p)
    return out


def _read_meta(path: Path) -> list[str]:
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: instruction data config not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read instruction data config ({' '.join(str(e).split())})") from None
    files = meta.get("META", []) if isinstance(meta, dict) else None
    if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
        raise InputError(f"{path}: expected a mapping with META: a list of instruction file paths")
    return files


def read_items(path: Path) -> list[Any]:
    """The items of one instruction file: a JSON list (or one object), or JSON lines; InputError naming the
    file when it is missing, unreadable, empty or not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: instruction file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected an instruction file (JSON)") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read instruction file ({e.strerror or e})") from None
    if not text.strip():
        raise InputError(f"{path}: instruction file is empty")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as whole:
        items = _json_lines(path, text, whole)
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of items (or one JSON object per line), "
                         f"got {type(items).__name__}")
    return items


def _json_lines(path: Path, text: str, whole: json.JSONDecodeError) -> list[Any]:
    as_document = InputError(f"{path}: invalid JSON at line {whole.lineno}, column {whole.colno}: {whole.msg}")
    if text.lstrip().startswith("["):
        raise as_document
    items: list[Any] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not items:  # not JSON lines either: the document's own error says more
                raise as_document from None
            raise InputError(f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno}) in a file of "
                             "one JSON object per line") from None
    return items


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def load_instruction_records(files: Files, image_root: Optional[Union[str, Path]] = None,
                             official_first_turn: bool = False, check_images: bool = True
                             ) -> tuple[list[InstructionRecord], dict[str, int]]:
    """Records of every usable item in ``files`` and the ``{reason: count}`` of the items skipped.

    Raises :class:`~ibllm.files.InputError` for an unusable file, and when no item at all is usable (naming
    the files, the skip counts and the first problem met).
    """
    records: list[InstructionRecord] = []
    totals: dict[str, int] = {}
    first_problem: Optional[str] = None
    paths = expand_files(files)
    for path in paths:
        items = read_items(path)
        root = Path(image_root) if image_root is not None else path.parent
        counts: dict[str, int] = {}
        for i, item in enumerate(items):
            try:
                rec = parse_item(item, root, official_first_turn)
            except MalformedItem as e:
                _count(counts, "malformed_item")
                first_problem = first_problem or f"{path}: item {i}: {e}"
                if counts["malformed_item"] <= LOGGED_PER_FILE:
                    log.warning("%s: item %d skipped (malformed): %s", path, i, e)
                continue
            if rec is None:
                _count(counts, "no_turn")
                continue
            if check_images and rec.image is not None and not Path(rec.image).is_file():
                _count(counts, "missing_image")
                first_problem = first_problem or f"{path}: item {i}: image {rec.image} not found"
                continue
            records.append(rec)
        if counts:
            log.warning("%s: skipped %s of %d items", path,
                        ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())), len(items))
        for reason, n in counts.items():
            totals[reason] = totals.get(reason, 0) + n
    if not records:
        names = ", ".join(str(p) for p in paths) or repr(files)
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(totals.items())) or "no items"
        raise InputError(f"no usable instruction items in {names} ({skipped})"
                         + (f"; first: {first_problem}" if first_problem else ""))
    return records, totals


def load_records(files: Files, image_root: Optional[Union[str, Path]] = None, official_first_turn: bool = False,
                 check_images: bool = True) -> list[InstructionRecord]:
    """Load and concatenate instruction files (JSON list or JSON-lines) into records.

    Args:
        files: JSON files (or a YAML ``META`` config) in any of the supported formats, concatenated.
        image_root: directory relative image paths are resolved against (default: each file's folder).
        official_first_turn: LLaVA items keep ``<image>`` and only their first exchange.
        check_images: drop (and count) items whose image file does not exist.

    Bad items are skipped and logged (see the module docstring); an unusable file, or files with no usable
    item at all, raise :class:`~ibllm.files.InputError`.
    """
    return load_instruction_records(files, image_root, official_first_turn, check_images)[0]
