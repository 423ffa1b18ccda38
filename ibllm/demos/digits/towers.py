"""The digits demo's stage 0: the ``demo`` preset's vision and text towers bound on the digits.

:func:`build_demo_encoder` trains both towers from scratch with :func:`ibllm.stage0.bind_towers` on the
training digits (upscaled 8x8 -> 224x224, NEAREST) and captions naming the digit, with the stage-1 crop
augmentation so the frozen features stay robust to it. It writes an ImageBind-layout state dict (vision +
text) and a JSON with the recipe and accuracies; ``python -m ibllm bind`` runs it from the command line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ibllm.atomic import write_bytes_atomic
from ibllm.demos.digits.captions import CAPTION_TEMPLATES, ZERO_SHOT_TEMPLATE, class_prompts, digit_captions
from ibllm.demos.digits.pixels import (
    digit_split,
    grey_to_clip,
    grey_vision_embed,
    load_digit_pixels,
    render_digits,
    sample_crops,
)
from ibllm.models.imagebind import ImageBindModel
from ibllm.processing.clip_tokenizer import tokenize
from ibllm.stage0 import EpochSampler, bind_towers, branch_logit_scale, model_embed, sample_class_captions
from ibllm.stage0_recipe import BindRecipe, TowerFile, existing_tower_info, info_path_for, save_state_dict
from ibllm.verbs.registry import run, verb

RECIPE_VERSION = 1


class DigitBinding:
    """:class:`ibllm.stage0.BindingTask` on the digits: images (stage-1 crops) against captions naming the digit.

    Each sample gets a random crop and a random caption template; identical captions in a batch are merged
    (the text side holds each distinct caption once) and all same-digit pairs are positives. Text token rows
    are trimmed after the longest caption (exact: the text trunk is causal and pools at the EOT token).
    """

    def __init__(self, pixels: Tensor, labels: Tensor, templates: Sequence[str] = CAPTION_TEMPLATES,
                 augment: bool = True) -> None:
        self.pixels = pixels.float()
        self.labels = labels.long()
        self.templates = tuple(templates)
        self.augment = augment
        captions = [c for d in range(10) for c in digit_captions(d, self.templates)]
        self.tokens = tokenize(captions).view(10, len(self.templates), -1)  # [10, T, 77]
        self._sampler = EpochSampler(len(self.labels))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Grey images ``[B,224,224]``, distinct caption tokens ``[U,L]`` and the positive mask ``[B,U]``."""
        idx = self._sampler.next(batch_size, generator)
        crops = sample_crops(len(idx), generator) if self.augment else None
        grey = render_digits(self.pixels[idx], crops)
        labels = self.labels[idx]
        tokens, mask = sample_class_captions(self.tokens, labels, generator)
        return grey, tokens, mask

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
        """Unit-norm embeddings: the grey fast path for vision, the model's forward otherwise."""
        if branch == "vision":
            return grey_vision_embed(model, x)
        return model_embed(model, branch, x)


def digit_eval_fn(pixels: Tensor, labels: Tensor, crops_per_image: int = 3, seed: int = 1234,
                  fast: bool = True, chunk: int = 128) -> Callable[[ImageBindModel], dict[str, float]]:
    """An ``eval_fn`` giving held-out zero-shot accuracy on the centre view (``acc``) and on
    ``crops_per_image`` seeded stage-1 crops per image (``acc_crop``).

    ``fast`` uses :func:`ibllm.demos.digits.pixels.grey_vision_embed`; otherwise the model's own forward on
    CLIP-normalised RGB. Views are rendered chunk by chunk (never all at once).
    """
    generator = torch.Generator().manual_seed(seed)
    views: dict[str, tuple[Tensor, Tensor | None, Tensor]] = {"acc": (pixels, None, labels)}
    if crops_per_image > 0:
        reps = pixels.repeat_interleave(crops_per_image, dim=0)
        views["acc_crop"] = (reps, sample_crops(len(reps), generator), labels.repeat_interleave(crops_per_image))
    prompts = class_prompts()

    def embed(model: ImageBindModel, grey: Tensor) -> Tensor:
        return grey_vision_embed(model, grey) if fast else model_embed(model, "vision", grey_to_clip(grey))

    @torch.no_grad()
    def evaluate(model: ImageBindModel) -> dict[str, float]:
        text = F.normalize(model.encode("text", tokenize(prompts))[0].float(), dim=-1)
        result = {}
        for name, (pix, crops, lab) in views.items():
            correct = 0
            for start in range(0, len(pix), chunk):
                box = None if crops is None else crops[start:start + chunk]
                grey = render_digits(pix[start:start + chunk], box)
                pred = (embed(model, grey) @ text.t()).argmax(dim=1)
                correct += int((pred == lab[start:start + chunk]).sum())
            result[name] = correct / len(pix)
        return result

    return evaluate


@dataclass
class DemoRecipe(BindRecipe):
    """Everything that determines the demo encoder (its hash names the file's content).

    Attributes:
        stem_lr_scale: learning-rate factor of the patch stems (trained from scratch here)
        templates: the caption templates
        version: the recipe code's version (a change retrains)
    """

    stem_lr_scale: float = 0.03
    templates: tuple[str, ...] = CAPTION_TEMPLATES
    version: int = RECIPE_VERSION

    def bind_kwargs(self) -> dict[str, Any]:
        """:meth:`BindRecipe.bind_kwargs` plus the patch stems' learning-rate scale."""
        return {**super().bind_kwargs(), "stem_lr_scale": self.stem_lr_scale}


class DemoEncoder(TowerFile):
    """Result of :func:`build_demo_encoder`."""


def build_demo_encoder(out_path: str | Path, seed: int = 0, *, steps: int | None = None,
                       recipe: DemoRecipe | None = None, force: bool = False, progress: bool = True,
                       eval_every: int = 0) -> DemoEncoder:
    """Train (or reuse) the demo's frozen ImageBind encoder: vision + text towers of the ``demo`` preset.

    Recipe (:class:`DemoRecipe`): the digits of :func:`ibllm.demos.digits.pixels.digit_split` (train part
    only), stage-1 crops, captions from the demo's caption templates, class-aware InfoNCE with ImageBind's
    learnable text logit scale, AdamW with warmup + cosine decay, bf16 autocast. Writes ``out_path``
    (``.safetensors`` -> safetensors, anything else -> ``torch.save``; atomically) holding the flat ImageBind
    state dict of the vision and text branches, and ``<out_path stem>.json`` with the recipe, its hash,
    accuracies, timing and the file's sha256. Idempotent: when that JSON records the same recipe hash and the
    file matches its sha256, nothing is retrained (``trained=False``). ``force`` retrains anyway.
    """
    recipe = recipe or DemoRecipe(seed=seed)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    out_path = Path(out_path)
    info_path = info_path_for(out_path)
    if not force and (info := existing_tower_info(out_path, info_path, recipe.digest())) is not None:
        return DemoEncoder(out_path, info_path, info, trained=False)
    pixels, labels = load_digit_pixels()
    train_idx, held_idx = digit_split(recipe.seed, recipe.heldout_fraction)
    train_idx_t, held_idx_t = torch.from_numpy(train_idx), torch.from_numpy(held_idx)
    task = DigitBinding(pixels[train_idx_t], labels[train_idx_t], recipe.templates, augment=recipe.augment)
    eval_fn = digit_eval_fn(pixels[held_idx_t], labels[held_idx_t])
    model, history = bind_towers("vision", "text", recipe.cfg, None, task, **recipe.bind_kwargs(), eval_fn=eval_fn,
                                 eval_every=eval_every, progress=progress)
    # Centre view through the model's own forward on CLIP-normalised RGB (what stage 1 feeds it); the crops
    # through the equivalent fast path.
    model.eval()
    held_pix, held_lab = pixels[held_idx_t], labels[held_idx_t]
    final = {**digit_eval_fn(held_pix, held_lab)(model),
             "acc": digit_eval_fn(held_pix, held_lab, crops_per_image=0, fast=False)(model)["acc"]}
    train_centre = digit_eval_fn(pixels[train_idx_t], labels[train_idx_t], crops_per_image=0)(model)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_hash": recipe.digest(),
        "config": recipe.cfg,
        "modalities": ["vision", "text"],
        "seed": recipe.seed,
        "split": {"n_train": len(train_idx), "n_heldout": len(held_idx), "rule": "default_rng(seed).permutation"},
        "accuracy": {"heldout_centre": final["acc"], "heldout_crop": final["acc_crop"],
                     "train_centre": train_centre["acc"]},
        "zero_shot_prompt": ZERO_SHOT_TEMPLATE,
        "train_seconds": round(history.seconds, 1),
        "final_loss": float(np.mean(history.loss[-20:])),
        "text_logit_scale": branch_logit_scale(model, "vision", "text").item(),
        "evals": history.evals,
        "torch": torch.__version__,
    }
    info["sha256"] = save_state_dict(model.state_dict(), out_path)
    write_bytes_atomic(info_path, json.dumps(info, indent=1).encode())
    return DemoEncoder(out_path, info_path, info, trained=True)


# ------------------------------------------------------------------------------------------------ CLI

@verb("bind", flat=("recipe",), skip=("templates", "version"), aliases={"--fp32": "--bf16=false"},
      config_fallback="--cfg",
      epilog="Example: python -m ibllm bind --out runs/demo/imagebind_demo.safetensors (load it with "
             "ibllm.models.imagebind.load_imagebind(path, 'demo', ['vision', 'text'])); the recipe as YAML: "
             "--config experiments/stage0_digits.yaml. --config PRESET (not a file) still names the preset (--cfg).")
def bind_command(out: str, recipe: DemoRecipe = DemoRecipe(), eval_every: int = 0, force: bool = False,
                 quiet: bool = False) -> DemoEncoder:
    """Train the embedded demo's ImageBind encoder (stage 0): bind the vision and text towers of the 'demo'
    preset on scikit-learn's handwritten digits with class-aware InfoNCE. Writes an ImageBind-layout state
    dict (vision + text) and a JSON report next to it; reruns with the same recipe return the existing file
    without training. Prints a one-line summary.

    Args:
        out: encoder file (.safetensors, or .pth/.pt for torch.save)
        recipe: the stage-0 recipe (every field an option; its hash names the file's content)
        eval_every: held-out evaluation every N steps (0: end only)
        force: retrain even if a matching encoder exists
        quiet: no progress bar
    """
    result = build_demo_encoder(out, recipe=recipe, force=force, progress=not quiet, eval_every=eval_every)
    acc = result.info["accuracy"]
    state = "trained" if result.trained else "up to date (recipe hash matches; not retrained)"
    print(f"{result.path}: {state}; held-out zero-shot accuracy {acc['heldout_centre']:.3f} (centre), "
          f"{acc['heldout_crop']:.3f} (stage-1 crops); train {result.info['train_seconds']} s; "
          f"report {result.info_path}")
    return result


def main(argv: Sequence[str] | None = None) -> DemoEncoder:
    """Entry point of ``python -m ibllm bind``; returns the result."""
    return run("bind", argv)
