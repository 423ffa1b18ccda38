"""The digits demo's training data: caption shards (stage 1) and instructions (stage 2) of the 1,797 digits.

Images are saved as 224x224 RGB PNG (:func:`ibllm.demos.digits.pixels.digit_image`); the train / held-out
split is :func:`ibllm.demos.digits.pixels.digit_split`, shared with stage 0. Both writers are idempotent: a
marker file (``done_shards.json`` or ``done_instructions.json``) with the build parameters makes later calls
return the existing files.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ibllm.atomic import write_text_atomic
from ibllm.demos.digits.captions import CAPTION_TEMPLATES, digit_caption, digit_word
from ibllm.demos.digits.pixels import digit_image, digit_split, load_digit_pixels
from ibllm.demos.markers import read_marker, write_marker

DONE_SHARDS = "done_shards.json"
DONE_INSTRUCTIONS = "done_instructions.json"


def png_bytes(img: Image.Image) -> bytes:
    """Encode a PIL image as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class DigitShards:
    """Where :func:`write_digit_shards` put the data."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    train_pattern: str = ""
    heldout_pattern: str = ""
    n_train: int = 0
    n_heldout: int = 0


def _write_split(out: Path, split: str, indices: np.ndarray, grey: np.ndarray, labels: np.ndarray,
                 seed: int, shard_size: int) -> tuple[list[str], str]:
    rng = random.Random(f"{seed}-{split}")
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(indices), shard_size)):
        path = folder / f"{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in indices[start : start + shard_size].tolist():
                d = int(labels[i])
                caption = digit_caption(d, rng)
                sink.write({
                    "__key__": f"{i:09d}",
                    "png": png_bytes(digit_image(grey[i])),
                    "txt": caption,
                    "json": json.dumps({"label": d, "index": i, "caption": caption}),
                })
        paths.append(str(path))
    pattern = str(folder / (f"{{000000..{len(paths) - 1:06d}}}.tar" if len(paths) > 1 else "000000.tar"))
    return paths, pattern


def write_digit_shards(out_dir: str | Path, seed: int = 0, heldout_fraction: float = 0.2,
                       shard_size: int = 256) -> DigitShards:
    """Write the 1,797 digits as train/heldout WebDataset shards (``KEY.png`` + ``KEY.txt`` + ``KEY.json``).

    ``KEY.json`` holds ``{"label": d, "index": i, "caption": ...}``. Captions come from
    :data:`ibllm.demos.digits.captions.CAPTION_TEMPLATES` (the digit's word, its numeral, or both).
    Idempotent: returns the existing shards when ``out_dir/done_shards.json`` records the same parameters;
    otherwise rebuilds.
    """
    out = Path(out_dir)
    params = {"kind": "digit_shards", "seed": seed, "heldout_fraction": heldout_fraction, "shard_size": shard_size,
              "templates": list(CAPTION_TEMPLATES)}
    if (info := read_marker(out, DONE_SHARDS, params)) is not None:
        return DigitShards(**info["result"])
    for split in ("train", "heldout"):
        shutil.rmtree(out / split, ignore_errors=True)
    pixels, labels = load_digit_pixels()
    grey, labels = pixels.numpy(), labels.numpy()
    train_idx, held_idx = digit_split(seed, heldout_fraction, len(labels))
    train, train_pat = _write_split(out, "train", train_idx, grey, labels, seed, shard_size)
    held, held_pat = _write_split(out, "heldout", held_idx, grey, labels, seed, shard_size)
    result = DigitShards(train, held, train_pat, held_pat, len(train_idx), len(held_idx))
    write_marker(out, DONE_SHARDS, params, asdict(result))
    return result


def _image_conversation(d: int, rng: random.Random, caption: str) -> list[dict[str, str]]:
    """A LLaVA-format conversation about one digit image (first turn always asks which digit)."""
    w = digit_word(d)
    extra = [
        ("Is the digit even or odd?", f"The digit {w} is {'even' if d % 2 == 0 else 'odd'}."),
        ("What is the digit plus one?", f"{w.capitalize()} plus one is {digit_word(d + 1)}."),
        ("Describe the image.", caption[0].upper() + caption[1:] + "."),
        ("What is the digit times two?", f"{w.capitalize()} times two is {digit_word(2 * d)}."),
    ]
    if d > 0:
        extra.append(("What is the digit minus one?", f"{w.capitalize()} minus one is {digit_word(d - 1)}."))
    turns = [("<image>\nWhich digit is this?", f"This is the digit {w} ({d}).")]
    turns += rng.sample(extra, rng.randint(1, 2))
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


def number_instructions() -> list[dict[str, str]]:
    """Text-only Alpaca items about number words, written by this project (no external data)."""
    items = []
    for n in range(20):
        items.append({"instruction": f"What number comes after {digit_word(n)}?", "input": "",
                      "output": f"{digit_word(n + 1).capitalize()} comes after {digit_word(n)}."})
        items.append({"instruction": f"Write the number {n} in words.", "input": "", "output": digit_word(n)})
        items.append({"instruction": f"Is {digit_word(n)} an even or an odd number?", "input": "",
                      "output": f"{digit_word(n).capitalize()} is {'even' if n % 2 == 0 else 'odd'}."})
    for a in range(10):
        for b in range(10):
            if (a + b) % 2 == 0:
                items.append({"instruction": f"What is {digit_word(a)} plus {digit_word(b)}?", "input": "",
                              "output": f"{digit_word(a).capitalize()} plus {digit_word(b)} is {digit_word(a + b)}."})
            else:
                items.append({"instruction": "Add the two numbers.", "input": f"{digit_word(a)} and {digit_word(b)}",
                              "output": f"The sum is {digit_word(a + b)}."})
    return items


@dataclass
class DigitInstructions:
    """Where :func:`write_digit_instructions` put the files (LLaVA image items, Alpaca text-only items)."""

    llava_train: str = ""
    llava_heldout: str = ""
    alpaca_train: str = ""
    alpaca_heldout: str = ""
    image_root: str = ""
    counts: dict = field(default_factory=dict)


def write_digit_instructions(out_dir: str | Path, seed: int = 0, heldout_fraction: float = 0.2,
                             max_images: int | None = 600) -> DigitInstructions:
    """Write a small instruction set about the digits, split train/heldout with the shard split.

    LLaVA-format JSON (``image`` relative to ``out_dir``, ``conversations`` human/gpt, 2–3 turns:
    which digit, even/odd, plus/minus one, times two, describe) and text-only Alpaca JSON (number
    words: successor, spelling, parity, addition). Images are PNG files under ``out_dir/images``.
    ``max_images`` caps the image items (None = all 1,797). Idempotent via ``out_dir/done_instructions.json``.
    """
    out = Path(out_dir)
    params = {"kind": "digit_instructions", "seed": seed, "heldout_fraction": heldout_fraction,
              "max_images": max_images, "templates": list(CAPTION_TEMPLATES)}
    if (info := read_marker(out, DONE_INSTRUCTIONS, params)) is not None:
        return DigitInstructions(**info["result"])
    pixels, labels = load_digit_pixels()
    grey, labels = pixels.numpy(), labels.numpy()
    train_idx, held_idx = (a.tolist() for a in digit_split(seed, heldout_fraction, len(labels)))
    rng = random.Random(seed)
    if max_images is not None:
        n_held = int(round(max_images * heldout_fraction))
        train_idx = sorted(rng.sample(train_idx, min(len(train_idx), max_images - n_held)))
        held_idx = sorted(rng.sample(held_idx, min(len(held_idx), n_held)))
    shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    result = DigitInstructions(image_root=str(out))
    for split, idx in (("train", train_idx), ("heldout", held_idx)):
        items = []
        for i in idx:
            d = int(labels[i])
            rel = f"images/{i:05d}.png"
            digit_image(grey[i]).save(out / rel)
            items.append({"id": f"digit-{i:05d}", "image": rel, "label": d,
                          "conversations": _image_conversation(d, rng, digit_caption(d, rng))})
        path = out / f"llava_{split}.json"
        write_text_atomic(path, json.dumps(items, indent=1))
        setattr(result, f"llava_{split}", str(path))
        result.counts[f"llava_{split}"] = len(items)
    text_items = number_instructions()
    rng.shuffle(text_items)
    n_held = int(round(len(text_items) * heldout_fraction))
    for split, items in (("train", text_items[n_held:]), ("heldout", text_items[:n_held])):
        path = out / f"alpaca_{split}.json"
        write_text_atomic(path, json.dumps(items, indent=1))
        setattr(result, f"alpaca_{split}", str(path))
        result.counts[f"alpaca_{split}"] = len(items)
    write_marker(out, DONE_INSTRUCTIONS, params, asdict(result))
    return result
