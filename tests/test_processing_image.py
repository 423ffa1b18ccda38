"""Image loading and the CLIP transforms of the vision encoder."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm.processing import CLIP_MEAN, CLIP_STD, MediaError, image_transform, load_image, load_modality, open_rgb
from ibllm.processing.image import center_crop, random_resized_crop_params, resize_short_side

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def expected(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255.0 - MEAN) / STD


def save(img: Image.Image, path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def test_constant_colour_maps_to_normalised_value(tmp_path):
    p = save(Image.new("RGB", (320, 240), (10, 200, 90)), tmp_path / "c.png")
    for train in (False, True):
        x = load_image(p, train=train, generator=torch.Generator().manual_seed(0))
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        torch.testing.assert_close(x, expected((10, 200, 90)).expand(3, 224, 224), atol=1e-5, rtol=0)


def test_mean_colour_image_is_zero():
    mean_rgb = tuple(round(m * 255) for m in CLIP_MEAN)
    x = image_transform(Image.new("RGB", (224, 224), mean_rgb), train=False)
    assert x.abs().max() < 0.01


@pytest.mark.parametrize(
    "mode,fmt,value,rgb",
    [
        ("L", "PNG", 77, (77, 77, 77)),
        ("L", "JPEG", 77, None),
        ("1", "PNG", 1, (255, 255, 255)),
        ("RGB", "JPEG", (200, 30, 60), None),
        ("CMYK", "JPEG", (0, 0, 0, 0), None),
        ("I;16", "PNG", 65535, (255, 255, 255)),
        ("I;16", "PNG", 257 * 100, (100, 100, 100)),
    ],
)
def test_modes_convert_to_rgb(tmp_path, mode, fmt, value, rgb):
    p = save(Image.new(mode, (40, 30), value), tmp_path / f"m.{fmt.lower()}", format=fmt)
    img = open_rgb(p)
    assert img.mode == "RGB" and img.size == (40, 30)
    arr = np.asarray(img).astype(int)
    if rgb is not None:
        assert (arr == np.array(rgb)).all()
    elif mode == "CMYK":
        assert arr.min() >= 250  # zero ink is white
    assert load_image(p).shape == (3, 224, 224)


def test_sixteen_bit_png_roundtrip_keeps_dynamics(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16)[None, :].repeat(8, 0) * 257)
    p = save(Image.fromarray(ramp), tmp_path / "ramp16.png")
    assert Image.open(p).mode.startswith("I")
    arr = np.asarray(open_rgb(p))[..., 0]
    assert (arr[0] == np.arange(256)).all()  # PIL's own convert would saturate at 255


def test_rgba_composited_on_white_or_alpha_dropped(tmp_path):
    arr = np.zeros((20, 20, 4), np.uint8)
    arr[..., :3] = (255, 0, 0)
    arr[:, :10, 3] = 255  # left half opaque red, right half fully transparent (hidden colour red)
    p = save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")
    white = np.asarray(open_rgb(p))
    assert (white[:, :10] == (255, 0, 0)).all() and (white[:, 10:] == 255).all()
    dropped = np.asarray(open_rgb(p, background=None))
    assert (dropped == (255, 0, 0)).all()
    la = save(Image.new("LA", (8, 8), (0, 0)), tmp_path / "la.png")
    assert (np.asarray(open_rgb(la)) == 255).all()


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 255] + [0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 5, 10))
    p = save(img, tmp_path / "p.png", transparency=0)  # index 0 (blue) transparent
    out = np.asarray(open_rgb(p))
    assert (out[:, :5] == (0, 255, 0)).all() and (out[:, 5:] == 255).all()
    plain = save(img, tmp_path / "p2.png")
    assert (np.asarray(open_rgb(plain))[:, 5:] == (0, 0, 255)).all()


def test_eval_geometry_matches_torchvision_rules():
    img = Image.new("RGB", (500, 300))
    r = resize_short_side(img, 224)
    assert r.size == (int(224 * 500 / 300), 224) == (373, 224)
    assert resize_short_side(Image.new("RGB", (300, 500)), 224).size == (224, 373)
    # CenterCrop offsets: int(round((373 - 224) / 2)) = round(74.5) = 74 (banker's rounding)
    ramp = np.tile(np.arange(373, dtype=np.uint8)[None, :, None], (224, 1, 3))
    c = center_crop(Image.fromarray(ramp), 224)
    assert np.asarray(c)[0, 0, 0] == 74 and c.size == (224, 224)


def test_eval_transform_is_resize_then_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 450, 3), dtype=np.uint8))
    x = image_transform(img, train=False)
    ref = img.resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224))
    want = (torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD
    torch.testing.assert_close(x, want)


def test_random_resized_crop_params_and_determinism():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(640, 480, generator=g)
        area = h * w / (640 * 480)
        assert 0.88 <= area <= 1.0 and 0.74 <= w / h <= 1.34
        assert 0 <= top <= 480 - h and 0 <= left <= 640 - w
    # extreme aspect ratio: all 10 attempts fail -> central fallback crop at the ratio bound
    assert random_resized_crop_params(1000, 100, generator=g) == (0, 433, 100, 133)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    a = load_image(img, train=True, generator=torch.Generator().manual_seed(5))
    b = load_image(img, train=True, generator=torch.Generator().manual_seed(5))
    c = load_image(img, train=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bytes_source_and_batch(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, format="PNG")
    p = save(Image.new("L", (50, 90), 128), tmp_path / "g.jpg")
    batch = load_modality("image", [buf.getvalue(), p, torch.zeros(3, 224, 224)])
    assert batch.shape == (3, 3, 224, 224)
    assert torch.equal(batch[2], torch.zeros(3, 224, 224))


def test_errors_name_modality_and_file(tmp_path):
    with pytest.raises(MediaError, match=r"image .*nope\.png.*file not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(MediaError, match=r"image .*bad\.jpg.*cannot decode"):
        load_image(bad)
    good = save(Image.new("RGB", (30, 30)), tmp_path / "ok.png")
    with pytest.raises(MediaError, match=r"image item 1 .*bad\.jpg") as ei:
        load_modality("image", [good, str(bad)])
    assert isinstance(ei.value, ValueError) and ei.value.index == 1
    with pytest.raises(MediaError, match=r"image item 0 .*shape"):
        load_modality("image", [torch.zeros(3, 32, 32)])
    assert not math.isnan(load_image(good).sum().item())
    with pytest.raises(MediaError, match=r"image \('<19 bytes>'\): cannot decode") as ei:
        load_image(b"not an image at all")
    again = pickle.loads(pickle.dumps(ei.value))  # crosses DataLoader worker boundaries intact
    assert str(again) == str(ei.value) and again.modality == "image"
