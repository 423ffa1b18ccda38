"""Uploads of the browser demo: each browser session's files are deleted when the session ends."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any


class SessionUploads:
    """The uploaded files each browser session holds; :meth:`end` deletes a session's files when its tab
    closes, except files another live session holds too (gradio stores identical uploads once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_session: dict[str, set[str]] = {}

    def add(self, session: str, path: str | None) -> None:
        """Record that ``session`` uploaded ``path`` (``None``: a cleared upload, ignored)."""
        if path:
            with self.lock:
                self.by_session.setdefault(session, set()).add(str(path))

    def end(self, session: str) -> list[str]:
        """Forget ``session`` and delete the files only it held; returns the deleted paths."""
        with self.lock:
            mine = self.by_session.pop(session, set())
            shared = set().union(*self.by_session.values())
        deleted = []
        for path in sorted(mine - shared):
            try:
                os.remove(path)
            except OSError:  # already gone (gradio's own age-based sweep, a restart)
                continue
            deleted.append(path)
            try:
                os.rmdir(os.path.dirname(path))  # gradio's per-upload folder, when now empty
            except OSError:
                pass
        return deleted


def delete_on_session_end(app: Any, components: Iterable[Any]) -> SessionUploads:
    """Record every upload into ``components`` (gradio ``File``s) per session and delete a session's files
    when its page is closed or reloaded (gradio's ``unload`` event). Call inside the ``Blocks`` context."""
    import gradio as gr  # the web extra, imported only by the demo

    uploads = SessionUploads()

    def on_upload(path: str | None, request: Any) -> None:
        uploads.add(request.session_hash, path)

    def on_unload(request: Any) -> None:
        uploads.end(request.session_hash)

    # gradio passes the request to a parameter annotated with its Request class
    on_upload.__annotations__["request"] = on_unload.__annotations__["request"] = gr.Request
    for component in components:
        component.upload(on_upload, component, None, queue=False, api_visibility="private")
    app.unload(on_unload)
    return uploads
