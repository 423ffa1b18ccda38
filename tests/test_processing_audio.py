"""Audio front end (SPEC §5.3): resampler and Kaldi fbank against the reference figures, clip sampling,
normalisation, edge cases."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ibllm.processing import MediaError, kaldi_fbank, load_audio, load_modality, resample
from ibllm.processing.audio import FBANK_MEAN, FBANK_STD, _fbank_batch, mel_banks, waveform_to_clips
from ibllm.processing.video import clip_timepoints

REF_PATH = Path(__file__).resolve().parent / "data" / "audio_frontend_reference.npz"
PAD_VALUE = (0.0 - FBANK_MEAN) / FBANK_STD


@pytest.fixture(scope="module")
def ref():
    return np.load(REF_PATH)


@pytest.mark.parametrize("name", ["sweep", "noise", "tones", "short", "quiet"])
def test_fbank_matches_reference(ref, name):
    wave = torch.from_numpy(ref[f"wave16k_{name}"])
    want = torch.from_numpy(ref[f"fbank_{name}"])
    got = kaldi_fbank(wave - wave.mean())
    assert got.shape == want.shape == ((198 if name != "short" else 48), 128)
    assert (got - want).abs().max().item() <= 1e-4
    # the empty mel bin (no FFT bin falls into triangle 3) is log(float32 eps) everywhere
    assert torch.allclose(got[:, 3], torch.full_like(got[:, 3], float(np.log(np.finfo(np.float32).eps))))


def test_fbank_batched_equals_single_and_channel0(ref):
    waves = torch.stack([torch.from_numpy(ref[f"wave16k_{n}"]) for n in ("sweep", "noise", "tones")])
    batched = _fbank_batch(waves)
    for i in range(3):
        assert torch.allclose(batched[i], kaldi_fbank(waves[i]), atol=1e-5)
    assert torch.equal(kaldi_fbank(waves[:2]), kaldi_fbank(waves[0]))  # [C,N] uses channel 0


def test_mel_banks_shape_and_empty_bin():
    banks = mel_banks(128, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (128, 257)
    assert (banks[:, -1] == 0).all() and (banks >= 0).all() and banks.max() <= 1
    assert (banks.sum(1) == 0).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("sr", [44100, 22050, 48000, 8000])
def test_resample_matches_reference(ref, sr):
    got = resample(torch.from_numpy(ref[f"wave{sr}"]), sr, 16000)
    want = torch.from_numpy(ref[f"resampled{sr}_to16k"])
    assert got.shape == want.shape == (24000,)
    assert (got - want).abs().max().item() <= 1e-5


def test_resample_batch_dims_and_identity():
    x = torch.randn(2, 3, 4410)
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, 1600)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 44100, 16000), atol=1e-6)
    assert resample(x, 16000, 16000) is x


def test_clip_timepoints_follow_spec():
    # 10 s audio, 3 clips: max_start 8 -> starts 0, 4, 8
    assert clip_timepoints(10.0, 2.0, 3) == [(0, 2), (4, 6), (8, 10)]
    # 5 clips over 7 s video: step 5/4
    assert clip_timepoints(7.0, 2.0, 5) == [(Fraction(5, 4) * k, Fraction(5, 4) * k + 2) for k in range(5)]
    assert clip_timepoints(1.5, 2.0, 3) == [(0, 2)] * 3  # shorter than a clip
    assert clip_timepoints(2.0, 2.0, 1) == [(0, 2)]


def write_wav(path, wave: np.ndarray, sr: int, subtype: str = "PCM_16") -> str:
    sf.write(str(path), wave, sr, subtype=subtype)
    return str(path)


def test_load_audio_shape_clips_and_normalisation(tmp_path):
    sr = 16000
    t = np.arange(5 * sr) / sr
    # 5 s: clip starts 0, 1.5, 3; each 2 s clip -> 198 frames, padded to 204 with normalised zeros
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wave[int(3 * sr):] *= 0.1  # the last clip is quieter
    p = write_wav(tmp_path / "a.wav", wave, sr, "FLOAT")
    x = load_audio(p)
    assert x.shape == (3, 1, 128, 204) and x.dtype == torch.float32
    assert torch.allclose(x[..., 198:], torch.full_like(x[..., 198:], PAD_VALUE))
    for k, start in enumerate((0.0, 1.5, 3.0)):
        seg = torch.from_numpy(wave[int(start * sr): int(start * sr) + 2 * sr])
        want = (kaldi_fbank(seg - seg.mean()).T - FBANK_MEAN) / FBANK_STD
        torch.testing.assert_close(x[k, 0, :, :198], want, atol=1e-4, rtol=0)
    assert x[2, 0, :, :198].mean() < x[0, 0, :, :198].mean()


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_load_audio_resamples_other_rates(tmp_path, sr):
    t = np.arange(int(2.5 * sr)) / sr
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 700 * t)], axis=1) * 0.4
    p = write_wav(tmp_path / f"s{sr}.wav", stereo.astype(np.float32), sr)
    x = load_audio(p)
    assert x.shape == (3, 1, 128, 204) and torch.isfinite(x).all()
    # channel 0 only: the 700 Hz channel must not show up
    ch0 = write_wav(tmp_path / f"m{sr}.wav", stereo[:, :1].astype(np.float32), sr)
    torch.testing.assert_close(x, load_audio(ch0), atol=1e-3, rtol=0)


def test_per_clip_mean_is_not_compounded():
    # D16: overlapping clips of a short waveform with a DC offset; the correct per-clip mean subtraction
    # must give the same features as processing each clip on its own.
    wave = torch.full((1, 40000), 0.25) + 0.01 * torch.randn(1, 40000, generator=torch.Generator().manual_seed(0))
    x = waveform_to_clips(wave)
    for k, (s, e) in enumerate(clip_timepoints(40000 / 16000, 2.0, 3)):
        seg = wave[0, int(s * 16000): int(e * 16000)]
        want = (kaldi_fbank(seg - seg.mean()).T - FBANK_MEAN) / FBANK_STD
        torch.testing.assert_close(x[k, 0, :, :198], want, atol=1e-4, rtol=0)
    assert torch.equal(wave, wave.clone())  # input left untouched


def test_silent_and_very_short_audio_is_finite(tmp_path):
    silent = load_audio(write_wav(tmp_path / "z.wav", np.zeros(16000 * 3, np.float32), 16000))
    assert torch.isfinite(silent).all()
    eps_val = (float(np.log(np.finfo(np.float32).eps)) - FBANK_MEAN) / FBANK_STD
    assert torch.allclose(silent[..., :198], torch.full_like(silent[..., :198], eps_val))
    tiny = load_audio(write_wav(tmp_path / "t.wav", np.full(100, 0.1, np.float32), 16000))
    assert torch.isfinite(tiny).all() and torch.allclose(tiny, torch.full_like(tiny, PAD_VALUE))
    half = load_audio(write_wav(tmp_path / "h.wav", np.random.default_rng(0).normal(0, .1, 8000), 16000))
    assert torch.isfinite(half).all() and torch.equal(half[0], half[2])  # < 2 s: 3 identical clips
    assert torch.allclose(half[0, 0, :, 48:], torch.full_like(half[0, 0, :, 48:], PAD_VALUE))


def test_bytes_batch_and_errors(tmp_path):
    p = write_wav(tmp_path / "ok.wav", np.zeros(16000, np.float32), 16000)
    batch = load_modality("audio", [Path(p).read_bytes(), p])
    assert batch.shape == (2, 3, 1, 128, 204)
    with pytest.raises(MediaError, match=r"audio .*missing\.wav.*file not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF garbage")
    with pytest.raises(MediaError, match=r"audio .*bad\.wav.*cannot decode"):
        load_audio(bad)
    with pytest.raises(MediaError, match=r"audio .*x\.xyz.*unsupported extension"):
        (tmp_path / "x.xyz").write_text("1 2 3")
        load_audio(tmp_path / "x.xyz")
    with pytest.raises(MediaError, match=r"audio item 1 .*bad\.wav"):
        load_modality("audio", [p, bad])
