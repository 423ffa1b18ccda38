"""Cross-modal transfer on the demo (ibllm.demos.crossmodal): espeak-ng speech, the audio tower, the 6-cell evaluation."""

from __future__ import annotations

import os
import re

import pytest
import torch

from ibllm import stage0 as S
from ibllm import stage0_recipe as R
from ibllm.demos.crossmodal import audio_tower as A
from ibllm.demos.crossmodal import experiment as E
from ibllm.demos.crossmodal import speech as Sp
from ibllm.demos.digits import captions as W
from ibllm.demos.digits import pixels as P
from ibllm.config import imagebind_preset
from ibllm.models.imagebind import ImageBindModel, build_imagebind, load_imagebind
from ibllm.processing.audio import load_audio, read_audio

# Three words, three training voices x 2 speeds x 2 pitches; held out: other speed/pitch values (and one voice).
TINY_SPEECH = Sp.SpeechSpec(
    train_voices=("en-us+m1", "en-gb+f2", "en-us+m3"), train_speeds=(130, 190), train_pitches=(30, 70),
    heldout_voices=("en-us+m1", "en-gb+f2", "en-029+m4"), heldout_speeds=(160,), heldout_pitches=(50,),
    words=("zero", "one", "two"))
LINE = re.compile(r"^crossmodal_accuracy input=(image|text|audio) cache=(on|off): (0|1)\.\d\d$")


@pytest.fixture(scope="module")
def speech(espeak, tmp_path_factory) -> Sp.SpokenDigits:
    """A tiny spoken-digit set synthesised with espeak-ng (the ``espeak`` fixture is in conftest.py)."""
    return Sp.write_spoken_digits(tmp_path_factory.mktemp("speech"), TINY_SPEECH, progress=False)


@pytest.mark.system
def test_espeak_synthesis_gives_decodable_wavs_of_the_imagebind_shape(espeak, tmp_path) -> None:
    path = Sp.synthesize("seven", tmp_path / "seven.wav", voice="en-us+m3", speed=140, pitch=40)
    wave, rate = read_audio(path)
    assert wave.shape[0] == 1 and 0.2 < wave.shape[-1] / rate < 2.0
    assert wave.abs().max() > 0.05  # not silence
    feats = load_audio(path)
    assert feats.shape == (3, 1, 128, 204) and torch.isfinite(feats).all()
    # A word is shorter than a 2 s clip: the three clips are the same window.
    assert torch.equal(feats[0], feats[1]) and torch.equal(feats[0], feats[2])
    # Different voices give different audio.
    other = load_audio(Sp.synthesize("seven", tmp_path / "seven_f.wav", voice="en-gb+f2", speed=180, pitch=70))
    assert not torch.allclose(feats, other)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.system
def test_spoken_digit_set_is_split_by_voice_speed_and_pitch_and_idempotent(speech, monkeypatch) -> None:
    assert len(speech.train) == 3 * 2 * 2 * 3 and len(speech.heldout) == 3 * 3
    combos = lambda items: {(i["voice"], i["speed"], i["pitch"]) for i in items}  # noqa: E731
    assert not combos(speech.train) & combos(speech.heldout)
    assert all(p.is_file() for p in speech.paths("train") + speech.paths("heldout"))
    assert speech.labels("heldout").tolist() == [0, 1, 2] * 3
    monkeypatch.setattr(Sp, "synthesize", lambda *a, **k: pytest.fail("re-synthesised"))
    again = Sp.write_spoken_digits(speech.root, TINY_SPEECH, progress=False)
    assert again.train == speech.train


@pytest.mark.system
def test_audio_binding_keeps_vision_bit_identical_and_beats_chance(speech, tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    base = build_imagebind("tiny", ["vision", "text"])
    base_file = tmp_path / "encoder.safetensors"
    R.save_state_dict(base.state_dict(), base_file)
    before = {k: v.clone() for k, v in load_imagebind(base_file, "tiny", ["vision", "text"]).state_dict().items()}
    monkeypatch.setattr(A, "write_spoken_digits", lambda root, spec, progress=True, force=False: speech)
    recipe = A.AudioRecipe(cfg="tiny", steps=150, lr=3e-3, warmup=10, batch_size=36, speech=TINY_SPEECH)

    # A randomly initialised tiny vision tower maps every digit to (almost) the same point, so it cannot tell
    # the classes apart; stand in for a trained frozen tower's image embeddings: one direction per class + noise.
    pixels, labels = P.load_digit_pixels()
    train_labels = labels[torch.from_numpy(P.digit_split()[0])]
    train_labels = train_labels[train_labels < 3]  # only the spoken digits' images are used
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=-1)
    img_emb = torch.nn.functional.normalize(centres[train_labels] + 0.3 * torch.randn(len(train_labels), 32,
                                                                                     generator=gen), dim=-1)

    def fake_image_embeddings(model, pix):
        assert len(pix) == len(img_emb) and model.modalities == ("vision", "text")
        return img_emb

    monkeypatch.setattr(A, "image_embeddings", fake_image_embeddings)
    protos = {"image_prototypes": A.class_prototypes(img_emb, train_labels, classes=3)}
    held = Sp.speech_features(speech.paths("heldout"), progress=False)[:, 0]
    fresh = ImageBindModel(imagebind_preset("tiny"), ["vision", "audio"]).eval()
    untrained = A.audio_zero_shot(fresh, held, speech.labels("heldout"), protos)["image_prototypes"]

    result = A.build_audio_encoder(tmp_path, base=base_file, out_path=tmp_path / "av.safetensors", recipe=recipe,
                                   progress=False)
    assert result.trained and result.path.is_file() and result.info_path.is_file()
    acc = result.info["accuracy"]
    # 3 spoken words scored against their 3 image class prototypes: chance is 1/3.
    assert acc["heldout_image_prototypes"] > 0.5 and acc["heldout_image_prototypes"] > untrained, (acc, untrained)
    assert acc["train_image_prototypes"] > 0.5, acc

    av = load_imagebind(result.path, "tiny", ["vision", "text", "audio"])
    state = av.state_dict()
    for k, v in before.items():
        assert torch.equal(state[k], v), k
    assert any(k.split(".")[1] == "audio" for k in state)
    # The saved audio tower gives the reported accuracy.
    got = A.audio_zero_shot(av, held, speech.labels("heldout"), protos)["image_prototypes"]
    assert got == pytest.approx(acc["heldout_image_prototypes"], abs=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # Idempotent: same recipe + same base -> not retrained; a changed base file -> retrained.
    mtime = os.stat(result.path).st_mtime_ns
    monkeypatch.setattr(A, "bind_towers", lambda *a, **k: pytest.fail("retrained"))
    again = A.build_audio_encoder(tmp_path, base=base_file, out_path=tmp_path / "av.safetensors", recipe=recipe,
                                  progress=False)
    assert not again.trained and os.stat(result.path).st_mtime_ns == mtime
    assert recipe.digest(base="other base") != recipe.digest(base=R.file_sha256(base_file))


def test_frozen_anchor_object_is_never_modified_by_audio_binding() -> None:
    anchor = build_imagebind("tiny", ["vision"])
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    task = A.SpokenDigitBinding(torch.randn(24, 1, 128, 204, generator=gen), torch.arange(24) % 3,
                                torch.randn(30, 32, generator=gen), torch.arange(30) % 3)
    model, history = S.bind_towers("vision", "audio", "tiny", anchor, task, steps=3, batch_size=12, warmup=1,
                                   progress=False)
    assert len(history.loss) == 3
    for k, v in anchor.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(model.state_dict()[k], before[k]), k


def test_pairs_share_the_class_and_augmentation_keeps_shapes() -> None:
    gen = torch.Generator().manual_seed(1)
    audio = torch.randn(20, 1, 128, 204, generator=gen)
    alab = torch.arange(20) % 4
    ilab = torch.arange(40) % 4
    task = A.SpokenDigitBinding(audio, alab, torch.randn(40, 8, generator=gen), ilab)
    images, clips, mask = task.train_batch(20, gen)
    assert clips.shape == (20, 1, 128, 204) and mask.shape == (20, 20) and mask.diagonal().all()
    # The batch is one epoch (every clip once); each clip's image has its class; the mask = same class.
    clip_labels = ilab[images]
    assert torch.equal(mask, clip_labels[:, None] == clip_labels[None, :])
    assert sorted(clip_labels.tolist()) == sorted(alab.tolist())
    plain = A.SpokenDigitBinding(audio, alab, torch.randn(40, 8), ilab, augment=False)
    _, raw, _ = plain.train_batch(20, torch.Generator().manual_seed(2))
    assert any(torch.equal(raw[0], a) for a in audio)
    with pytest.raises(ValueError, match="no image of digit"):
        A.SpokenDigitBinding(audio, alab, torch.randn(3, 8), torch.tensor([0, 1, 2]))


def test_text_inputs_avoid_the_training_captions() -> None:
    inputs = E.text_inputs()
    assert len(inputs) == 10 * len(E.TEXT_TEMPLATES)
    training = {t.format(w=w, n=d) for d, w in enumerate(W.DIGIT_WORDS) for t in W.CAPTION_TEMPLATES}
    assert not set(inputs.items) & training
    assert all(W.digits_mentioned(t) == {lab} for t, lab in zip(inputs.items, inputs.labels))


def test_crossmodal_evaluation_runs_end_to_end_and_prints_six_lines(sp_model, capsys) -> None:
    import faiss

    from ibllm.build import build_encoder
    from ibllm.cache import VisualCache
    from ibllm.config import llama_preset
    from ibllm.models.ibllm import ImageBindLLM
    from ibllm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    encoder = build_encoder("tiny", None, ("vision", "text", "audio"))
    model = ImageBindLLM(llama_preset("tiny", vocab_size=120, visual_dim=32), stage="pretrain", encoder=encoder).eval()
    tok = load_tokenizer(sp_model)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen), dim=-1).numpy()
    index = faiss.IndexFlatIP(32)
    index.add(vectors)
    cache = VisualCache(index)
    sets = [
        E.InputSet("image", torch.randn(3, 3, 224, 224, generator=gen), [0, 1, 2]),
        E.InputSet("text", ["a handwritten seven", "a picture of a two"], [7, 2]),
        E.InputSet("audio", torch.randn(2, 3, 1, 128, 204, generator=gen), [4, 5], ["a.wav", "b.wav"]),
    ]
    calls = []
    enhance = cache.enhance
    cache.enhance = lambda q: calls.append(q.shape) or enhance(q)  # type: ignore[method-assign]
    results = E.run_crossmodal(model, tok, sets, cache, batch_size=2, max_gen_len=4, examples=1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("crossmodal_accuracy")]
    assert len(lines) == 6 and all(LINE.match(ln) for ln in lines), lines
    assert [(m.group(1), m.group(2)) for m in map(LINE.match, lines)] == [
        (m, c) for m in ("image", "text", "audio") for c in ("off", "on")]
    assert [r.n for r in results] == [3, 3, 2, 2, 2, 2]
    # The cache is consulted exactly for the cache=on cells (one call per batch).
    assert len(calls) == 2 + 1 + 1
    table = E.markdown_table(results)
    assert table.count("\n") == 4 and "| audio | 2 |" in table
    # A caption that names the digit scores; naming another (or two) does not.
    assert W.caption_names_digit("a handwritten digit seven", 7) and not W.caption_names_digit("seven or 1", 7)


def test_cli_needs_the_stage1_checkpoint(tmp_path) -> None:
    with pytest.raises(SystemExit, match="make pretrain"):
        E.main(["--root", str(tmp_path), "--adapter", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit, match="unknown input"):
        E.main(["--inputs", "image,smell"])
