"""Stage 0: contrastive binding of one ImageBind branch to another.

ImageBind aligns every modality to the image tower with a symmetric InfoNCE loss; Point-Bind binds a 3-D
encoder to a frozen ImageBind the same way. :func:`bind_towers` offers that step for any pair of branches:
it trains branch ``new`` against branch ``anchor``. With a frozen ``anchor_model`` only the new branch
learns (how a user binds a new modality to an existing image tower); without one both branches train from
scratch. The data comes from a :class:`BindingTask` (:class:`PairedTensors` for plain tensor pairs; the demos
under ``ibllm.demos`` bring their own). Recipes, tower files and their reuse live in :mod:`ibllm.stage0_recipe`.

The loss (:func:`multi_positive_infonce`) is CLIP's symmetric InfoNCE generalised to a positive *mask*:
every pair that shares a class label is a positive (cross-entropy against the uniform distribution over a
row's / column's positives). With one positive per row it is exactly CLIP's loss; with labels it removes
the false negatives plain InfoNCE suffers when one batch holds many captions of the same class.

Temperature: by default the logit scale is ImageBind's own postprocessor scale of the non-vision branch
(text: the learnable ``log_logit_scale``, initialised at 1/0.07 and capped at 100, as in ImageBind; audio,
depth, thermal, IMU, point: ImageBind's fixed buffers). Pass ``logit_scale=<float>`` to fix it instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ibllm.config import ImageBindConfig, imagebind_preset
from ibllm.models.imagebind import ImageBindModel
from ibllm.processing.clip_tokenizer import tokenize
from ibllm.tuning import decay_groups, warmup_cosine

# Patch stems: they get their own learning-rate scale (see :func:`param_groups`).
STEM_KEYS: tuple[str, ...] = ("rgbt_stem.proj", "depth_stem.proj")
# Embedding-like tensors that take no weight decay even though they are 2-D or more.
NO_DECAY_MARKERS: tuple[str, ...] = ("token_embedding", "pos_embed", "cls_token")


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
        """The next pairs: anchor inputs, new-branch inputs and the positive mask ``[B, B]``."""
        idx = self._sampler.next(batch_size, generator)
        if self.labels is None:
            mask = torch.eye(len(idx), dtype=torch.bool)
        else:
            lab = self.labels[idx]
            mask = positive_mask(lab, lab)
        return self.anchor[idx], self.new[idx], mask

    def embed(self, model: ImageBindModel, branch: str, x: Tensor) -> Tensor:
        """Unit-norm embeddings through the model's own forward."""
        return model_embed(model, branch, x)


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

    ``data`` supplies the pairs (a :class:`BindingTask`, e.g. :class:`PairedTensors`). Optimisation: AdamW
    with the project's decay rule (:func:`ibllm.tuning.decay_groups`; embeddings and tokens undecayed) and
    the training loop's schedule (:func:`ibllm.tuning.warmup_cosine`: linear warmup over ``warmup`` steps,
    cosine decay to ``min_lr_ratio * lr``); bf16 autocast on CPU when ``bf16``. Temperature: ImageBind's own
    logit scale of the non-vision branch (learnable for text) unless ``logit_scale`` fixes it.
    ``eval_fn(model)`` runs every ``eval_every`` steps and at the end (recorded in the history).

    Helpers for training small towers from scratch (all off by default): ``pos_init_scale`` starts trained
    patch branches from a 2-D sine-cosine positional embedding of that RMS (:func:`init_patch_pos_embed`);
    ``intra_weight`` adds a class-aware InfoNCE among the new branch's own embeddings (two samples are
    positives when they share a positive anchor), which keeps a from-scratch text tower from collapsing
    while the image tower is still uninformative; ``stem_lr_scale`` multiplies the patch stems' learning rate.
    """
    if data is None:
        raise ValueError("bind_towers needs data: a BindingTask such as PairedTensors")
    if anchor == new:
        raise ValueError(f"anchor and new branch are both {anchor!r}")
    cfg = imagebind_preset(cfg) if isinstance(cfg, str) else cfg
    model = _init_model(cfg, anchor, new, anchor_model, seed)
    trainable = {new} if anchor_model is not None else {anchor, new}
    for branch in trainable:
        init_patch_pos_embed(model, branch, pos_init_scale)
    params = [p for n, p in model.named_parameters() if branch_of(n) in trainable]
    for n, p in model.named_parameters():
        p.requires_grad_(branch_of(n) in trainable)
    groups = param_groups(model, trainable, weight_decay, stem_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    generator = torch.Generator().manual_seed(seed)
    history = BindHistory()
    bar = tqdm(total=steps, desc=f"bind {new}->{anchor}", dynamic_ncols=True) if progress else None
    start = time.perf_counter()
    model.train()
    if anchor_model is not None:
        _set_branch_mode(model, anchor, train=False)
    for step in range(steps):
        factor = warmup_cosine(step, warmup, steps, min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor * group["lr_scale"]
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
        source = {k: v for k, v in anchor_model.state_dict().items() if branch_of(k) == anchor}
        target = {k for k in model.state_dict() if branch_of(k) == anchor}
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


def branch_of(key: str) -> str | None:
    """The ImageBind branch a state-dict key belongs to (``modality_trunks.vision.x`` -> ``vision``), else None."""
    parts = key.split(".")
    return parts[1] if len(parts) > 1 and parts[0].startswith("modality_") else None


def _set_branch_mode(model: ImageBindModel, branch: str, train: bool) -> None:
    for group in (model.modality_preprocessors, model.modality_trunks, model.modality_heads,
                  model.modality_postprocessors):
        if branch in group:
            group[branch].train(train)


def param_groups(model: nn.Module, trainable: set[str], weight_decay: float,
                 stem_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups of the ``trainable`` branches: :func:`ibllm.tuning.decay_groups` (embeddings, tokens and
    vectors undecayed), plus the patch stems, decayed, at ``stem_lr_scale`` times the learning rate.

    A patch stem sums ``kernel`` (here 2x28x28x3) inputs, so Adam's per-element step moves its tokens
    hundreds of times more than a step moves a trunk activation: it gets a smaller learning rate.
    """
    named = [(n, p) for n, p in model.named_parameters() if branch_of(n) in trainable]
    stem = [p for n, p in named if any(k in n for k in STEM_KEYS)]
    rest = [(n, p) for n, p in named if not any(k in n for k in STEM_KEYS)]
    groups = [{**g, "lr_scale": 1.0} for g in decay_groups(rest, weight_decay, NO_DECAY_MARKERS)]
    groups.append({"params": stem, "weight_decay": weight_decay, "lr_scale": stem_lr_scale})
    return [g for g in groups if g["params"]]


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
