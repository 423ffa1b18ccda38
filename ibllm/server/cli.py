"""``python -m ibllm serve --api``: load the model as ``chat`` does and serve the HTTP API with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ibllm.cli.common import RECOVERABLE, add_load_arguments, fail, inputs_from_args, load_from_args
from ibllm.server import __doc__ as API_DOC
from ibllm.server.schemas import ServerConfig

API_KEY_ENV = "IBLLM_API_KEY"
DEFAULT_MAX_TOKENS = 128  # the browser demo's default answer length


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m ibllm serve --api`` (model and sampling options as for ``chat``)."""
    parser = argparse.ArgumentParser(prog="python -m ibllm serve --api", description=API_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    parser.set_defaults(max_gen_len=DEFAULT_MAX_TOKENS)
    s = parser.add_argument_group("HTTP API")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}; none: open)")
    s.add_argument("--model-name", default="ibllm", help="the model id clients send (default: ibllm)")
    s.add_argument("--media-dir", help="folder whose files requests may name by path (default: none; only "
                                       "base64 data is accepted)")
    s.add_argument("--max-body-mb", type=float, default=20.0, help="request size limit in MiB (default 20)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (1: one at a time)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429 (default 64)")
    s.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long a new request waits for others to batch with (default 20 ms)")
    s.add_argument("--timeout", type=float, default=300.0, help="per-request time limit in seconds (default 300)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` of the parsed options (raises ``ValueError`` for bad values)."""
    media = None
    if args.media_dir:
        media = Path(args.media_dir).expanduser().resolve()
        if not media.is_dir():
            raise ValueError(f"--media-dir {args.media_dir}: not a folder")
    for name in ("max_body_mb", "max_batch", "max_queue", "timeout", "max_gen_len"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    return ServerConfig(model_name=args.model_name, api_key=args.api_key or None, media_dir=media,
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


def main(argv: Sequence[str] | None = None) -> None:
    """Parse, load the model, serve until Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: the HTTP API needs fastapi and uvicorn: pip install 'ibllm[web]'", file=sys.stderr)
        raise SystemExit(1) from None
    from ibllm.server.app import build_app  # fastapi: an optional dependency, checked just above

    try:
        if inputs_from_args(args, argv):
            raise ValueError("serve --api takes no input files: send them with each request")
        config = config_from_args(args)
        model = load_from_args(args)
    except RECOVERABLE as e:
        fail(e)
    if not is_loopback(args.host):
        print(f"warning: bound to {args.host}: other machines can reach this server"
              + ("" if config.api_key else "; anyone who can reach it can use the model (set --api-key)"),
              file=sys.stderr, flush=True)
    print(f"ibllm OpenAI-compatible API on http://{args.host}:{args.port}/v1 (model {config.model_name!r}; "
          "Ctrl-C stops)", flush=True)
    uvicorn.run(build_app(model, config), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=3)
