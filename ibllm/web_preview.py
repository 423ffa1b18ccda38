"""Thumbnails of the browser demo's image inputs: an inline PNG (``data:`` URL) in a bit of HTML.

The thumbnail is drawn from the uploaded file itself with the model's own bounded image loader
(:func:`ibllm.processing.image.open_rgb`), so the page shows exactly the pixels the model will see, and no
extra file is written or served. Images smaller than the thumbnail are enlarged by a whole factor without
smoothing (an 8x8 digit stays a crisp 8x8 grid); larger ones are shrunk to fit.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from ibllm.processing.errors import MediaError
from ibllm.processing.image import open_rgb

THUMB_SIZE = 112  # longest side of a thumbnail, in pixels


def thumbnail_png(path: str | Path, size: int = THUMB_SIZE) -> bytes:
    """PNG bytes of the RGB image at ``path`` scaled to fit a ``size`` x ``size`` box (aspect kept).

    Raises :class:`~ibllm.processing.errors.MediaError` for a file that is not a readable image (or is over
    the loader's pixel limit).
    """
    img = open_rgb(str(path))
    w, h = img.size
    longest = max(w, h)
    if longest <= size:
        factor = max(1, size // longest)
        img = img.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    else:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_thumbnail_html(path: str | None) -> str:
    """HTML showing a thumbnail of the uploaded image ``path`` (empty for no upload).

    A file that is not a readable image gets a one-line note instead (the request itself reports the
    error when the question is sent).
    """
    if not path:
        return ""
    name = html.escape(Path(path).name)
    try:
        png = thumbnail_png(path)
    except (MediaError, OSError) as e:
        reason = str(getattr(e, "reason", None) or type(e).__name__).replace(str(path), Path(path).name)
        reason = html.escape(reason)
        return f'<div class="ibllm-thumb-note">no preview of {name}: {reason}</div>'
    data = base64.b64encode(png).decode("ascii")
    return (f'<div class="ibllm-thumb"><img src="data:image/png;base64,{data}" alt="{name}" title="{name}">'
            f"</div>")
