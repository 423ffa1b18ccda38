"""Thumbnails of the browser demo's image inputs (ibllm.web_preview): real files written by the test."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from ibllm.processing import image as image_mod
from ibllm.web_preview import THUMB_SIZE, image_thumbnail_html, thumbnail_png


def decoded(html_text: str) -> Image.Image:
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    assert match, html_text
    return Image.open(io.BytesIO(base64.b64decode(match.group(1))))


def test_small_image_is_enlarged_by_a_whole_factor_without_smoothing(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels).save(path)
    html_text = image_thumbnail_html(str(path))
    assert 'alt="digit.png"' in html_text
    thumb = decoded(html_text)
    factor = THUMB_SIZE // 8
    assert thumb.size == (8 * factor, 8 * factor)
    # every block of the thumbnail is one source pixel
    assert np.array_equal(np.asarray(thumb)[::factor, ::factor], pixels)


def test_large_image_shrinks_keeping_its_aspect(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (640, 320), (200, 30, 30)).save(path)
    thumb = Image.open(io.BytesIO(thumbnail_png(path)))
    assert thumb.size == (THUMB_SIZE, THUMB_SIZE // 2)


def test_transparent_image_is_shown_as_the_model_sees_it(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    thumb = decoded(image_thumbnail_html(str(path)))
    assert thumb.mode == "RGB" and thumb.getpixel((0, 0)) == (255, 255, 255)  # composited over white


def test_unreadable_or_oversized_file_gets_a_note_not_an_error(tmp_path, monkeypatch):
    assert image_thumbnail_html(None) == "" and image_thumbnail_html("") == ""
    broken = tmp_path / "broken<b>.png"
    broken.write_bytes(b"this is not an image")
    note = image_thumbnail_html(str(broken))
    assert "no preview of broken&lt;b&gt;.png" in note and "<img" not in note and str(tmp_path) not in note
    assert "no preview of missing.png" in image_thumbnail_html(str(tmp_path / "missing.png"))
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 100 * 100)
    assert "over the limit" in image_thumbnail_html(str(big))
