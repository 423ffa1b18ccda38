"""``python -m ibllm serve --api``: load the model as ``chat`` does and serve the HTTP API with uvicorn."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jsonargparse import ArgumentParser

from ibllm.cli.common import LOAD_ALIASES, RECOVERABLE, ModelOptions, SamplingOptions, fail, load_model
from ibllm.server import __doc__ as API_DOC
from ibllm.server.schemas import ServerConfig
from ibllm.verbs import registry
from ibllm.verbs.registry import run, verb

API_KEY_ENV = "IBLLM_API_KEY"
DEFAULT_MAX_TOKENS = 128  # the browser demo's default answer length
VERB = "serve --api"


@dataclass
class HTTPOptions:
    """HTTP API.

    Args:
        host: address to bind (default 127.0.0.1: this machine only)
        port: port to listen on
        api_key: require 'Authorization: Bearer KEY' on /v1 (default: $IBLLM_API_KEY; none: open)
        model_name: the model id clients send
        media_dir: folder whose files requests may name by path (default: none; only base64 data is accepted)
        max_body_mb: request size limit in MiB
        max_batch: requests decoded together at most (1: one at a time)
        max_queue: waiting requests before answering 429
        batch_window_ms: how long a new request waits for others to batch with
        timeout: per-request time limit in seconds
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "ibllm"
    media_dir: str | None = None
    max_body_mb: float = 20.0
    max_batch: int = 16
    max_queue: int = 64
    batch_window_ms: float = 20.0
    timeout: float = 300.0


def build_parser() -> ArgumentParser:
    """Parser of ``python -m ibllm serve --api`` (its ``parse_args`` gives the options as attributes)."""
    return registry.build_parser(VERB)


def config_from_args(args: Any) -> ServerConfig:
    """The :class:`ServerConfig` of the parsed options (attributes named as the options; raises ``ValueError``
    for bad values). No ``--api-key``: the key in ``$IBLLM_API_KEY``, if any."""
    media = None
    if args.media_dir:
        media = Path(args.media_dir).expanduser().resolve()
        if not media.is_dir():
            raise ValueError(f"--media-dir {args.media_dir}: not a folder")
    for name in ("max_body_mb", "max_batch", "max_queue", "timeout", "max_gen_len"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return ServerConfig(model_name=args.model_name, api_key=api_key, media_dir=media,
                        max_body_bytes=int(args.max_body_mb * 2**20), max_tokens=args.max_gen_len,
                        temperature=args.temperature, top_p=args.top_p, timeout_s=args.timeout,
                        max_batch=args.max_batch, max_queue=args.max_queue,
                        batch_window_s=max(0.0, args.batch_window_ms) / 1000)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@verb(VERB, flat=("model", "sampling", "http"), aliases=LOAD_ALIASES, description=API_DOC)
def serve_api(model: ModelOptions = ModelOptions(),
              sampling: SamplingOptions = SamplingOptions(max_gen_len=DEFAULT_MAX_TOKENS),
              http: HTTPOptions = HTTPOptions()) -> None:
    """Load the model as ``chat`` does and serve the HTTP API until Ctrl-C.

    Args:
        model: which model to load
        sampling: defaults of requests that leave them out (max_gen_len: the default max_tokens)
        http: the server's settings
    """
    try:
        import uvicorn
    except ImportError:
        print("error: the HTTP API needs fastapi and uvicorn: pip install 'ibllm[web]'", file=sys.stderr)
        raise SystemExit(1) from None
    from ibllm.server.app import build_app  # fastapi: an optional dependency, checked just above

    try:
        config = config_from_args(SimpleNamespace(**asdict(sampling), **asdict(http)))
        loaded = load_model(model)
    except RECOVERABLE as e:
        fail(e)
    if not is_loopback(http.host):
        print(f"warning: bound to {http.host}: other machines can reach this server"
              + ("" if config.api_key else "; anyone who can reach it can use the model (set --api-key)"),
              file=sys.stderr, flush=True)
    print(f"ibllm OpenAI-compatible API on http://{http.host}:{http.port}/v1 (model {config.model_name!r}; "
          "Ctrl-C stops)", flush=True)
    uvicorn.run(build_app(loaded, config), host=http.host, port=http.port, log_level="info",
                timeout_graceful_shutdown=3)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm serve --api``: parse, load the model, serve until Ctrl-C."""
    run(VERB, argv)
