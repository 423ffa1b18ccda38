"""OpenAI ``messages`` -> the project's multi-turn prompt, and client media -> loaded input tensors.

Mapping
-------
* ``system`` / ``developer`` messages are joined (blank line between) and put before the first user
  message's text, separated by a blank line: the project's template has no system slot, and the first
  instruction is where a model trained on it reads the task.
* Consecutive messages of one role are joined; then ``user`` and ``assistant`` must alternate, starting
  and ending with ``user``. Completed ``(user, assistant)`` pairs become the history of
  :func:`~ibllm.processing.samples.conversation_prompt_ids`, so a conversation without a system message
  gets exactly the ids ``ChatSession.prompt_ids`` gives.
* Media from every user message (and the ``inputs`` extension field, applied last) are mixed into the one
  visual token that conditions the conversation; a later item of a modality replaces an earlier one, two
  of one modality in the same message are refused.

Media policy
------------
Bytes come from base64 (``data:`` URLs, ``input_audio``, ``inputs[].data``) or from a file inside the
media folder given at start-up (``--media-dir``); any other path, ``file://`` outside it, and every
remote URL are refused, and nothing is ever fetched. Media is always decoded from bytes in memory (never
handed to a decoder as a path). Audio and video must start with the signature of a container this server
accepts, so FFmpeg's format probing never sees playlists or concat scripts (which could name other files).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from torch import Tensor

from ibllm.models.ibllm import MODALITY_BRANCH
from ibllm.processing import MediaError, load_modality
from ibllm.processing.samples import conversation_prompt_ids
from ibllm.server.schemas import APIError, AudioPart, ChatCompletionRequest, ImagePart, ServerConfig, TextPart

SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")


@dataclass
class Prepared:
    """A validated request, ready for the scheduler: prompt ids, loaded inputs and sampling settings."""

    ids: list[int]
    inputs: dict[str, tuple[Tensor, float]] = field(default_factory=dict)  # modality -> ([1, ...], weight)
    cache: Any = None  # the visual cache object to encode with, or None
    max_tokens: int = 128
    temperature: float = 0.1
    top_p: float = 0.75
    seed: int | None = None
    stops: list[str] = field(default_factory=list)


# ---- bytes from the client ---------------------------------------------------------------------------------


def b64decode(data: str, what: str) -> bytes:
    """Strict base64 (whitespace ignored) -> bytes; a 400 naming ``what`` otherwise."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{what}: not valid base64 ({e})", code="invalid_base64") from None
    if not raw:
        raise APIError(400, f"{what}: empty data", code="invalid_media")
    return raw


def read_media_file(ref: str, config: ServerConfig, what: str) -> bytes:
    """The bytes of ``ref`` (a path or ``file://`` URL) when it lies inside the media folder."""
    if config.media_dir is None:
        raise APIError(400, f"{what}: local files are not allowed (the server was started without --media-dir); "
                            "send the data base64-encoded", code="local_files_disabled")
    if ref.startswith("file:"):
        parsed = urlparse(ref)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(400, f"{what}: remote URLs are not fetched ({parsed.netloc})", code="remote_url")
        ref = unquote(parsed.path)
    if "\x00" in ref or not ref:
        raise APIError(400, f"{what}: invalid path", code="invalid_path")
    root = config.media_dir
    path = Path(ref)
    full = (path if path.is_absolute() else root / path).resolve()  # symlinks resolved before the check
    if not full.is_relative_to(root):
        raise APIError(403, f"{what}: path {ref!r} is outside the allowed media folder", code="path_not_allowed",
                       kind="permission_error")
    if not full.is_file():
        raise APIError(400, f"{what}: no file {ref!r} in the media folder", code="file_not_found")
    if full.stat().st_size > config.max_body_bytes:
        raise APIError(413, f"{what}: file {ref!r} is larger than the size limit ({config.max_body_bytes} bytes)",
                       code="payload_too_large")
    return full.read_bytes()


def image_bytes(url: str, config: ServerConfig, what: str) -> bytes:
    """Bytes of an ``image_url``: a base64 ``data:`` URL or a file in the media folder; never fetched."""
    scheme = SCHEME.match(url)
    name = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None
    if name == "data":
        head, sep, payload = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise APIError(400, f"{what}: a data: URL must be base64 (data:image/png;base64,...)", code="invalid_media")
        mime = head[5:].split(";")[0].lower()
        if mime and not mime.startswith("image/"):
            raise APIError(400, f"{what}: data: URL of type {mime!r}, expected image/*", code="invalid_media")
        return b64decode(payload, what)
    if name in ("http", "https", "ftp", "ftps", "ws", "wss"):
        raise APIError(400, f"{what}: remote URLs are not fetched ({name}://...); send the image as a base64 "
                            "data: URL", code="remote_url")
    if name not in (None, "file"):
        raise APIError(400, f"{what}: unsupported URL scheme {name!r}", code="invalid_url")
    return read_media_file(url, config, what)


def _check_container(modality: str, raw: bytes, what: str) -> None:
    """Audio / video bytes must carry a container signature (see the module docstring)."""
    if modality == "audio":
        ok = (raw[:4] == b"RIFF" and raw[8:12] == b"WAVE") or raw[:4] in (b"fLaC", b"OggS") or raw[:3] == b"ID3" \
            or (len(raw) > 1 and raw[0] == 0xFF and raw[1] & 0xE0 == 0xE0)
        if not ok:
            raise APIError(400, f"{what}: undecodable audio (expected WAV, FLAC, OGG or MP3 data)",
                           code="invalid_media")
    elif modality == "video":
        ok = raw[4:8] == b"ftyp" or raw[:4] == b"\x1aE\xdf\xa3" or (raw[:4] == b"RIFF" and raw[8:11] == b"AVI")
        if not ok:
            raise APIError(400, f"{what}: undecodable video (expected MP4/MOV, WebM/MKV or AVI data)",
                           code="invalid_media")


def load_input(modality: str, payload: bytes | str, what: str) -> Tensor:
    """Decode one client item into a ``[1, ...]`` tensor; a decoder failure is a 400 naming ``what``."""
    if isinstance(payload, bytes):
        _check_container(modality, payload, what)
    try:
        return load_modality(modality, [payload])
    except MediaError as e:
        raise APIError(400, f"{what}: undecodable {modality}: {e.reason}", code="invalid_media") from None


# ---- messages ------------------------------------------------------------------------------------------------


def _parts(content: Any) -> list[Any]:
    if content is None:
        return []
    return [TextPart(type="text", text=content)] if isinstance(content, str) else list(content)


def map_messages(req: ChatCompletionRequest, config: ServerConfig
                 ) -> tuple[list[tuple[str, str]], str, dict[str, tuple[bytes | str, str]]]:
    """``(history, question, media)``: completed turns, the last user text, and the raw media per modality
    as ``{modality: (payload, description)}`` (see the module docstring for the rules)."""
    system: list[str] = []
    merged: list[tuple[str, list[str], list[tuple[int, Any]]]] = []  # (role, texts, media parts)
    for i, msg in enumerate(req.messages):
        parts = _parts(msg.content)
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        media = [(i, p) for p in parts if not isinstance(p, TextPart)]
        if msg.role in ("system", "developer"):
            if media:
                raise APIError(400, f"messages[{i}]: a {msg.role} message may only hold text", param="messages")
            system.append("\n".join(texts))
            continue
        if msg.role == "assistant" and media:
            raise APIError(400, f"messages[{i}]: an assistant message may only hold text", param="messages")
        if msg.role == "user" and not texts and not media:
            raise APIError(400, f"messages[{i}]: the user message has no content", param="messages")
        if merged and merged[-1][0] == msg.role:
            merged[-1][1].extend(texts)
            merged[-1][2].extend(media)
        else:
            merged.append((msg.role, texts, media))
    if not merged or merged[0][0] != "user":
        raise APIError(400, "messages: the conversation must start with a user message (after any system "
                            "messages)", param="messages")
    if merged[-1][0] != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    texts = ["\n".join(t) for _, t, _ in merged]
    if system:
        texts[0] = "\n\n".join(system + [texts[0]]) if texts[0] else "\n\n".join(system)
    history = [(texts[j], texts[j + 1].strip()) for j in range(0, len(texts) - 1, 2)]
    media: dict[str, tuple[bytes | str, str]] = {}
    for role, _, parts in merged:
        seen: set[str] = set()
        for i, part in parts:
            modality, what = _part_media(i, part)
            if modality in seen:
                raise APIError(400, f"messages[{i}]: two {modality} inputs in one message; the model mixes one "
                                    "item per modality", param="messages")
            seen.add(modality)
            payload = image_bytes(part.image_url.url, config, what) if isinstance(part, ImagePart) \
                else _audio_bytes(part, what)
            media[modality] = (payload, what)
    seen = set()
    for j, item in enumerate(req.inputs):
        what = f"inputs[{j}] ({item.modality})"
        if item.modality in seen:
            raise APIError(400, f"{what}: two {item.modality} items in 'inputs'; one per modality", param="inputs")
        seen.add(item.modality)
        media[item.modality] = (_extra_payload(item, config, what), what)
    return history, texts[-1], media


def _part_media(i: int, part: Any) -> tuple[str, str]:
    if isinstance(part, ImagePart):
        return "image", f"messages[{i}] image_url"
    if isinstance(part, AudioPart):
        return "audio", f"messages[{i}] input_audio"
    raise APIError(400, f"messages[{i}]: unsupported content part {type(part).__name__}")


def _audio_bytes(part: AudioPart, what: str) -> bytes:
    fmt = part.input_audio.format.lower()
    if fmt not in AUDIO_FORMATS:
        raise APIError(400, f"{what}: audio format {fmt!r} is not supported ({', '.join(AUDIO_FORMATS)})",
                       code="invalid_media")
    return b64decode(part.input_audio.data, what)


def _extra_payload(item: Any, config: ServerConfig, what: str) -> bytes | str:
    given = [k for k in ("data", "path", "text") if getattr(item, k) is not None]
    if len(given) != 1:
        raise APIError(400, f"{what}: give exactly one of 'data' (base64), 'path' or 'text'", param="inputs")
    if given[0] == "text":
        if item.modality != "text":
            raise APIError(400, f"{what}: 'text' is only for the text modality", param="inputs")
        return item.text
    if item.modality == "text":
        raise APIError(400, f"{what}: the text modality takes 'text'", param="inputs")
    if given[0] == "data":
        return b64decode(item.data, what)
    return read_media_file(item.path, config, what)


# ---- the whole request ---------------------------------------------------------------------------------------


def prepare(req: ChatCompletionRequest, model: Any, config: ServerConfig, cache_for: Any) -> Prepared:
    """Validate and decode ``req`` for ``model``: prompt ids, inputs, budget and sampling settings.

    ``cache_for(options)`` returns the visual cache object to use (None = off) for the request's
    ``visual_cache`` field (None = the server's default). Raises :class:`APIError` for every bad request.
    """
    history, question, media = map_messages(req, config)
    branches = set(model.modalities)
    for modality, (_, what) in media.items():
        if MODALITY_BRANCH[modality] not in branches:
            raise APIError(400, f"{what}: this model has no {MODALITY_BRANCH[modality]} encoder (encoder branches: "
                                f"{', '.join(sorted(branches)) or 'none'})", code="unsupported_modality")
    for name in req.modality_weights:
        if name not in MODALITY_BRANCH:
            raise APIError(400, f"modality_weights: unknown modality {name!r}", param="modality_weights")
    inputs = {m: (load_input(m, payload, what), float(req.modality_weights.get(m, 1.0)))
              for m, (payload, what) in media.items()}
    if inputs and not sum(w for _, w in inputs.values()) > 1e-3:
        raise APIError(400, f"modality_weights {[w for _, w in inputs.values()]} must sum to a positive number",
                       param="modality_weights")
    ids = conversation_prompt_ids(model.tokenizer, history, question)
    context = model.max_seq_len
    if len(ids) >= context:
        raise APIError(400, f"the messages are {len(ids)} tokens long; the model's context is {context} tokens "
                            "(prompt + answer)", code="context_length_exceeded", param="messages")
    room = context - len(ids)
    requested = req.max_completion_tokens or req.max_tokens
    if requested is not None and requested > room:
        raise APIError(400, f"the model's context is {context} tokens; the messages take {len(ids)}, which leaves "
                            f"{room} for the completion, but max_tokens is {requested}",
                       code="context_length_exceeded", param="max_tokens")
    return Prepared(ids=ids, inputs=inputs, cache=cache_for(req.visual_cache) if inputs else None,
                    max_tokens=requested or min(config.max_tokens, room),
                    temperature=config.temperature if req.temperature is None else req.temperature,
                    top_p=config.top_p if req.top_p is None else req.top_p, seed=req.seed, stops=req.stops())
