"""Contrastive binding of ImageBind branches ("stage 0" of the embedded demo).

ImageBind aligns every modality to the image tower with a symmetric InfoNCE loss; Point-Bind binds a 3-D
encoder to a frozen ImageBind the same way. This module offers that step as a reusable function:

* :func:`bind_towers` trains one ImageBind branch (``new``) against another (``anchor``). With a frozen
  ``anchor_model`` only the new branch learns (how a user binds a new modality to an existing image
  tower); without one both branches train from scratch.
* :func:`build_demo_encoder` is the embedded demo's recipe: the vision and text towers of the ``demo``
  preset bound on scikit-learn's real handwritten digits (upscaled 8x8 -> 224x224, NEAREST) and captions
  naming the digit, trained with the stage-1 crop augmentation so the frozen features stay robust to it.
  It writes an ImageBind-layout state dict (vision + text) and a JSON with the recipe and accuracies.
* :func:`zero_shot_accuracy`, :func:`digit_split` and :func:`main` (``python -m ibllm bind``).

The loss (:func:`multi_positive_infonce`) is CLIP's symmetric InfoNCE generalised to a positive *mask*:
every pair that shares a class label is a positive (cross-entropy against the uniform distribution over a
row's / column's positives). With one positive per row it is exactly CLIP's loss; with labels it removes
the false negatives plain InfoNCE suffers when one batch holds many captions of the same digit.

Temperature: by default the logit scale is ImageBind's own postprocessor scale of the non-vision branch
(text: the learnable ``log_logit_scale``, initialised at 1/0.07 and capped at 100, as in ImageBind; audio,
depth, thermal, IMU, point: ImageBind's fixed buffers). Pass ``logit_scale=<float>`` to fix it instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.atomic import atomic_write, write_bytes_atomic
from ibllm.config import ImageBindConfig, imagebind_preset
from ibllm.models.imagebind import ImageBindModel

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

NUM_DIGITS = 1797
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The zero-shot prompt (also the first training template and the demo shards' first caption template).
ZERO_SHOT_TEMPLATE = "a handwritten digit {w}"
CAPTION_TEMPLATES: tuple[str, ...] = (
    ZERO_SHOT_TEMPLATE,
    "the number {w} written by hand",
    "a photo of the digit {n}",
    "a photo of the number {w}",
    "the digit {w} written by hand",
    "a handwritten {n}, the digit {w}",
    "a small grey digit {w} on a black background",
    "an image of the handwritten number {w}",
    "the number {w}",
)
# Stage-1 training crop (SPEC §5.1).
CROP_SCALE: tuple[float, float] = (0.9, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
RECIPE_VERSION = 1


# --------------------------------------------------------------------------------------------- the loss

def multi_positive_infonce(logits: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE with a positive mask.

    ``logits`` ``[A, N]`` (already scaled by the temperature), ``positives`` bool ``[A, N]``. Each row is a
    cross-entropy of ``softmax(logits[i])`` against the uniform distribution over its positives, each column
    likewise over the anchors; rows/columns without a positive are skipped; the result is the mean of the
    two directions. With ``positives = eye`` this is CLIP's loss.
    """
    logits = logits.float()
    pos = positives.to(logits.dtype)

    def one_side(lg: Tensor, ps: Tensor) -> Tensor:
        count = ps.sum(dim=1)
        keep = count > 0
        logp = lg.log_softmax(dim=1)
        per_row = -(logp * ps).sum(dim=1) / count.clamp_min(1)
        return per_row[keep].mean()

    return 0.5 * (one_side(logits, pos) + one_side(logits.t(), pos.t()))


def intra_infonce(emb: Tensor, positives: Tensor, scale: Tensor | float) -> Tensor:
    """Class-aware InfoNCE among one branch's own embeddings ``[N, D]`` (unit norm); self-pairs excluded.

    ``positives`` bool ``[N, N]``; rows without another positive are skipped (zero if none has one).
    """
    n = emb.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    logits = (scale * emb.float() @ emb.float().t()).masked_fill(eye, float("-inf"))
    pos = (positives & ~eye).float()
    count = pos.sum(dim=1)
    keep = count > 0
    if not keep.any():
        return emb.sum() * 0.0
    logp = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    return (-(logp * pos).sum(dim=1)[keep] / count[keep]).mean()


def positive_mask(anchor_labels: Tensor, new_labels: Tensor) -> Tensor:
    """``[A, N]`` bool: True where the labels are equal (a label of -1 matches nothing)."""
    return (anchor_labels[:, None] == new_labels[None, :]) & (anchor_labels[:, None] >= 0)


# ------------------------------------------------------------------------------------- binding tasks

class BindingTask(Protocol):
    """Paired training data for :func:`bind_towers`.

    ``train_batch`` returns the anchor inputs, the new-branch inputs (their counts may differ, e.g. when
    duplicate captions are merged) and the bool positive mask ``[n_anchor, n_new]``. ``embed`` turns one
    branch's inputs into unit-norm embeddings (the default is the model's own forward; a task may use an
    exactly equivalent faster path).
    """

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]: ...

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor: ...


def model_embed(model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
    """Unit-norm embedding of one single-clip batch through ``model`` (the logit scale divided out)."""
    return F.normalize(model.encode(branch, x)[0].float(), dim=-1)


@dataclass
class PairedTensors:
    """A generic :class:`BindingTask`: ``anchor[i]`` and ``new[i]`` are one pair (e.g. image and audio clip).

    With ``labels`` (int ``[N]``) every pair of samples sharing a label counts as positive; without, only
    the matching pair does (plain CLIP InfoNCE).
    """

    anchor: Tensor
    new: Tensor
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.anchor) != len(self.new):
            raise ValueError(f"anchor and new hold {len(self.anchor)} and {len(self.new)} samples")
        if self.labels is not None and len(self.labels) != len(self.anchor):
            raise ValueError(f"labels hold {len(self.labels)} entries for {len(self.anchor)} samples")
        self._sampler = EpochSampler(len(self.anchor))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = self._sampler.next(batch_size, generator)
        if self.labels is None:
            mask = torch.eye(len(idx), dtype=torch.bool)
        else:
            lab = self.labels[idx]
            mask = positive_mask(lab, lab)
        return self.anchor[idx], self.new[idx], mask

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
        return model_embed(model, branch, x)


class EpochSampler:
    """Indices in reshuffled passes over ``range(n)`` (every sample once per epoch)."""

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n = n
        self._order = torch.empty(0, dtype=torch.long)

    def next(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """The next ``batch_size`` indices (a batch may straddle two epochs)."""
        while len(self._order) < batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=generator)])
        idx, self._order = self._order[:batch_size], self._order[batch_size:]
        return idx


# --------------------------------------------------------------------------------------- the trainer

@dataclass
class BindHistory:
    """What :func:`bind_towers` measured: per-step loss / in-batch accuracy, periodic evaluations."""

    loss: list[float] = field(default_factory=list)
    batch_acc: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def bind_towers(
    anchor: str = "vision",
    new: str = "text",
    cfg: ImageBindConfig | str = "demo",
    anchor_model: ImageBindModel | None = None,
    data: BindingTask | None = None,
    steps: int = 300,
    lr: float = 2e-3,
    warmup: int = 30,
    batch_size: int = 128,
    seed: int = 0,
    *,
    min_lr_ratio: float = 0.02,
    weight_decay: float = 0.05,
    bf16: bool = True,
    grad_clip: float = 1.0,
    logit_scale: float | None = None,
    pos_init_scale: float = 0.0,
    intra_weight: float = 0.0,
    stem_lr_scale: float = 1.0,
    eval_fn: Callable[[ImageBindModel], dict[str, float]] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> tuple[ImageBindModel, BindHistory]:
    """Bind branch ``new`` to branch ``anchor`` with (class-aware) symmetric InfoNCE; returns (model, history).

    * ``anchor_model`` given: it must hold the ``anchor`` branch; it stays frozen (its weights are never
      touched) and only a freshly initialised ``new`` branch trains. The returned model holds both branches
      (the anchor's tensors copied in, bit-identical).
    * ``anchor_model`` None: both branches are initialised from ``seed`` and trained together.

    ``data`` supplies the pairs (:class:`BindingTask`, e.g. :class:`PairedTensors` or :class:`DigitBinding`).
    Schedule: AdamW (no decay on norms, biases, embeddings, tokens, logit scale), linear warmup for
    ``warmup`` steps, cosine decay to ``min_lr_ratio * lr``; bf16 autocast on CPU when ``bf16``. Temperature:
    ImageBind's own logit scale of the non-vision branch (learnable for text) unless ``logit_scale`` fixes it.
    ``eval_fn(model)`` runs every ``eval_every`` steps and at the end (recorded in the history).

    Helpers for training small towers from scratch (all off by default): ``pos_init_scale`` starts trained
    patch branches from a 2-D sine-cosine positional embedding of that RMS (:func:`init_patch_pos_embed`);
    ``intra_weight`` adds a class-aware InfoNCE among the new branch's own embeddings (two samples are
    positives when they share a positive anchor), which keeps a from-scratch text tower from collapsing
    while the image tower is still uninformative; ``stem_lr_scale`` multiplies the patch stems' learning rate.
    """
    if data is None:
        raise ValueError("bind_towers needs data: a BindingTask such as PairedTensors or DigitBinding")
    if anchor == new:
        raise ValueError(f"anchor and new branch are both {anchor!r}")
    cfg = imagebind_preset(cfg) if isinstance(cfg, str) else cfg
    model = _init_model(cfg, anchor, new, anchor_model, seed)
    trainable = _trainable_branches(anchor, new, anchor_model)
    for branch in trainable:
        init_patch_pos_embed(model, branch, pos_init_scale)
    params = [p for n, p in model.named_parameters() if _branch_of(n) in trainable]
    for n, p in model.named_parameters():
        p.requires_grad_(_branch_of(n) in trainable)
    groups = _param_groups(model, trainable, weight_decay, stem_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    schedule = cosine_schedule(steps, warmup, min_lr_ratio)
    generator = torch.Generator().manual_seed(seed)
    history = BindHistory()
    bar = _progress(steps, progress, f"bind {new}->{anchor}")
    start = time.perf_counter()
    model.train()
    if anchor_model is not None:
        _set_branch_mode(model, anchor, train=False)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step) * group["lr_scale"]
        loss, acc = _train_step(model, data, anchor, new, batch_size, generator, bf16, logit_scale, intra_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        history.loss.append(loss.item())
        history.batch_acc.append(acc)
        if eval_fn is not None and eval_every > 0 and (step + 1) % eval_every == 0 and step + 1 < steps:
            history.evals.append({"step": step + 1, **_evaluate(model, eval_fn)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(_postfix(history, model, new, anchor, logit_scale))
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - start
    if eval_fn is not None:
        history.evals.append({"step": steps, **_evaluate(model, eval_fn)})
    model.eval()
    return model, history


def _init_model(cfg: ImageBindConfig, anchor: str, new: str, anchor_model: ImageBindModel | None,
                seed: int) -> ImageBindModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageBindModel(cfg, [anchor, new])
    if anchor_model is not None:
        if anchor not in anchor_model.modalities:
            raise ValueError(f"anchor_model has no {anchor!r} branch (it has {list(anchor_model.modalities)})")
        source = {k: v for k, v in anchor_model.state_dict().items() if _branch_of(k) == anchor}
        target = {k for k in model.state_dict() if _branch_of(k) == anchor}
        if set(source) != target:
            raise ValueError(f"anchor_model's {anchor!r} branch does not match config {cfg.name!r}")
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in source:
                    if v.shape != source[k].shape:
                        raise ValueError(f"anchor tensor {k}: {tuple(source[k].shape)} vs config {tuple(v.shape)}")
                    v.copy_(source[k])
    return model


def sincos_pos_embed(grid: Sequence[int], dim: int) -> Tensor:
    """2-D sine-cosine positional embedding ``[prod(grid), dim]`` (MAE-style) over the last two grid axes,
    repeated over any leading axes; rows are unit-RMS."""
    gh, gw = int(grid[-2]), int(grid[-1])
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter)))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    parts = [f(a.reshape(-1, 1) * freq) for a in (ys, xs) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, dim - emb.shape[1]))
    lead = math.prod(int(g) for g in grid[:-2])
    return emb.repeat(lead, 1).float()


def init_patch_pos_embed(model: ImageBindModel, branch: str, scale: float) -> bool:
    """Re-initialise a patch branch's positional embedding (patch part) as ``scale *`` 2-D sine-cosine.

    A freshly initialised ImageBind tower has a tiny random positional embedding (std 0.02), so it starts out
    almost blind to *where* a patch is; a sine-cosine start lets small towers learn shapes quickly. Returns
    False (and does nothing) for branches without a patch grid (text, IMU).
    """
    pre = model.modality_preprocessors[branch]
    helper = getattr(pre, "pos_embedding_helper", None)
    if helper is None or scale <= 0:
        return False
    pos = helper.pos_embed
    with torch.no_grad():
        pos[0, helper.num_cls:] = scale * sincos_pos_embed(helper.grid, pos.shape[-1]).to(pos.dtype)
    return True


def _branch_of(key: str) -> str | None:
    parts = key.split(".")
    return parts[1] if len(parts) > 1 and parts[0].startswith("modality_") else None


def _trainable_branches(anchor: str, new: str, anchor_model: ImageBindModel | None) -> set[str]:
    return {new} if anchor_model is not None else {anchor, new}


def _set_branch_mode(model: ImageBindModel, branch: str, train: bool) -> None:
    for group in (model.modality_preprocessors, model.modality_trunks, model.modality_heads,
                  model.modality_postprocessors):
        if branch in group:
            group[branch].train(train)


STEM_KEYS = ("rgbt_stem.proj", "depth_stem.proj")


def _param_groups(model: nn.Module, trainable: set[str], weight_decay: float,
                  stem_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, undecayed vectors/embeddings, and patch stems at ``stem_lr_scale``.

    A patch stem sums ``kernel`` (here 2x28x28x3) inputs, so Adam's per-element step moves its tokens
    hundreds of times more than a step moves a trunk activation: it gets a smaller learning rate.
    """
    decay, no_decay, stem = [], [], []
    for name, p in model.named_parameters():
        if _branch_of(name) not in trainable:
            continue
        if any(k in name for k in STEM_KEYS):
            stem.append(p)
        elif p.ndim < 2 or any(s in name for s in ("token_embedding", "pos_embed", "cls_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": stem, "weight_decay": weight_decay, "lr_scale": stem_lr_scale}]
    return [g for g in groups if g["params"]]


def cosine_schedule(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def branch_logit_scale(model: ImageBindModel, anchor: str, new: str) -> Tensor:
    """ImageBind's scale for ``anchor``-``new`` logits: the non-vision branch's ``exp(log_logit_scale)`` (<= 100)."""
    for branch in (new, anchor):
        post = model.modality_postprocessors[branch]
        if len(post) > 1:
            scaler = post[1]
            return scaler.log_logit_scale.exp().clamp(max=scaler.max_logit_scale)
    return torch.tensor(1 / 0.07)


def _train_step(model: ImageBindModel, data: BindingTask, anchor: str, new: str, batch_size: int,
                generator: torch.Generator, bf16: bool, logit_scale: float | None,
                intra_weight: float = 0.0) -> tuple[Tensor, float]:
    xa, xn, mask = data.train_batch(batch_size, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ea = data.embed(model, anchor, xa)
        en = data.embed(model, new, xn)
    scale = branch_logit_scale(model, anchor, new) if logit_scale is None else torch.tensor(float(logit_scale))
    logits = scale * ea.float() @ en.float().t()
    loss = multi_positive_infonce(logits, mask)
    if intra_weight > 0:
        # Two new-branch samples are positives when they share a positive anchor (same class).
        shared = (mask.t().float() @ mask.float()) > 0
        loss = loss + intra_weight * intra_infonce(en, shared, scale)
    with torch.no_grad():
        acc = mask[torch.arange(len(mask)), logits.argmax(dim=1)].float().mean().item()
    return loss, acc


def _evaluate(model: ImageBindModel, eval_fn: Callable[[ImageBindModel], dict[str, float]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = eval_fn(model)
    model.train(was_training)
    return result


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def _postfix(history: BindHistory, model: ImageBindModel, new: str, anchor: str,
             logit_scale: float | None) -> dict[str, str]:
    window = 20
    post = {
        "loss": f"{np.mean(history.loss[-window:]):.3f}",
        "acc": f"{np.mean(history.batch_acc[-window:]):.3f}",
        "T": f"{float(logit_scale or branch_logit_scale(model, anchor, new).item()):.1f}",
    }
    if history.evals:
        post.update({k: f"{v:.3f}" for k, v in history.evals[-1].items() if k != "step"})
    return post


# ---------------------------------------------------------------------------------- evaluation helper

@torch.no_grad()
def zero_shot_accuracy(model: ImageBindModel, images: Tensor, labels: Tensor | Sequence[int],
                       class_texts: Sequence[str] | Tensor, batch_size: int = 128, branch: str = "vision") -> float:
    """Top-1 accuracy of classifying ``images`` by their nearest class text embedding.

    ``images`` is the branch input (``[N,3,224,224]`` CLIP-normalised for vision), ``labels`` int ``[N]``
    indexing ``class_texts`` (strings, tokenised with the CLIP tokenizer, or a ``[C,77]`` token tensor).
    """
    if not isinstance(class_texts, Tensor):
        from ibllm.processing.clip_tokenizer import tokenize

        class_texts = tokenize(list(class_texts))
    labels = torch.as_tensor(labels, dtype=torch.long)
    was_training = model.training
    model.eval()
    text = F.normalize(model.encode("text", class_texts)[0].float(), dim=-1)
    correct = 0
    for start in range(0, len(images), batch_size):
        emb = model_embed(model, branch, images[start:start + batch_size])
        pred = (emb @ text.t()).argmax(dim=1)
        correct += int((pred == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(images))


# -------------------------------------------------------------------------------------------- digits

def digit_split(seed: int = 0, heldout_fraction: float = 0.2, n: int = NUM_DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """The demo's fixed train / held-out split of the 1,797 digits -> ``(train_idx, heldout_idx)``, sorted int64.

    ``numpy.random.default_rng(seed).permutation(n)``: the first ``ceil(n * heldout_fraction)`` indices
    (360 for the defaults) are held out, the rest train.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_held = math.ceil(round(n * heldout_fraction, 9))
    return np.sort(order[n_held:]).astype(np.int64), np.sort(order[:n_held]).astype(np.int64)


def load_digit_pixels() -> tuple[Tensor, Tensor]:
    """scikit-learn digits as 8-bit grey levels ``round(v / 16 * 255)``: ``(float [1797,8,8], labels int64 [1797])``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = np.clip(np.rint(data.images.astype(np.float64) * 255.0 / 16.0), 0, 255)
    return torch.from_numpy(grey).float(), torch.from_numpy(data.target.astype(np.int64))


def digit_captions(digit: int, templates: Sequence[str] = CAPTION_TEMPLATES) -> list[str]:
    """Every caption of ``digit`` (``{w}`` = its word, ``{n}`` = its numeral)."""
    return [t.format(w=DIGIT_WORDS[digit], n=digit) for t in templates]


def class_prompts(template: str = ZERO_SHOT_TEMPLATE) -> list[str]:
    """The 10 zero-shot prompts, e.g. ``"a handwritten digit seven"``."""
    return [template.format(w=w, n=d) for d, w in enumerate(DIGIT_WORDS)]


def nearest_upscale_matrix(small: int = 8, size: int = 224) -> Tensor:
    """``U [size, small]`` with ``U[r, r * small // size] = 1``: ``U @ x @ U.T`` is PIL's NEAREST upscale."""
    u = torch.zeros(size, small)
    u[torch.arange(size), torch.arange(size) * small // size] = 1.0
    return u


def _pil_bicubic(x: Tensor, a: float = -0.5) -> Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def crop_resize_weights(start: Tensor, length: Tensor, size: int = 224, in_size: int = 224,
                        small: int | None = None) -> Tensor:
    """PIL's bicubic resize of the crops ``[start, start + length)`` to ``size``, as matrices.

    Row ``i`` holds the normalised weights PIL (``ImagingResample``: bicubic a=-0.5, support 2, at most 5
    taps) gives the source pixels for output pixel ``i``; crops are at most ``in_size`` long (upsampling).
    Returns ``[B, size, in_size]``, or, with ``small``, the weights summed per NEAREST-upscale bin
    (source pixel ``r`` -> ``r * small // in_size``): ``[B, size, small]``, i.e. ``weights @ U``.
    """
    start = start.double()[:, None, None]
    length = length.double()[:, None, None]
    center = (torch.arange(size, dtype=torch.float64)[None, :, None] + 0.5) * length / size
    xmin = (center - 1.5).trunc().clamp_min(0)
    xmax = torch.minimum((center + 2.5).trunc(), length)
    taps = xmin + torch.arange(5, dtype=torch.float64)  # [B, size, 5], positions within the crop
    w = torch.where(taps < xmax, _pil_bicubic(taps - center + 0.5), torch.zeros(()))
    w = w / w.sum(dim=2, keepdim=True)
    source = (start + taps).clamp(0, in_size - 1).long()
    columns = source * small // in_size if small is not None else source
    out = torch.zeros(w.shape[0], size, small or in_size, dtype=torch.float64)
    return out.scatter_add_(2, columns, w).float()


def sample_crops(n: int, generator: torch.Generator, size: int = 224, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO, attempts: int = 10) -> Tensor:
    """``n`` RandomResizedCrop boxes ``[n, 4]`` (top, left, h, w) with torchvision's rule, vectorised.

    Up to ``attempts`` draws of (area fraction, log aspect) per sample; the first that fits wins, else the
    whole (square) image.
    """
    area = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator) * size * size
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((n,), -1))
    rows = torch.arange(n)
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((n,), float(size)))
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((n,), float(size)))
    u = torch.rand(n, 2, generator=generator)
    top = (u[:, 0] * (size - h + 1)).floor()
    left = (u[:, 1] * (size - w + 1)).floor()
    return torch.stack([top, left, h, w], dim=1).long()


def render_digits(pixels: Tensor, crops: Tensor | None = None, size: int = 224) -> Tensor:
    """8x8 grey digits ``[B,8,8]`` (0-255) -> ``[B,size,size]`` grey in [0,1], as the stage-1 pipeline sees them.

    Without ``crops``: the NEAREST upscale (= the inference view, since resize/centre-crop are identities at
    224). With ``crops`` ``[B,4]`` (top, left, h, w): PIL's crop + bicubic resize of that upscaled image, in
    two passes (horizontal then vertical) each rounded and clipped to 8 bits like PIL.
    """
    u = nearest_upscale_matrix(pixels.shape[-1], size)
    if crops is None:
        return (u @ pixels @ u.t()) / 255.0
    top, left, h, w = crops.unbind(dim=1)
    small = pixels.shape[-1]
    cols = crop_resize_weights(left, w, size, small=small)  # [B, size, 8] = A_w @ U
    rows = crop_resize_weights(top, h, size, small=small)
    horizontal = (pixels @ cols.transpose(1, 2) + 0.5).floor().clamp(0, 255)  # [B, 8, size]
    return ((rows @ horizontal + 0.5).floor().clamp(0, 255)) / 255.0


def grey_to_clip(grey: Tensor) -> Tensor:
    """``[B,H,W]`` grey in [0,1] -> CLIP-normalised RGB ``[B,3,H,W]``."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (grey[:, None] - mean) / std


def grey_vision_tokens(model: ImageBindModel, grey: Tensor) -> Tensor:
    """The vision preprocessor's output for grey images ``[B,H,W]`` in [0,1], computed cheaply.

    Equal (up to float rounding) to ``preprocessor(grey_to_clip(grey))``: the Conv3d over the repeated frame
    and the three CLIP-normalised copies of one grey channel folds into one ``[D, p*p]`` matrix and a bias.
    """
    pre = model.modality_preprocessors["vision"]
    conv = pre.rgbt_stem.proj[1]
    weight = conv.weight.sum(dim=2)  # frames are repeats: [D, 3, p, p]
    std = torch.tensor(CLIP_STD, dtype=weight.dtype).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=weight.dtype).view(1, 3, 1, 1)
    w_eff = (weight / std).sum(dim=1)  # [D, p, p]
    b_eff = -(weight * (mean / std)).sum(dim=(1, 2, 3))  # [D]
    b, height, width = grey.shape
    p = w_eff.shape[-1]
    gh, gw = height // p, width // p
    patches = grey.reshape(b, gh, p, gw, p).permute(0, 1, 3, 2, 4).reshape(b, gh * gw, p * p)
    tokens = patches.to(w_eff.dtype) @ w_eff.reshape(w_eff.shape[0], -1).t() + b_eff
    tokens = torch.cat([pre.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
    return tokens + pre.pos_embedding_helper((1, gh, gw))


def grey_vision_embed(model: ImageBindModel, grey: Tensor) -> Tensor:
    """Unit-norm vision embeddings of grey images ``[B,H,W]`` (fast path of ``model.encode('vision', rgb)``)."""
    tokens = grey_vision_tokens(model, grey)
    x = model.modality_trunks["vision"](tokens)
    return F.normalize(model.modality_heads["vision"](x).float(), dim=-1)


def sample_class_captions(tokens: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One random caption per sample from ``tokens`` ``[classes, templates, L]``, duplicates merged.

    Returns the distinct captions' tokens ``[U, L']`` (trimmed after the longest caption: exact, since the
    text trunk is causal and pools at the EOT token) and the positive mask ``[len(labels), U]``.
    """
    n_templates = tokens.shape[1]
    template = torch.randint(n_templates, (len(labels),), generator=generator)
    unique = (labels * n_templates + template).unique()
    picked = tokens.reshape(-1, tokens.shape[-1])[unique]
    picked = picked[:, : int(picked.argmax(dim=1).max()) + 1]
    return picked, positive_mask(labels, unique // n_templates)


class DigitBinding:
    """:class:`BindingTask` on the digits: images (stage-1 crops) against captions naming the digit.

    Each sample gets a random crop and a random caption template; identical captions in a batch are merged
    (the text side holds each distinct caption once) and all same-digit pairs are positives. Text token rows
    are trimmed after the longest caption (exact: the text trunk is causal and pools at the EOT token).
    """

    def __init__(self, pixels: Tensor, labels: Tensor, templates: Sequence[str] = CAPTION_TEMPLATES,
                 augment: bool = True) -> None:
        from ibllm.processing.clip_tokenizer import tokenize

        self.pixels = pixels.float()
        self.labels = labels.long()
        self.templates = tuple(templates)
        self.augment = augment
        captions = [c for d in range(10) for c in digit_captions(d, self.templates)]
        self.tokens = tokenize(captions).view(10, len(self.templates), -1)  # [10, T, 77]
        self._sampler = EpochSampler(len(self.labels))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = self._sampler.next(batch_size, generator)
        crops = sample_crops(len(idx), generator) if self.augment else None
        grey = render_digits(self.pixels[idx], crops)
        labels = self.labels[idx]
        tokens, mask = sample_class_captions(self.tokens, labels, generator)
        return grey, tokens, mask

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
        if branch == "vision":
            return grey_vision_embed(model, x)
        return model_embed(model, branch, x)


def digit_eval_fn(pixels: Tensor, labels: Tensor, crops_per_image: int = 3, seed: int = 1234,
                  fast: bool = True, chunk: int = 128) -> Callable[[ImageBindModel], dict[str, float]]:
    """An ``eval_fn`` giving held-out zero-shot accuracy on the centre view (``acc``) and on
    ``crops_per_image`` seeded stage-1 crops per image (``acc_crop``).

    ``fast`` uses :func:`grey_vision_embed`; otherwise the model's own forward on CLIP-normalised RGB.
    Views are rendered chunk by chunk (never all at once).
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
        from ibllm.processing.clip_tokenizer import tokenize

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


# ----------------------------------------------------------------------------- the demo encoder recipe

@dataclass
class BindRecipe:
    """The :func:`bind_towers` settings every stage-0 recipe records (its hash names the file's content)."""

    cfg: str = "demo"
    seed: int = 0
    heldout_fraction: float = 0.2
    steps: int = 500
    lr: float = 2e-3
    warmup: int = 30
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    batch_size: int = 128
    bf16: bool = True
    augment: bool = True
    pos_init_scale: float = 1.0
    intra_weight: float = 1.0

    def digest(self, **extra: str) -> str:
        """sha256 of the recipe's canonical JSON (with ``extra`` entries, e.g. a base encoder's sha256)."""
        blob = json.dumps({**dataclasses.asdict(self), **extra}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def bind_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`bind_towers` this recipe fixes."""
        return {"steps": self.steps, "lr": self.lr, "warmup": self.warmup, "batch_size": self.batch_size,
                "seed": self.seed, "min_lr_ratio": self.min_lr_ratio, "weight_decay": self.weight_decay,
                "bf16": self.bf16, "pos_init_scale": self.pos_init_scale, "intra_weight": self.intra_weight}


@dataclass
class DemoRecipe(BindRecipe):
    """Everything that determines the demo encoder (its hash names the file's content)."""

    stem_lr_scale: float = 0.03
    templates: tuple[str, ...] = CAPTION_TEMPLATES
    version: int = RECIPE_VERSION

    def bind_kwargs(self) -> dict[str, Any]:
        return {**super().bind_kwargs(), "stem_lr_scale": self.stem_lr_scale}


@dataclass
class DemoEncoder:
    """Result of :func:`build_demo_encoder`."""

    path: Path
    info_path: Path
    info: dict[str, Any]
    trained: bool

    @property
    def accuracy(self) -> float:
        return float(self.info["accuracy"]["heldout_centre"])


def info_path_for(out_path: str | Path) -> Path:
    """The JSON written next to an encoder file: ``<name>.json`` (suffix replaced)."""
    out_path = Path(out_path)
    return out_path.with_suffix(".json")


def build_demo_encoder(out_path: str | Path, seed: int = 0, *, steps: int | None = None,
                       recipe: DemoRecipe | None = None, force: bool = False, progress: bool = True,
                       eval_every: int = 0) -> DemoEncoder:
    """Train (or reuse) the demo's frozen ImageBind encoder: vision + text towers of the ``demo`` preset.

    Recipe (:class:`DemoRecipe`): the digits of :func:`digit_split` (train part only), stage-1 crops,
    captions from :data:`CAPTION_TEMPLATES`, class-aware InfoNCE with ImageBind's learnable text logit scale,
    AdamW with warmup + cosine decay, bf16 autocast. Writes ``out_path`` (``.safetensors`` -> safetensors,
    anything else -> ``torch.save``; atomically) holding the flat ImageBind state dict of the vision and text
    branches, and ``<out_path stem>.json`` with the recipe, its hash, accuracies, timing and the file's sha256.
    Idempotent: when that JSON records the same recipe hash and the file matches its sha256, nothing is
    retrained (``trained=False``). ``force`` retrains anyway.
    """
    recipe = recipe or DemoRecipe(seed=seed)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    out_path = Path(out_path)
    info_path = info_path_for(out_path)
    if not force and (info := existing_encoder_info(out_path, info_path, recipe.digest())) is not None:
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


def existing_encoder_info(out_path: Path, info_path: Path, digest: str) -> dict[str, Any] | None:
    if not (out_path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("recipe_hash") != digest or info.get("sha256") != file_sha256(out_path):
        return None
    return info


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(state: dict[str, Tensor], path: str | Path) -> str:
    """Write a flat state dict atomically (``.safetensors``: safetensors, else ``torch.save``); returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
        digest = file_sha256(tmp)

    atomic_write(path, write)
    return digest


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    """``python -m ibllm bind`` arguments."""
    defaults = DemoRecipe()
    parser = argparse.ArgumentParser(
        prog="python -m ibllm bind",
        description="Train the embedded demo's ImageBind encoder (stage 0): bind the vision and text towers "
                    "of the 'demo' preset on scikit-learn's handwritten digits with class-aware InfoNCE. "
                    "Writes an ImageBind-layout state dict (vision + text) and a JSON report next to it; "
                    "reruns with the same recipe return the existing file without training.",
        epilog="Example: python -m ibllm bind --out runs/demo/imagebind_demo.safetensors  "
               "(load it with ibllm.models.imagebind.load_imagebind(path, 'demo', ['vision', 'text']))")
    parser.add_argument("--out", required=True, help="encoder file (.safetensors, or .pth/.pt for torch.save)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the split, the initialisation and the sampling (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warmup steps (default %(default)s)")
    parser.add_argument("--config", default=defaults.cfg,
                        help="ImageBind preset whose vision/text towers are trained (default %(default)s)")
    parser.add_argument("--no-augment", action="store_true", help="train without the stage-1 crop augmentation")
    parser.add_argument("--fp32", action="store_true", help="train in float32 instead of bf16 autocast")
    parser.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: end only)")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching encoder exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> DemoEncoder:
    """Entry point of ``python -m ibllm bind``; prints a one-line summary and returns the result."""
    args = build_parser().parse_args(argv)
    recipe = DemoRecipe(cfg=args.config, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, augment=not args.no_augment, bf16=not args.fp32)
    result = build_demo_encoder(args.out, recipe=recipe, force=args.force, progress=not args.quiet,
                                eval_every=args.eval_every)
    acc = result.info["accuracy"]
    state = "trained" if result.trained else "up to date (recipe hash matches; not retrained)"
    print(f"{result.path}: {state}; held-out zero-shot accuracy {acc['heldout_centre']:.3f} (centre), "
          f"{acc['heldout_crop']:.3f} (stage-1 crops); train {result.info['train_seconds']} s; "
          f"report {result.info_path}")
    return result


if __name__ == "__main__":
    main()
