"""Cross-modal transfer on the embedded demo (paper Fig. 4 in miniature): an audio tower, then captions.

Two parts, both regenerable by anyone from Debian's ``espeak-ng`` and scikit-learn's digits:

1. **An audio tower bound to the frozen demo vision tower** (stage 0 for a new modality, as ImageBind /
   Point-Bind do). :func:`write_spoken_digits` synthesises the ten digit words with ``espeak-ng`` in many
   voices, speeds and pitches; the held-out part uses voices *and* speed / pitch values that training never
   hears. :func:`build_audio_encoder` preprocesses them with :func:`ibllm.processing.load_audio` and trains
   the ``demo`` preset's ``audio`` branch with :func:`ibllm.binding.bind_towers` against the frozen vision
   tower of ``encoder.safetensors`` (every spoken digit is paired with training images of its class;
   class-aware InfoNCE). It writes ``encoder_av.safetensors`` = the unchanged vision + text tensors plus
   the new audio branch, and ``encoder_av.json`` (recipe hash, held-out zero-shot accuracies). Idempotent.

2. **The experiment.** The stage-1 model saw only digit *images*. :func:`run_crossmodal` captions held-out
   inputs of three modalities — images (the held-out shard), text phrases through the text tower
   (:data:`TEXT_TEMPLATES`, none of them a training caption) and held-out spoken digits — each naively and
   with the visual cache of the training images (SPEC §6.1), and scores a greedy caption as correct when
   it names exactly the right digit (the stage-1 demo metric). ``python -m ibllm crossmodal`` (``make
   crossmodal``) prints one line per cell: ``crossmodal_accuracy input=audio cache=on: 0.xx``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ibllm.atomic import atomic_write, write_bytes_atomic
from ibllm.binding import (
    DIGIT_WORDS,
    BindRecipe,
    EpochSampler,
    bind_towers,
    class_prompts,
    digit_split,
    existing_encoder_info,
    file_sha256,
    grey_vision_embed,
    load_digit_pixels,
    model_embed,
    positive_mask,
    render_digits,
    save_state_dict,
)
from ibllm.models.imagebind import ImageBindModel

DEFAULT_ROOT = Path("data/demo")
DEFAULT_ADAPTER = Path("runs/demo_pretrain/checkpoints/last.ckpt")
SPEECH_DIR = "speech"
DONE_SPEECH = "done_speech.json"
AUDIO_ENCODER = "encoder_av.safetensors"
ESPEAK_INSTALL = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                  "espeak-ng")
# Text inputs of the experiment: phrasings no training caption uses (see ibllm.binding.CAPTION_TEMPLATES and
# datamodules.demo_data.CAPTION_TEMPLATES).
TEXT_TEMPLATES: tuple[str, ...] = (
    "a handwritten {w}",
    "someone wrote the number {w} by hand",
    "a drawing of the figure {w}",
    "the numeral {w} scribbled on paper",
    "a picture of a {w}",
    "a sketch of the digit {w}",
)
INPUTS: tuple[str, ...] = ("image", "text", "audio")
RECIPE_VERSION = 1


# ------------------------------------------------------------------------------------------- speech

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
    bar = _bar(len(todo), progress, "espeak-ng")
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
    from ibllm.processing.audio import load_audio

    bar = _bar(len(paths), progress, "audio features")
    out = []
    for p in paths:
        out.append(load_audio(p))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.stack(out)


# ------------------------------------------------------------------------------------ the binding task

class SpokenDigitBinding:
    """:class:`ibllm.binding.BindingTask`: spoken digits (audio branch) against digit images of their class.

    Each batch draws spoken digits (every clip once per epoch) and, for each, a random training image of
    the same digit; all same-digit pairs are positives. The anchor is frozen, so its embeddings are
    computed once (``image_emb``, unit norm) and the anchor "inputs" of a batch are row indices into them.
    ``augment`` applies SpecAugment-style masking (one frequency band, one time span) and a random gain
    (a constant shift of the log-mel energies of the speech frames).
    """

    def __init__(self, audio: Tensor, audio_labels: Tensor, image_emb: Tensor, image_labels: Tensor,
                 augment: bool = True, freq_mask: int = 16, time_mask: int = 12, gain_db: float = 6.0) -> None:
        if len(audio) != len(audio_labels) or len(image_emb) != len(image_labels):
            raise ValueError("spoken digits and images need one label each")
        missing = sorted(set(audio_labels.tolist()) - set(image_labels.tolist()))
        if missing:
            raise ValueError(f"no image of digit(s) {missing} to pair spoken digits with")
        self.audio = audio
        self.audio_labels = audio_labels.long()
        self.image_emb = F.normalize(image_emb.float(), dim=-1)
        self.image_labels = image_labels.long()
        self.by_class = {int(c): torch.nonzero(self.image_labels == c).flatten() for c in self.image_labels.unique()}
        self.augment, self.freq_mask, self.time_mask, self.gain_db = augment, freq_mask, time_mask, gain_db
        self._sampler = EpochSampler(len(audio))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = self._sampler.next(batch_size, generator)
        labels = self.audio_labels[idx]
        images = torch.empty_like(idx)
        for c in labels.unique().tolist():
            rows = torch.nonzero(labels == c).flatten()
            pool = self.by_class[c]
            images[rows] = pool[torch.randint(len(pool), (len(rows),), generator=generator)]
        audio = self.audio[idx]
        if self.augment:
            audio = augment_fbank(audio, generator, self.freq_mask, self.time_mask, self.gain_db)
        return images, audio, positive_mask(labels, labels)

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
        if branch == "vision":
            return self.image_emb[x]
        return model_embed(model, branch, x)


def augment_fbank(x: Tensor, generator: torch.Generator, freq_mask: int = 16, time_mask: int = 12,
                  gain_db: float = 6.0) -> Tensor:
    """Random gain on the non-padding frames, one frequency mask and one time mask per clip ``[B,1,M,T]``.

    Masks set the normalised features to 0 (the training-set mean); padding frames (all bins equal, as
    :func:`ibllm.processing.audio.waveform_to_clips` pads) are left alone by the gain.
    """
    from ibllm.processing.audio import FBANK_STD

    x = x.clone()
    b, _, mels, frames = x.shape
    if gain_db > 0:
        gain = (torch.rand(b, generator=generator) * 2 - 1) * gain_db  # dB of amplitude -> log power / std
        shift = gain * (2 * np.log(10) / 20) / FBANK_STD
        speech = (x.amax(dim=2, keepdim=True) - x.amin(dim=2, keepdim=True)) > 0  # [B,1,1,T]
        x = x + shift.view(b, 1, 1, 1) * speech
    if freq_mask > 0:
        width = torch.randint(freq_mask + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (mels - width)).long()
        band = torch.arange(mels)[None]
        masked = (band >= start[:, None]) & (band < (start + width)[:, None])
        x = x.masked_fill(masked[:, None, :, None], 0.0)
    if time_mask > 0:
        width = torch.randint(time_mask + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * 100).long()  # the speech sits in the first ~second
        span = torch.arange(frames)[None]
        masked = (span >= start[:, None]) & (span < (start + width)[:, None])
        x = x.masked_fill(masked[:, None, None, :], 0.0)
    return x


# ------------------------------------------------------------------------------------ the audio tower

@dataclass
class AudioRecipe(BindRecipe):
    """Everything that determines the audio tower (hashed with the base encoder's sha256: ``digest(base=...)``)."""

    steps: int = 300
    intra_weight: float = 0.0
    speech: SpeechSpec = field(default_factory=SpeechSpec)
    version: int = RECIPE_VERSION


@dataclass
class AudioEncoder:
    """Result of :func:`build_audio_encoder`."""

    path: Path
    info_path: Path
    info: dict[str, Any]
    trained: bool

    @property
    def accuracy(self) -> float:
        """Held-out zero-shot accuracy against the image class prototypes."""
        return float(self.info["accuracy"]["heldout_image_prototypes"])


@torch.no_grad()
def image_embeddings(model: ImageBindModel, pixels: Tensor, chunk: int = 256) -> Tensor:
    """Unit-norm vision embeddings ``[N,C]`` of 8x8 digits (centre view, the stage-1 inference view)."""
    out = [grey_vision_embed(model, render_digits(pixels[s:s + chunk])) for s in range(0, len(pixels), chunk)]
    return torch.cat(out)


def class_prototypes(embeddings: Tensor, labels: Tensor, classes: int = 10) -> Tensor:
    """``[classes, C]``: the normalised mean of each class's unit-norm embeddings."""
    emb = F.normalize(embeddings.float(), dim=-1)
    protos = torch.stack([emb[labels == c].mean(dim=0) for c in range(classes)])
    return F.normalize(protos, dim=-1)


@torch.no_grad()
def audio_zero_shot(model: ImageBindModel, audio: Tensor, labels: Tensor, targets: Mapping[str, Tensor],
                    chunk: int = 128) -> dict[str, float]:
    """Top-1 accuracy of spoken digits ``[N,1,M,T]`` (one clip) against each ``targets`` class matrix ``[10,C]``."""
    was_training = model.training
    model.eval()
    emb = torch.cat([model_embed(model, "audio", audio[s:s + chunk]) for s in range(0, len(audio), chunk)])
    model.train(was_training)
    return {name: float(((emb @ t.t()).argmax(dim=1) == labels).float().mean()) for name, t in targets.items()}


def build_audio_encoder(root: str | Path = DEFAULT_ROOT, base: str | Path | None = None,
                        out_path: str | Path | None = None, recipe: AudioRecipe | None = None, *,
                        force: bool = False, progress: bool = True, eval_every: int = 0) -> AudioEncoder:
    """Train (or reuse) the demo's audio tower, bound to the FROZEN vision tower of ``base``.

    ``base`` (default ``root/encoder.safetensors``) holds the demo vision + text towers; the spoken digits
    come from :func:`write_spoken_digits` (``root/speech``); images are the training part of
    :func:`ibllm.binding.digit_split`. Writes ``out_path`` (default ``root/encoder_av.safetensors``,
    atomically): the base file's tensors unchanged plus the audio branch, and a JSON report beside it.
    Idempotent like :func:`ibllm.binding.build_demo_encoder`: the same recipe on the same base file (sha256)
    with an intact output file is not retrained (``trained=False``); ``force`` retrains.
    """
    from ibllm.models.imagebind import load_imagebind

    root = Path(root)
    recipe = recipe or AudioRecipe()
    base = Path(base) if base is not None else root / "encoder.safetensors"
    out_path = Path(out_path) if out_path is not None else root / AUDIO_ENCODER
    info_path = out_path.with_suffix(".json")
    if not base.is_file():
        raise FileNotFoundError(f"base demo encoder {base} not found: run `python -m ibllm demo prepare` first")
    base_sha = file_sha256(base)
    digest = recipe.digest(base=base_sha)
    if not force and (info := existing_encoder_info(out_path, info_path, digest)) is not None:
        return AudioEncoder(out_path, info_path, info, trained=False)

    anchor = load_imagebind(base, recipe.cfg, ["vision", "text"])
    speech = write_spoken_digits(root / SPEECH_DIR, recipe.speech, progress=progress)
    train_audio = speech_features(speech.paths("train"), progress)[:, 0]  # short words: the 3 clips are equal
    held_audio = speech_features(speech.paths("heldout"), progress)[:, 0]
    train_lab, held_lab = speech.labels("train"), speech.labels("heldout")

    pixels, labels = load_digit_pixels()
    train_idx = torch.from_numpy(digit_split(recipe.seed, recipe.heldout_fraction)[0])
    # Zero-shot over the digits that are spoken (all ten by default): their images, prototypes and prompts.
    classes = len(recipe.speech.words)
    train_idx = train_idx[labels[train_idx] < classes]
    img_emb, img_lab = image_embeddings(anchor, pixels[train_idx]), labels[train_idx]
    targets = {"image_prototypes": class_prototypes(img_emb, img_lab, classes),
               "text_prompts": text_targets(anchor)[:classes]}
    task = SpokenDigitBinding(train_audio, train_lab, img_emb, img_lab, augment=recipe.augment)
    eval_fn = lambda m: audio_zero_shot(m, held_audio, held_lab, targets)  # noqa: E731
    model, history = bind_towers("vision", "audio", recipe.cfg, anchor, task, **recipe.bind_kwargs(), eval_fn=eval_fn,
                                 eval_every=eval_every, progress=progress)
    model.eval()
    held = audio_zero_shot(model, held_audio, held_lab, targets)
    train = audio_zero_shot(model, train_audio, train_lab, targets)
    state = dict(anchor.state_dict())
    state.update({k: v for k, v in model.state_dict().items() if k.split(".")[1] == "audio"})
    info = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_hash": digest,
        "base_encoder": str(base),
        "base_sha256": base_sha,
        "config": recipe.cfg,
        "modalities": ["vision", "text", "audio"],
        "speech": {"n_train": len(train_lab), "n_heldout": len(held_lab),
                   "train_voices": list(recipe.speech.train_voices),
                   "heldout_voices": list(recipe.speech.heldout_voices)},
        "accuracy": {"heldout_image_prototypes": held["image_prototypes"], "heldout_text_prompts": held["text_prompts"],
                     "train_image_prototypes": train["image_prototypes"], "train_text_prompts": train["text_prompts"]},
        "train_seconds": round(history.seconds, 1),
        "final_loss": float(np.mean(history.loss[-20:])),
        "evals": history.evals,
        "torch": torch.__version__,
    }
    info["sha256"] = save_state_dict(state, out_path)
    write_bytes_atomic(info_path, json.dumps(info, indent=1).encode())
    return AudioEncoder(out_path, info_path, info, trained=True)


@torch.no_grad()
def text_targets(model: ImageBindModel) -> Tensor:
    """Unit-norm text embeddings ``[10,C]`` of the zero-shot prompts (``a handwritten digit seven``)."""
    from ibllm.processing.clip_tokenizer import tokenize

    return F.normalize(model.encode("text", tokenize(class_prompts()))[0].float(), dim=-1)


# -------------------------------------------------------------------------------------- the experiment

@dataclass
class InputSet:
    """Held-out inputs of one modality: ``items`` (a batch tensor or a list of strings) and labels."""

    modality: str
    items: Tensor | list[str]
    labels: list[int]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> Tensor | list[str]:
        """Items ``start:stop``."""
        return self.items[start:stop]


@dataclass
class CellResult:
    """One table cell: accuracy over ``n`` inputs plus a few example captions."""

    modality: str
    cache: bool
    correct: int
    n: int
    examples: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    def line(self) -> str:
        """``crossmodal_accuracy input=audio cache=on: 0.42``."""
        return f"crossmodal_accuracy input={self.modality} cache={'on' if self.cache else 'off'}: {self.accuracy:.2f}"


def text_inputs(templates: Sequence[str] = TEXT_TEMPLATES) -> InputSet:
    """Every digit in every phrasing of ``templates`` (``{w}`` = word, ``{n}`` = numeral)."""
    texts, labels = [], []
    for t in templates:
        for d, w in enumerate(DIGIT_WORDS):
            texts.append(t.format(w=w, n=d))
            labels.append(d)
    return InputSet("text", texts, labels, list(texts))


def image_inputs(heldout: str | Sequence[str], limit: int | None = None) -> InputSet:
    """Held-out digit images of the demo shards, preprocessed like the stage-1 evaluation."""
    from callbacks.demo_eval import read_labelled_shards
    from ibllm.processing.image import load_image

    samples = read_labelled_shards(heldout, limit)
    if not samples:
        raise ValueError(f"no labelled images in {heldout}")
    images = torch.stack([load_image(png) for png, _ in samples])
    return InputSet("image", images, [int(lab) for _, lab in samples])


def audio_inputs(speech: SpokenDigits, split: str = "heldout", progress: bool = True) -> InputSet:
    """Spoken digits of ``split`` as ImageBind audio inputs ``[N,3,1,128,204]``."""
    paths = speech.paths(split)
    return InputSet("audio", speech_features(paths, progress), speech.labels(split).tolist(),
                    [Path(p).name for p in paths])


@torch.no_grad()
def caption_cell(model: torch.nn.Module, tokenizer: Any, inputs: InputSet, cache: Any = None, batch_size: int = 60,
                 max_gen_len: int = 16) -> CellResult:
    """Greedy stage-1 captions of ``inputs`` (cache-enhanced when ``cache``), scored by the demo metric."""
    from callbacks.demo_eval import caption_names_digit, greedy_answers
    from ibllm.processing.templates import caption_prompt

    result = CellResult(inputs.modality, cache is not None, 0, len(inputs))
    for start in range(0, len(inputs), batch_size):
        rows = inputs.rows(start, start + batch_size)
        labels = inputs.labels[start:start + batch_size]
        visual = model.bind(model.encode({inputs.modality: rows}, cache=cache))
        captions = greedy_answers(model, tokenizer, visual, [caption_prompt()] * len(labels), max_gen_len)
        for i, (caption, label) in enumerate(zip(captions, labels)):
            ok = caption_names_digit(caption, label)
            result.correct += ok
            name = inputs.names[start + i] if inputs.names else ""
            result.examples.append(f"[{label}] {name + ' -> ' if name else ''}{caption!r} {'✓' if ok else '✗'}")
    return result


def run_crossmodal(model: torch.nn.Module, tokenizer: Any, inputs: Sequence[InputSet], cache: Any,
                   batch_size: int = 60, max_gen_len: int = 16, echo: Callable[[str], None] | None = print,
                   examples: int = 0) -> list[CellResult]:
    """Every input set naive and with ``cache``; ``echo`` gets one line per cell (and ``examples`` captions)."""
    results = []
    for inp in inputs:
        for cached in (False, True):
            cell = caption_cell(model, tokenizer, inp, cache if cached else None, batch_size, max_gen_len)
            results.append(cell)
            if echo is not None:
                for line in cell.examples[:examples]:
                    echo("  " + line)
                echo(cell.line())
    return results


def markdown_table(results: Sequence[CellResult]) -> str:
    """The README table: one row per input modality, naive and cache columns."""
    cells = {(r.modality, r.cache): r for r in results}
    lines = ["| input (held-out) | n | naive | with visual cache |", "|---|---|---|---|"]
    for m in dict.fromkeys(r.modality for r in results):
        off, on = cells.get((m, False)), cells.get((m, True))
        n = (off or on).n
        lines.append(f"| {m} | {n} | {off.accuracy:.2f} | {on.accuracy:.2f} |" if off and on else f"| {m} | {n} | | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    """``python -m ibllm crossmodal`` arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m ibllm crossmodal",
        description="Cross-modal transfer on the demo (paper Fig. 4): bind a spoken-digit audio tower to the frozen "
                    "demo vision tower (once; espeak-ng), then caption held-out images, text phrases and spoken "
                    "digits with the image-only stage-1 model, naive and with the visual cache. Prints one line "
                    "per cell: crossmodal_accuracy input=audio cache=on: 0.xx")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="demo assets folder (default %(default)s)")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER),
                        help="stage-1 checkpoint trained on images only (default %(default)s)")
    parser.add_argument("--llama", default=None, help="base LLM (default: the one recorded in the adapter)")
    parser.add_argument("--cache", default=None, help="visual cache folder (default ROOT/cache)")
    parser.add_argument("--cache-k", type=int, default=10, help="neighbours per query (default %(default)s)")
    parser.add_argument("--cache-t", type=float, default=20.0, help="cache softmax temperature (default %(default)s)")
    parser.add_argument("--cache-w", type=float, default=0.5, help="cache weight (default %(default)s)")
    parser.add_argument("--audio-steps", type=int, default=None, help="override the audio tower's step count")
    parser.add_argument("--inputs", default=",".join(INPUTS), help="comma list of image,text,audio (default all)")
    parser.add_argument("--limit", type=int, default=None, help="at most N held-out images (default all)")
    parser.add_argument("--batch-size", type=int, default=60, help="captions per generation batch")
    parser.add_argument("--examples", type=int, default=3, help="example captions printed per cell")
    parser.add_argument("--json", default=None, help="also write the results (and table) to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> list[CellResult]:
    """Entry point of ``python -m ibllm crossmodal``."""
    import ibllm
    from ibllm.cache import load_cache

    args = build_parser().parse_args(argv)
    root = Path(args.root)
    wanted = [m.strip() for m in args.inputs.split(",") if m.strip()]
    bad = [m for m in wanted if m not in INPUTS]
    if bad:
        raise SystemExit(f"--inputs: unknown input {bad[0]!r}; choose from {', '.join(INPUTS)}")
    adapter = Path(args.adapter)
    if not adapter.is_file():
        raise SystemExit(f"no stage-1 checkpoint at {adapter}: run `make pretrain` first (the image-only demo "
                         "model this experiment transfers from)")
    cache_dir = Path(args.cache) if args.cache else root / "cache"
    if not cache_dir.exists():
        raise SystemExit(f"no visual cache at {cache_dir}: run `make cache` first")
    heldout = root / "shards" / "heldout"
    if "image" in wanted and not heldout.exists():
        raise SystemExit(f"no held-out digit shards in {heldout}: run `python -m ibllm demo prepare` first")
    progress = not args.quiet
    recipe = AudioRecipe() if args.audio_steps is None else AudioRecipe(steps=args.audio_steps)
    encoder = build_audio_encoder(root, recipe=recipe, progress=progress)
    acc = encoder.info["accuracy"]
    print(f"audio tower {encoder.path} ({'trained' if encoder.trained else 'up to date'}): held-out zero-shot "
          f"accuracy {acc['heldout_image_prototypes']:.3f} against the image class prototypes, "
          f"{acc['heldout_text_prompts']:.3f} against the text prompts "
          f"({encoder.info['speech']['n_heldout']} clips, unseen voices)", flush=True)
    cache = load_cache(cache_dir, k=args.cache_k, temperature=args.cache_t, weight=args.cache_w, dim=128)
    loaded = ibllm.load(adapter, llama=args.llama, imagebind=encoder.path)
    sets = []
    for m in wanted:
        if m == "image":
            sets.append(image_inputs(str(heldout), args.limit))
        elif m == "text":
            sets.append(text_inputs())
        else:
            speech = write_spoken_digits(root / SPEECH_DIR, recipe.speech, progress=progress)
            sets.append(audio_inputs(speech, "heldout", progress))
    start = time.perf_counter()
    results = run_crossmodal(loaded.model, loaded.tokenizer, sets, cache, args.batch_size, examples=args.examples)
    table = markdown_table(results)
    print(table)
    print(f"({time.perf_counter() - start:.0f} s; cache {cache})", flush=True)
    if args.json:
        payload = {"cells": [{"input": r.modality, "cache": r.cache, "accuracy": r.accuracy, "correct": r.correct,
                              "n": r.n, "examples": r.examples[:10]} for r in results],
                   "table": table, "audio_tower": encoder.info["accuracy"], "adapter": str(adapter),
                   "cache": str(cache_dir), "text_templates": list(TEXT_TEMPLATES)}
        write_bytes_atomic(Path(args.json), json.dumps(payload, indent=1).encode())
    return results


def _bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


if __name__ == "__main__":
    main()
