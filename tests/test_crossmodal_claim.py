"""The cross-modal claim, measured at test size: a stage-1 model trained on digit *images* only captions held-out
*spoken* digits (an audio tower bound to its frozen vision tower, espeak-ng speech in voices, speeds and pitches
training never hears) above chance, and the visual cache of the training images does not lower that accuracy.

Shared with the learning tests: the demo's stage-0 towers and the stage-1 checkpoint (``digits_demo`` and
``digits_stage1`` in conftest.py). The scoring is the demo's (:func:`ibllm.demos.crossmodal.experiment.caption_cell`,
a caption counts when it names exactly the right digit).
"""

from __future__ import annotations

import time

import pytest

from digits_training import shallow_smollm2
from ibllm.build import load_tokenizer_for
from ibllm.cache import load_cache
from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import make_factory
from ibllm.checkpoints.adapters import load_trainable
from ibllm.demos.crossmodal import experiment as E
from ibllm.demos.crossmodal.audio_tower import AudioRecipe, build_audio_encoder
from ibllm.demos.crossmodal.speech import SPEECH_DIR, SpeechSpec, write_spoken_digits

pytestmark = pytest.mark.system  # synthesises speech with espeak-ng

# All ten words; 6 training voices x 2 speeds x 2 pitches (240 clips); held out: 3 other voices at a speed and
# pitches between the training ones (60 clips).
CLAIM_SPEECH = SpeechSpec(
    train_voices=("en-us+m1", "en-us+f1", "en-gb+m2", "en-gb+f2", "en-029+m5", "en-gb-scotland+f5"),
    train_speeds=(130, 190), train_pitches=(30, 70),
    heldout_voices=("en-us+f4", "en-gb+m6", "en-gb-x-rp+f1"), heldout_speeds=(160,), heldout_pitches=(40, 60))
AUDIO = AudioRecipe(steps=120, warmup=12, batch_size=80, speech=CLAIM_SPEECH)
CHANCE = 0.1  # ten digits


def test_image_only_model_captions_unseen_speech_above_chance_and_the_cache_does_not_hurt(
        espeak, digits_demo, digits_stage1) -> None:
    start = time.perf_counter()
    root = digits_demo.root
    encoder = build_audio_encoder(root, base=digits_demo.encoder, out_path=root / "encoder_av.safetensors",
                                  recipe=AUDIO, progress=False)
    build_cache_from_shards(digits_demo.shards.train_pattern, root / "cache",
                            make_factory("demo", str(digits_demo.encoder), 128, "cpu", "fp32", 1),
                            show_progress=False)
    cache = load_cache(root / "cache", k=10, temperature=20.0, weight=0.5, dim=128)
    model = shallow_smollm2("pretrain", encoder.path, modalities=("vision", "text", "audio")).eval()
    load_trainable(model, digits_stage1.checkpoint)
    tokenizer = load_tokenizer_for("smollm2-135m-instruct")
    speech = write_spoken_digits(root / SPEECH_DIR, CLAIM_SPEECH, progress=False)
    audio = E.audio_inputs(speech, "heldout", progress=False)

    naive = E.caption_cell(model, tokenizer, audio, None, max_gen_len=12)
    cached = E.caption_cell(model, tokenizer, audio, cache, max_gen_len=12)
    print(f"audio tower {encoder.info['accuracy']}; {naive.line()}; {cached.line()}; "
          f"stage 1 on images {digits_stage1.after:.2f}; {time.perf_counter() - start:.0f} s")
    assert len(audio) == 60 and naive.n == cached.n == 60
    assert naive.accuracy >= CHANCE + 0.2, naive.examples[:10]
    assert cached.accuracy >= naive.accuracy, (naive.accuracy, cached.accuracy)
