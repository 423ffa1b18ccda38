"""The easy-VQA demo's stage 0: the ``demo`` preset's vision + text towers bound on the labelled train images.

:func:`build_easyvqa_encoder` binds them with :func:`ibllm.stage0.bind_towers` against captions naming colour
and shape (``a teal circle``), with the stage-1 crop augmentation, and reports the zero-shot 24-way accuracy on
the labelled test images (and per attribute).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ibllm.atomic import write_bytes_atomic
from ibllm.demos.easyvqa.data import CAPTION_TEMPLATES, COLORS, SHAPES, class_captions, class_index, labelled_split
from ibllm.models.imagebind import ImageBindModel
from ibllm.processing.clip_tokenizer import tokenize
from ibllm.processing.image import image_transform, open_rgb
from ibllm.stage0 import EpochSampler, bind_towers, branch_logit_scale, model_embed, sample_class_captions
from ibllm.stage0_recipe import BindRecipe, TowerFile, existing_tower_info, info_path_for, save_state_dict

RECIPE_VERSION = 1


@dataclass
class EasyVQARecipe(BindRecipe):
    """Everything that determines the easy-VQA towers (its hash names the file's content)."""

    steps: int = 400
    stem_lr_scale: float = 0.03
    templates: tuple[str, ...] = CAPTION_TEMPLATES
    version: int = RECIPE_VERSION
    dataset: str = "easy-vqa"

    def bind_kwargs(self) -> dict[str, Any]:
        """:meth:`BindRecipe.bind_kwargs` plus the patch stems' learning-rate scale."""
        return {**super().bind_kwargs(), "stem_lr_scale": self.stem_lr_scale}


def load_split_images(split: str) -> tuple[list[Image.Image], Tensor]:
    """The labelled images of an easy-VQA split (RGB, in memory) and their 24-way classes ``[N]``."""
    items, paths = labelled_split(split)
    images = [open_rgb(paths[image_id]) for image_id, _, _ in items]
    return images, torch.tensor([class_index(color, shape) for _, color, shape in items])


class ShapeBinding:
    """:class:`ibllm.stage0.BindingTask` on easy-VQA: RGB images (the stage-1 transform) against captions
    naming colour and shape; all same-class pairs are positives, duplicate captions merged."""

    def __init__(self, images: Sequence[Image.Image], labels: Tensor, templates: Sequence[str] = CAPTION_TEMPLATES,
                 augment: bool = True) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = list(images)
        self.labels = labels.long()
        self.augment = augment
        captions = [c for t in templates for c in class_captions(t)]  # [template][class]
        self.tokens = tokenize(captions).view(len(templates), len(COLORS) * len(SHAPES), -1).transpose(0, 1)
        self._sampler = EpochSampler(len(self.labels))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Images ``[B,3,224,224]`` (stage-1 transform), distinct caption tokens ``[U,L]``, positive mask ``[B,U]``."""
        idx = self._sampler.next(batch_size, generator)
        pixels = torch.stack([image_transform(self.images[i], train=self.augment, generator=generator)
                              for i in idx.tolist()])
        tokens, mask = sample_class_captions(self.tokens, self.labels[idx], generator)
        return pixels, tokens, mask

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
        """Unit-norm embeddings through the model's own forward."""
        return model_embed(model, branch, x)


def shape_eval_fn(images: Sequence[Image.Image], labels: Tensor,
                  chunk: int = 128) -> Callable[[ImageBindModel], dict[str, float]]:
    """An ``eval_fn``: zero-shot accuracy over the 24 ``a {colour} {shape}`` prompts on the inference view
    (``acc``), and of the colour (``color_acc``) and shape (``shape_acc``) that prediction names."""
    @torch.no_grad()
    def evaluate(model: ImageBindModel) -> dict[str, float]:
        text = F.normalize(model.encode("text", tokenize(class_captions(CAPTION_TEMPLATES[0])))[0].float(), dim=-1)
        preds = []
        for start in range(0, len(images), chunk):
            pixels = torch.stack([image_transform(img, train=False) for img in images[start:start + chunk]])
            preds.append((model_embed(model, "vision", pixels) @ text.t()).argmax(dim=1))
        pred = torch.cat(preds)
        n_shapes = len(SHAPES)
        return {"acc": (pred == labels).float().mean().item(),
                "color_acc": (pred // n_shapes == labels // n_shapes).float().mean().item(),
                "shape_acc": (pred % n_shapes == labels % n_shapes).float().mean().item()}

    return evaluate


def build_easyvqa_encoder(out_path: str | Path, recipe: EasyVQARecipe | None = None, *, force: bool = False,
                          progress: bool = True) -> TowerFile:
    """Train (or reuse) the easy-VQA towers: ``demo`` preset vision + text, bound on the train images.

    Writes ``out_path`` (ImageBind-layout vision + text state dict, atomically) and ``<stem>.json`` with the
    recipe, its hash, zero-shot accuracies on the labelled test images and the file's sha256. Idempotent like
    :func:`ibllm.demos.digits.towers.build_demo_encoder`; ``force`` retrains.
    """
    recipe = recipe or EasyVQARecipe()
    out_path = Path(out_path)
    info_path = info_path_for(out_path)
    if not force and (info := existing_tower_info(out_path, info_path, recipe.digest())) is not None:
        return TowerFile(out_path, info_path, info, trained=False)
    train_images, train_labels = load_split_images("train")
    test_images, test_labels = load_split_images("test")
    task = ShapeBinding(train_images, train_labels, recipe.templates, augment=recipe.augment)
    start = time.perf_counter()
    model, history = bind_towers("vision", "text", recipe.cfg, None, task, **recipe.bind_kwargs(), progress=progress)
    test = shape_eval_fn(test_images, test_labels)(model)
    info: dict[str, Any] = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_hash": recipe.digest(),
        "config": recipe.cfg,
        "modalities": ["vision", "text"],
        "data": {"n_train_images": len(train_images), "n_test_images": len(test_images),
                 "labels": "colour and shape read off each image's own questions"},
        # ``heldout_centre`` is the key TowerFile.accuracy reads: here the test images' 24-way accuracy.
        "accuracy": {"heldout_centre": test["acc"], "test": test},
        "zero_shot_prompt": CAPTION_TEMPLATES[0],
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean(history.loss[-20:])),
        "text_logit_scale": branch_logit_scale(model, "vision", "text").item(),
        "torch": torch.__version__,
    }
    info["sha256"] = save_state_dict(model.state_dict(), out_path)
    write_bytes_atomic(info_path, json.dumps(info, indent=1).encode())
    return TowerFile(out_path, info_path, info, trained=True)
