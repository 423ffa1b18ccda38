"""Stage 0: contrastive binding of ImageBind branches (ibllm.stage0) and the digits demo's towers."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm import stage0 as S
from ibllm import stage0_recipe as R
from ibllm.config import imagebind_preset
from ibllm.demos.digits import captions as W
from ibllm.demos.digits import pixels as P
from ibllm.demos.digits import towers as T
from ibllm.models.imagebind import ImageBindModel, build_imagebind, load_imagebind
from ibllm.processing.image import to_tensor
from ibllm.tuning import warmup_cosine

# A tiny recipe: 3 digit classes is an easy task for a 1-block, 32-wide tower.
TINY = dict(cfg="tiny", steps=80, lr=6e-3, warmup=5, batch_size=48, augment=True)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = P.load_digit_pixels()
    keep = labels < 3
    return pixels[keep], labels[keep]


def test_split_is_fixed_deterministic_and_disjoint() -> None:
    train, held = P.digit_split()
    train2, held2 = P.digit_split(seed=0, heldout_fraction=0.2)
    assert len(held) == 360 and len(train) == 1797 - 360
    assert np.array_equal(train, train2) and np.array_equal(held, held2)
    assert not set(train) & set(held) and set(train) | set(held) == set(range(1797))
    expected = np.sort(np.random.default_rng(0).permutation(1797)[:360])
    assert np.array_equal(held, expected)
    assert not np.array_equal(P.digit_split(seed=1)[1], held)


def test_loss_reduces_to_clip_infonce_with_one_positive() -> None:
    logits = torch.randn(6, 6)
    target = torch.arange(6)
    ce = torch.nn.functional.cross_entropy
    clip = 0.5 * (ce(logits, target) + ce(logits.t(), target))
    assert torch.allclose(S.multi_positive_infonce(logits, torch.eye(6, dtype=torch.bool)), clip)


def test_class_aware_mask_treats_same_class_pairs_as_positives() -> None:
    labels = torch.tensor([0, 1, 0])
    mask = S.positive_mask(labels, torch.tensor([0, 1]))
    assert mask.tolist() == [[True, False], [False, True], [True, False]]
    # Perfectly separated classes give a lower loss than swapped ones.
    good = torch.tensor([[10.0, -10.0], [-10.0, 10.0], [10.0, -10.0]])
    assert S.multi_positive_infonce(good, mask) < S.multi_positive_infonce(-good, mask)


def test_crop_rendering_matches_pil(digits) -> None:
    pixels, _ = digits
    crops = P.sample_crops(6, torch.Generator().manual_seed(3))
    mine = P.render_digits(pixels[:6], crops)
    for i in range(6):
        img = Image.fromarray(pixels[i].numpy().astype(np.uint8), "L").resize((224, 224), Image.NEAREST).convert("RGB")
        top, left, h, w = crops[i].tolist()
        ref = to_tensor(img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BICUBIC))[0]
        assert (ref - mine[i]).abs().max() * 255 <= 1.0 + 1e-4
    centre = to_tensor(Image.fromarray(pixels[0].numpy().astype(np.uint8), "L").resize((224, 224), Image.NEAREST)
                       .convert("RGB"))[0]
    assert torch.equal(P.render_digits(pixels[:1])[0], centre)


def test_sampled_crops_follow_the_stage1_ranges() -> None:
    crops = P.sample_crops(500, torch.Generator().manual_seed(0)).double()
    top, left, h, w = crops.unbind(1)
    area = h * w / 224**2
    assert ((area > 0.89) & (area <= 1.0)).all()
    assert ((w / h >= 0.74) & (w / h <= 1.35)).all()
    assert ((top >= 0) & (top + h <= 224) & (left >= 0) & (left + w <= 224)).all()


def test_fast_grey_path_equals_the_model_forward(digits) -> None:
    model = ImageBindModel(imagebind_preset("demo"), ["vision"]).eval()
    grey = P.render_digits(digits[0][:4], P.sample_crops(4, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        fast = P.grey_vision_embed(model, grey)
        slow = model({"vision": P.grey_to_clip(grey)})["vision"]
    assert torch.allclose(fast, slow, atol=1e-5)


def test_binding_learns_an_easy_task(digits) -> None:
    pixels, labels = digits
    task = T.DigitBinding(pixels[:300], labels[:300])
    # Zero-shot against the prompts of the 3 trained digits (chance 1/3); the prompts of digits the text tower
    # never saw stay random and may outscore them, so they are left out here.
    images = P.grey_to_clip(P.render_digits(pixels[:150]))
    prompts = W.class_prompts()[:3]

    def eval_fn(model: ImageBindModel) -> dict[str, float]:
        return {"acc": S.zero_shot_accuracy(model, images, labels[:150], prompts)}

    untrained = ImageBindModel(imagebind_preset("tiny"), ["vision", "text"]).eval()
    before = eval_fn(untrained)["acc"]
    model, history = S.bind_towers("vision", "text", "tiny", None, task, steps=TINY["steps"], lr=TINY["lr"],
                                   warmup=TINY["warmup"], batch_size=TINY["batch_size"], seed=0,
                                   pos_init_scale=1.0, intra_weight=1.0, stem_lr_scale=0.03, eval_fn=eval_fn,
                                   progress=False)
    first, last = np.mean(history.loss[:5]), np.mean(history.loss[-5:])
    assert last < first - 0.2, (first, last)
    after = history.evals[-1]["acc"]
    assert after > 0.55 and after > before + 0.2, (before, history.evals)
    # The demo's fast evaluation (grey fast path) agrees with the generic helper (the model's own forward on RGB).
    fast = T.digit_eval_fn(pixels[:150], labels[:150], crops_per_image=0)(model)["acc"]
    assert fast == pytest.approx(S.zero_shot_accuracy(model, images, labels[:150], W.class_prompts()), abs=0.02)


def test_frozen_anchor_is_untouched_and_only_the_new_branch_trains(digits) -> None:
    pixels, labels = digits
    anchor = build_imagebind("tiny", ["vision"])
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    # Bind a depth-like branch: grey images as 1-channel "depth", paired with the same digit as RGB.
    grey = P.render_digits(pixels[:64])
    task = S.PairedTensors(P.grey_to_clip(grey), grey[:, None], labels[:64])
    fresh = ImageBindModel(imagebind_preset("tiny"), ["vision", "depth"])
    model, history = S.bind_towers("vision", "depth", "tiny", anchor, task, steps=4, batch_size=16, warmup=1,
                                   progress=False)
    for k, v in anchor.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert torch.equal(model.state_dict()[k], before[k]), k
    assert anchor.frozen and not any(p.requires_grad for p in anchor.parameters())
    changed = [k for k, v in model.state_dict().items() if k.split(".")[1] == "depth"
               and not torch.equal(v, fresh.state_dict()[k])]
    assert changed, "the new branch did not train"
    assert len(history.loss) == 4


def test_optimizer_groups_and_schedule_are_the_training_loop_ones(monkeypatch) -> None:
    model = ImageBindModel(imagebind_preset("tiny"), ["vision", "text"])
    groups = S.param_groups(model, {"vision", "text"}, 0.05, stem_lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, stem = ({names[id(p)] for p in g["params"]} for g in groups)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.1] and [g["weight_decay"] for g in groups] == [0.05, 0, 0.05]
    assert stem == {"modality_preprocessors.vision.rgbt_stem.proj.1.weight"}
    assert {n for n in names.values() if "pos_embed" in n or "cls_token" in n or "token_embedding" in n} <= no_decay
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
    assert decay | no_decay | stem == set(names.values())
    # The learning rate of every step comes from tuning.warmup_cosine (0 at step 0, as in stage 1 and 2).
    calls = []
    monkeypatch.setattr(S, "warmup_cosine", lambda *a: calls.append(a) or 1.0)
    grey = P.render_digits(P.load_digit_pixels()[0][:8])
    task = S.PairedTensors(P.grey_to_clip(grey), grey[:, None])
    S.bind_towers("vision", "depth", "tiny", None, task, steps=3, warmup=2, batch_size=4, min_lr_ratio=0.1,
                  progress=False)
    assert calls == [(0, 2, 3, 0.1), (1, 2, 3, 0.1), (2, 2, 3, 0.1)]
    assert warmup_cosine(0, 2, 3) == 0.0 and warmup_cosine(1, 2, 3) == 0.5


def test_demo_encoder_saves_reloads_and_is_idempotent(tmp_path, monkeypatch) -> None:
    recipe = T.DemoRecipe(cfg="tiny", steps=3, batch_size=16, warmup=1)
    out = tmp_path / "enc.safetensors"
    first = T.build_demo_encoder(out, recipe=recipe, progress=False)
    assert first.trained and out.is_file() and first.info_path.is_file()
    info = first.info
    assert info["recipe_hash"] == recipe.digest() and info["sha256"] == R.file_sha256(out)
    assert {"heldout_centre", "heldout_crop"} <= set(info["accuracy"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    loaded = load_imagebind(out, "tiny", modalities=["vision", "text"])
    keys = set(loaded.state_dict())
    assert all(k.split(".")[1] in ("vision", "text") for k in keys)
    pixels, labels = P.load_digit_pixels()
    images = P.grey_to_clip(P.render_digits(pixels[:4]))
    from ibllm.processing.clip_tokenizer import tokenize

    tokens = tokenize(W.class_prompts()[:3])
    # Rebuild the trained weights independently from the file and compare embeddings with a second load.
    again = load_imagebind(out, "tiny", modalities=["vision", "text"])
    with torch.no_grad():
        a = loaded({"vision": images, "text": tokens})
        b = again({"vision": images, "text": tokens})
    assert torch.equal(a["vision"], b["vision"]) and torch.equal(a["text"], b["text"])
    acc = S.zero_shot_accuracy(loaded, P.grey_to_clip(P.render_digits(pixels[P.digit_split()[1]])),
                               labels[P.digit_split()[1]], W.class_prompts())
    assert acc == pytest.approx(info["accuracy"]["heldout_centre"], abs=1e-6)

    mtime = os.stat(out).st_mtime_ns
    monkeypatch.setattr(T, "bind_towers", lambda *a, **k: pytest.fail("retrained"))
    second = T.build_demo_encoder(out, recipe=recipe, progress=False)
    assert not second.trained and os.stat(out).st_mtime_ns == mtime
    # A different recipe is not confused with the saved one.
    assert dataclasses.replace(recipe, steps=4).digest() != recipe.digest()


def test_saved_weights_equal_the_trained_model(tmp_path, digits) -> None:
    pixels, labels = digits
    task = T.DigitBinding(pixels[:64], labels[:64])
    model, _ = S.bind_towers("vision", "text", "tiny", None, task, steps=2, batch_size=8, warmup=1, progress=False)
    for name in ("w.safetensors", "w.pth"):
        path = tmp_path / name
        R.save_state_dict(model.state_dict(), path)
        loaded = load_imagebind(path, "tiny", ["vision", "text"])
        images = P.grey_to_clip(P.render_digits(pixels[:3]))
        with torch.no_grad():
            want = model.eval()({"vision": images})["vision"]
            got = loaded({"vision": images})["vision"]
        assert torch.equal(want, got)


def test_cli_help_and_run(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        T.main(["--help"])
    assert "--steps" in capsys.readouterr().out
    argv = ["--out", str(tmp_path / "e.pt"), "--config", "tiny", "--steps", "2", "--batch-size", "8",
            "--warmup", "1", "--quiet"]
    assert T.main(argv).trained
    assert "held-out zero-shot accuracy" in capsys.readouterr().out
    assert not T.main(argv).trained
    assert "not retrained" in capsys.readouterr().out
