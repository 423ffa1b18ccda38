"""Build markers of the demo data writers: a JSON file recording a finished build's parameters and result.

A writer calls :func:`read_marker` first and returns the recorded result when the parameters match (the
build is reused); after a build it calls :func:`write_marker`, last, so a crash never leaves a marker
that claims unfinished files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ibllm.atomic import write_text_atomic


def read_marker(out: Path, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON of marker ``out/name`` when it records exactly ``params`` (a finished build), else None."""
    marker = out / name
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("params") == params:
            return info
    return None


def write_marker(out: Path, name: str, params: dict[str, Any], result: dict[str, Any]) -> None:
    """Record a finished build: ``out/name`` = ``{"params": params, "result": result}`` (atomically)."""
    write_text_atomic(out / name, json.dumps({"params": params, "result": result}, indent=1))
