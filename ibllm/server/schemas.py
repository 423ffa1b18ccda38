"""Request schema of ``POST /v1/chat/completions`` (pydantic), the OpenAI error shape and the response bodies.

Unknown top-level fields are accepted and ignored (as OpenAI-compatible servers do), except the features
this server cannot honour (``n > 1``, ``logprobs``, tools, a JSON response format), which are refused with
a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """``{"type": "text", "text": ...}``"""

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """``url``: a ``data:image/...;base64,`` URL, or a file inside the server's media folder."""

    url: str
    detail: str | None = None


class ImagePart(_Strict):
    """``{"type": "image_url", "image_url": {"url": ...}}``"""

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    """Base64 audio bytes and their container format."""

    data: str
    format: str = "wav"


class AudioPart(_Strict):
    """``{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}``"""

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class Message(BaseModel):
    """One chat message; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ExtraInput(_Strict):
    """An input of any modality (extension field ``inputs``): exactly one of ``data`` (base64 bytes),
    ``path`` (a file inside the media folder) or ``text`` (for the ``text`` modality)."""

    modality: Literal["image", "video", "audio", "point", "depth", "thermal", "imu", "text"]
    data: str | None = None
    path: str | None = None
    text: str | None = None


class VisualCacheOptions(_Strict):
    """The visual-cache switch and its constants (extension field ``visual_cache``); a constant left out
    keeps the loaded cache's value."""

    enabled: bool = True
    k: int | None = Field(None, ge=1, le=1024)
    temperature: float | None = Field(None, ge=0.0)
    weight: float | None = Field(None, ge=0.0, le=1.0)


class StreamOptions(BaseModel):
    """``{"include_usage": true}`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI fields plus this server's extension fields)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    # extension fields
    inputs: list[ExtraInput] = Field(default_factory=list, max_length=16)
    modality_weights: dict[str, float] = Field(default_factory=dict)
    visual_cache: VisualCacheOptions | None = None

    def stops(self) -> list[str]:
        """The stop strings (at most 4, none empty)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"'stop' has {len(stops)} strings; at most 4 are allowed", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "'stop' strings must not be empty", param="stop")
        return stops


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise APIError(400, describe_validation_error(e), param=str(e.errors()[0]["loc"][0])) from None
    response_format = data.get("response_format") or {}
    refuse = {"n": req.n not in (None, 1), "logprobs": bool(req.logprobs),
              "tools": bool(data.get("tools")), "functions": bool(data.get("functions")),
              "response_format": not isinstance(response_format, dict) or response_format.get("type", "text") != "text"}
    for name, bad in refuse.items():
        if bad:
            raise APIError(400, f"'{name}' is not supported by this server (one text answer per request)",
                           param=name)
    return req


def _field_path(loc: tuple[Any, ...]) -> str:
    """``messages.0.content.1.image_url.url`` from a pydantic location (union branch labels dropped)."""
    out: list[str] = []
    skip_tag = False
    for part in loc:
        text = str(part)
        if "[" in text or text in ("str", "int", "float", "bool", "list", "dict") or text.startswith("function-"):
            skip_tag = skip_tag or "tagged-union" in text
            continue
        if skip_tag and isinstance(part, str) and out and out[-1].isdigit():
            skip_tag = False  # the discriminator value pydantic puts after the list index
            continue
        out.append(text)
    return ".".join(out) or "body"


def describe_validation_error(e: ValidationError) -> str:
    """The deepest problem of a failed validation as ``field.path: message`` (for a value that fits none of
    a union's alternatives at the top, every alternative's complaint)."""
    errors = e.errors(include_url=False)
    deepest = max(errors, key=lambda err: len(err["loc"]))
    where = _field_path(deepest["loc"])
    rivals = [err for err in errors if _field_path(err["loc"]) == where]
    if len(rivals) > 1:
        return f"{where}: invalid value ({'; or '.join(err['msg'] for err in rivals)})"
    return f"{where}: {deepest['msg']}"


# ---- responses -------------------------------------------------------------------------------------------


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``: one choice with ``delta`` (None: the usage-only last chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None, "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


# ---- server settings -------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """What the command line sets: naming, limits, defaults and the batching policy."""

    model_name: str = "ibllm"
    api_key: str | None = None
    media_dir: Path | None = None  # resolved; None: local files are refused
    max_body_bytes: int = 20 * 2**20
    max_tokens: int = 128  # default completion budget (capped by the context)
    temperature: float = 0.1
    top_p: float = 0.75
    timeout_s: float = 300.0
    max_batch: int = 16
    max_queue: int = 64
    batch_window_s: float = 0.02
