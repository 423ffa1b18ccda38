"""The cross-modal demo's audio tower: the ``demo`` preset's ``audio`` branch bound to the FROZEN demo vision
tower (stage 0 for a new modality, as ImageBind and Point-Bind do).

Every spoken digit (:mod:`ibllm.demos.crossmodal.speech`) is paired with training images of its class
(class-aware InfoNCE, :func:`ibllm.stage0.bind_towers`). :func:`build_audio_encoder` writes
``encoder_av.safetensors`` = the unchanged vision + text tensors plus the new audio branch, and
``encoder_av.json`` (recipe hash, held-out zero-shot accuracies). Idempotent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ibllm.atomic import write_bytes_atomic
from ibllm.demos.crossmodal.speech import SPEECH_DIR, SpeechSpec, speech_features, write_spoken_digits
from ibllm.demos.digits.captions import class_prompts
from ibllm.demos.digits.pixels import digit_split, grey_vision_embed, load_digit_pixels, render_digits
from ibllm.models.imagebind import ImageBindModel, load_imagebind
from ibllm.processing.audio import FBANK_STD
from ibllm.processing.clip_tokenizer import tokenize
from ibllm.stage0 import EpochSampler, bind_towers, model_embed, positive_mask
from ibllm.stage0_recipe import BindRecipe, TowerFile, existing_tower_info, file_sha256, save_state_dict

DEFAULT_ROOT = Path("data/demo")
AUDIO_ENCODER = "encoder_av.safetensors"
RECIPE_VERSION = 1


class SpokenDigitBinding:
    """:class:`ibllm.stage0.BindingTask`: spoken digits (audio branch) against digit images of their class.

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


class AudioEncoder(TowerFile):
    """Result of :func:`build_audio_encoder`."""

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
    :func:`ibllm.demos.digits.pixels.digit_split`. Writes ``out_path`` (default ``root/encoder_av.safetensors``,
    atomically): the base file's tensors unchanged plus the audio branch, and a JSON report beside it.
    Idempotent like :func:`ibllm.demos.digits.towers.build_demo_encoder`: the same recipe on the same base file (sha256)
    with an intact output file is not retrained (``trained=False``); ``force`` retrains.
    """
    root = Path(root)
    recipe = recipe or AudioRecipe()
    base = Path(base) if base is not None else root / "encoder.safetensors"
    out_path = Path(out_path) if out_path is not None else root / AUDIO_ENCODER
    info_path = out_path.with_suffix(".json")
    if not base.is_file():
        raise FileNotFoundError(f"base demo encoder {base} not found: run `python -m ibllm demo prepare` first")
    base_sha = file_sha256(base)
    digest = recipe.digest(base=base_sha)
    if not force and (info := existing_tower_info(out_path, info_path, digest)) is not None:
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
    return F.normalize(model.encode("text", tokenize(class_prompts()))[0].float(), dim=-1)
