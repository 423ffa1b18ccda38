"""Spoken digits for the cross-modal demo: the ten digit words synthesised with ``espeak-ng`` in many voices,
speeds and pitches; the held-out part uses voices *and* speed / pitch values that training never hears."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ibllm.atomic import atomic_write, write_bytes_atomic
from ibllm.demos.digits.captions import DIGIT_WORDS
from ibllm.processing.audio import load_audio

SPEECH_DIR = "speech"
DONE_SPEECH = "done_speech.json"
ESPEAK_INSTALL = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                  "espeak-ng")


@dataclass(frozen=True)
class SpeechSpec:
    """Which spoken digits :func:`write_spoken_digits` makes: ``espeak-ng -v VOICE -s SPEED -p PITCH WORD``.

    Training uses every (voice, speed, pitch) of the ``train_*`` lists; the held-out set uses other voices
    (a language / variant pairing training never hears) at speeds and pitches between the training ones.
    """

    train_voices: tuple[str, ...] = (
        "en-us+m1", "en-us+f1", "en-us+m3", "en-gb+m2", "en-gb+f2", "en-gb+m4", "en-029+f3", "en-029+m5",
        "en-gb-scotland+m7", "en-gb-scotland+f5", "en-gb-x-rp+klatt", "en-us+croak")
    train_speeds: tuple[int, ...] = (120, 160, 200)
    train_pitches: tuple[int, ...] = (25, 50, 75)
    heldout_voices: tuple[str, ...] = ("en-us+f4", "en-gb+m6", "en-gb-x-rp+f1")
    heldout_speeds: tuple[int, ...] = (140, 180)
    heldout_pitches: tuple[int, ...] = (35, 65)
    words: tuple[str, ...] = DIGIT_WORDS

    def items(self, split: str) -> list[dict[str, Any]]:
        """Every ``{voice, speed, pitch, label, word, name}`` of ``split`` (``train`` / ``heldout``)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        voices, speeds, pitches = (getattr(self, f"{split}_{k}") for k in ("voices", "speeds", "pitches"))
        out = []
        for voice in voices:
            for speed in speeds:
                for pitch in pitches:
                    for label, word in enumerate(self.words):
                        name = f"{voice.replace('+', '_')}_s{speed}_p{pitch}_{label}.wav"
                        out.append({"voice": voice, "speed": speed, "pitch": pitch, "label": label, "word": word,
                                    "name": name})
        return out

    def digest(self) -> str:
        """sha256 of the spec's canonical JSON."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


def espeak_binary() -> str:
    """Path of ``espeak-ng``, or one clear error saying how to install it."""
    found = shutil.which("espeak-ng")
    if found is None:
        raise RuntimeError(f"espeak-ng is not installed (the demo's spoken digits need it); on Debian/Ubuntu: "
                           f"{ESPEAK_INSTALL}")
    return found


def synthesize(text: str, out: str | Path, voice: str = "en-us", speed: int = 160, pitch: int = 50,
               binary: str | None = None) -> Path:
    """Speak ``text`` with ``espeak-ng`` into the WAV file ``out`` (written atomically); returns its path."""
    out = Path(out)

    def write(tmp: str) -> None:
        cmd = [binary or espeak_binary(), "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-w", tmp, text]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if run.returncode != 0 or os.path.getsize(tmp) <= 44:
            raise RuntimeError(f"espeak-ng failed for voice {voice!r} (speed {speed}, pitch {pitch}) -> {out}: "
                               f"{(run.stderr or run.stdout).strip() or 'empty WAV'}")

    return atomic_write(out, write, suffix=".wav")


@dataclass
class SpokenDigits:
    """What :func:`write_spoken_digits` made: WAV items per split (``path`` + ``label`` + how it was spoken)."""

    root: Path
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    spec_hash: str

    def paths(self, split: str) -> list[Path]:
        """WAV paths of ``split``."""
        return [Path(i["path"]) for i in getattr(self, split)]

    def labels(self, split: str) -> Tensor:
        """Digit labels ``[N]`` of ``split``."""
        return torch.tensor([i["label"] for i in getattr(self, split)], dtype=torch.long)


def write_spoken_digits(out_dir: str | Path, spec: SpeechSpec | None = None, force: bool = False,
                        progress: bool = True) -> SpokenDigits:
    """Synthesise every spoken digit of ``spec`` into ``out_dir/{train,heldout}/*.wav`` (idempotent).

    ``out_dir/done_speech.json`` records the spec's hash and the items; a later call with the same spec and
    all files present returns them without running ``espeak-ng``.
    """
    spec = spec or SpeechSpec()
    out = Path(out_dir)
    marker = out / DONE_SPEECH
    if not force and marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        if info.get("spec_hash") == spec.digest() and all(
                Path(i["path"]).is_file() for s in ("train", "heldout") for i in info.get(s, [])):
            return SpokenDigits(out, info["train"], info["heldout"], info["spec_hash"])
    binary = espeak_binary()
    result: dict[str, list[dict[str, Any]]] = {}
    todo = [(split, item) for split in ("train", "heldout") for item in spec.items(split)]
    bar = progress_bar(len(todo), progress, "espeak-ng")
    for split, item in todo:
        path = synthesize(item["word"], out / split / item["name"], item["voice"], item["speed"], item["pitch"],
                          binary)
        result.setdefault(split, []).append({**item, "path": str(path)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    info = {"spec_hash": spec.digest(), "spec": dataclasses.asdict(spec), **result}
    write_bytes_atomic(marker, json.dumps(info, indent=1).encode())
    return SpokenDigits(out, result["train"], result["heldout"], spec.digest())


def speech_features(paths: Sequence[str | Path], progress: bool = True) -> Tensor:
    """ImageBind audio inputs ``[N, 3, 1, 128, 204]`` of WAV files (:func:`ibllm.processing.load_audio`)."""
    bar = progress_bar(len(paths), progress, "audio features")
    out = []
    for p in paths:
        out.append(load_audio(p))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.stack(out)


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar of ``total`` steps, or None when ``enabled`` is False."""
    return tqdm(total=total, desc=desc, dynamic_ncols=True) if enabled else None
