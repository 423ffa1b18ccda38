"""Audio front end: resampler and Kaldi fbank against the reference figures, clip sampling,
normalisation, edge cases.

The log fbank is compared with the reference only where the comparison carries information. A float32
FFT's rounding error in a mel bin grows like ``eps * sqrt(P_max / P)`` (``P_max``: the frame's loudest mel
bin), so after the log a bin 1e-7 below the loudest one moves by ~0.02 between FFT libraries or CPUs (MKL
takes other code paths on Intel than on AMD), or when the input moves by one float32 ulp, while it says
nothing about the front end. The comparison therefore asks

* tight agreement (1e-4 in log) for every bin within 1e-4 of its frame's loudest bin in power, and
* agreement within ``1e-4 + 64 eps sqrt(P_max / P)`` for every bin (the rounding model, large margin),

and the deterministic parts before the FFT (framing, DC removal, pre-emphasis, window, zero padding) and the
mel matrix are checked tightly against float64 formulas. Mutation tests show that these comparisons still
catch a wrong window, pre-emphasis, mel scale or resampler phase.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import Tensor

import ibllm.processing.audio as audio_mod
from ibllm.processing import MediaError, kaldi_fbank, load_audio, load_modality, resample
from ibllm.processing.audio import FBANK_MEAN, FBANK_STD, _fbank_batch, frame_signal, mel_banks, waveform_to_clips
from ibllm.processing.video import clip_timepoints

REF_PATH = Path(__file__).resolve().parent / "data" / "audio_frontend_reference.npz"
PAD_VALUE = (0.0 - FBANK_MEAN) / FBANK_STD
CASES = ["sweep", "noise", "tones", "short", "quiet"]
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
AUDIBLE = 1e-4  # bins at least this fraction of the frame's loudest bin (in power) are compared tightly
NOISE_GAIN = 64.0  # measured worst case of the rounding model is ~5 (one-ulp input changes, other FFTs)


@pytest.fixture(scope="module")
def ref():
    return np.load(REF_PATH)


def assert_fbank_close(got: Tensor, want: Tensor, tol: float = 1e-4) -> None:
    """Log fbanks ``[frames, bins]``: tight where the bin is audible, FFT-rounding bound everywhere else."""
    assert got.shape == want.shape
    got, want = got.double(), want.double()
    loudest = want.amax(-1, keepdim=True)
    err = (got - want).abs()
    audible = want >= loudest + math.log(AUDIBLE)
    worst = err[audible].max().item()
    assert worst <= tol, f"audible mel bins differ by {worst:.3g} > {tol:g}"
    bound = tol + NOISE_GAIN * EPS32 * torch.exp((loudest - want) / 2)
    ratio = (err / bound).max().item()
    assert ratio <= 1.0, f"a quiet mel bin differs by {ratio:.3g}x the float32 FFT rounding bound"


def fbank_of(ref, name: str) -> tuple[Tensor, Tensor]:
    """(our fbank of the reference waveform after removing its mean, the reference fbank)."""
    wave = torch.from_numpy(ref[f"wave16k_{name}"])
    return kaldi_fbank(wave - wave.mean()), torch.from_numpy(ref[f"fbank_{name}"])


@pytest.mark.parametrize("name", CASES)
def test_fbank_matches_reference(ref, name):
    got, want = fbank_of(ref, name)
    assert got.shape == want.shape == ((198 if name != "short" else 48), 128)
    assert_fbank_close(got, want)
    # the empty mel bin (no FFT bin falls into triangle 3) is log(float32 eps) everywhere
    assert torch.allclose(got[:, 3], torch.full_like(got[:, 3], float(np.log(np.finfo(np.float32).eps))))


def one_ulp(wave: np.ndarray, seed: int = 0) -> np.ndarray:
    """Every float32 sample moved by one ulp, up or down at random."""
    up = np.random.default_rng(seed).random(wave.shape) < 0.5
    return np.nextafter(wave, np.where(up, np.inf, -np.inf).astype(np.float32)).astype(np.float32)


def dft_float32(x: Tensor, n: int | None = None) -> Tensor:
    """A float32 real DFT by matrix product: another FFT algorithm with other rounding."""
    n = n or x.shape[-1]
    x = torch.nn.functional.pad(x, (0, n - x.shape[-1]))
    k, t = torch.arange(n // 2 + 1, dtype=torch.float64), torch.arange(n, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(k, t) / n
    return torch.complex(x @ torch.cos(angle).float().T, -(x @ torch.sin(angle).float().T))


def test_reference_comparison_tolerates_float32_rounding(ref, monkeypatch):
    sweep, _ = fbank_of(ref, "sweep")
    wave = torch.from_numpy(one_ulp(ref["wave16k_sweep"]))
    # the sensitivity a max-abs comparison trips over: one ulp of input moves near-silent bins by ~0.02
    assert (kaldi_fbank(wave - wave.mean()) - sweep).abs().max() > 1e-3
    for name in CASES:
        want = torch.from_numpy(ref[f"fbank_{name}"])
        for seed in range(2):
            wave = torch.from_numpy(one_ulp(ref[f"wave16k_{name}"], seed))
            assert_fbank_close(kaldi_fbank(wave - wave.mean()), want)
    rfft = torch.fft.rfft
    for fft in (lambda x, n=None: rfft(x.double(), n=n).to(torch.complex64), dft_float32):
        monkeypatch.setattr(torch.fft, "rfft", fft)
        for name in CASES:
            got, want = fbank_of(ref, name)
            assert_fbank_close(got, want)


_HANN = torch.hann_window  # the real one, for the replacements below (which are patched over it)


def povey_window(n: int, periodic: bool = True, dtype=None) -> Tensor:
    """Kaldi's default "povey" window (Hann to the power 0.85) in place of the symmetric Hann."""
    return _HANN(n, periodic=False, dtype=torch.float64).pow(0.85).to(dtype)


def periodic_hann(n: int, periodic: bool = True, dtype=None) -> Tensor:
    """The periodic Hann window (period N instead of N - 1) in place of the symmetric one."""
    return _HANN(n, periodic=True, dtype=dtype)


def slaney_mel_banks(num_bins: int, padded_window: int, sample_frequency: float, low_freq: float,
                     high_freq: float) -> Tensor:
    """Triangles on the Slaney mel scale (linear below 1 kHz) instead of Kaldi's ``1127 ln(1 + f/700)``."""
    def mel(f):
        f = torch.as_tensor(f, dtype=torch.float64)
        return torch.where(f < 1000, f * 3 / 200, 15 + torch.log(f / 1000) * 27 / math.log(6.4))
    high_freq = high_freq + sample_frequency / 2 if high_freq <= 0 else high_freq
    lo, hi = mel(low_freq), mel(high_freq)
    delta = (hi - lo) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    m = mel(sample_frequency / padded_window * torch.arange(padded_window // 2, dtype=torch.float64))[None]
    banks = torch.clamp(torch.minimum((m - left) / (center - left), (right - m) / (right - center)), min=0)
    return torch.nn.functional.pad(banks.float(), (0, 1))


def with_frame_args(**fixed):
    """``_fbank_frames`` with some of its settings overridden (pre-emphasis, power)."""
    original = audio_mod._fbank_frames
    names = ["num_mel_bins", "sample_frequency", "preemphasis", "remove_dc_offset", "round_to_power_of_two",
             "low_freq", "high_freq", "use_power", "use_log_fbank"]

    def mutated(frames, *args):
        kwargs = dict(zip(names, args))
        kwargs.update(fixed)
        return original(frames, **kwargs)
    return mutated


FBANK_MUTATIONS = {
    "povey window": (torch, "hann_window", povey_window),
    "periodic hann window": (torch, "hann_window", periodic_hann),
    "no pre-emphasis": (audio_mod, "_fbank_frames", with_frame_args(preemphasis=0.0)),
    "pre-emphasis 0.95": (audio_mod, "_fbank_frames", with_frame_args(preemphasis=0.95)),
    "magnitude not power": (audio_mod, "_fbank_frames", with_frame_args(use_power=False)),
    "slaney mel scale": (audio_mod, "mel_banks", slaney_mel_banks),
}


@pytest.mark.parametrize("mutation", list(FBANK_MUTATIONS))
def test_fbank_comparison_catches_mutations(ref, monkeypatch, mutation):
    monkeypatch.setattr(*FBANK_MUTATIONS[mutation])
    for name in CASES:
        got, want = fbank_of(ref, name)
        with pytest.raises(AssertionError):
            assert_fbank_close(got, want)


def kaldi_frames_float64(wave: np.ndarray, preemphasis: float = 0.97) -> tuple[np.ndarray, np.ndarray]:
    """Framing (400/160, snip edges), per-frame DC removal, pre-emphasis and the symmetric Hann window
    ``0.5 - 0.5 cos(2 pi n / (N - 1))`` in float64: what the FFT should see (before zero padding).
    Returns those frames ``[F, 400]`` and each frame's peak after DC removal ``[F, 1]`` (the error scale)."""
    x = wave.astype(np.float64)
    count = 1 + (len(x) - 400) // 160
    frames = np.stack([x[i * 160: i * 160 + 400] for i in range(count)])
    frames = frames - frames.mean(1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], 1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    return (frames - preemphasis * prev) * window, np.abs(frames).max(1, keepdims=True)


def fft_input(monkeypatch, wave: Tensor) -> tuple[Tensor, int]:
    """Run ``kaldi_fbank`` and capture what it hands to the FFT: (frames ``[F, 400]``, FFT length)."""
    seen = {}
    rfft = torch.fft.rfft

    def spy(x, n=None, **kw):
        seen["x"], seen["n"] = x.detach().clone(), n
        return rfft(x, n=n, **kw)
    monkeypatch.setattr(torch.fft, "rfft", spy)
    kaldi_fbank(wave)
    monkeypatch.setattr(torch.fft, "rfft", rfft)  # only the spy is undone; other patches stay
    return seen["x"].reshape(-1, seen["x"].shape[-1]), seen["n"]


def test_framing_is_exact_slicing():
    wave = torch.randn(8000, generator=torch.Generator().manual_seed(1))
    frames = frame_signal(wave, 400, 160)
    assert frames.shape == (48, 400)
    assert torch.equal(frames, torch.stack([wave[i * 160: i * 160 + 400] for i in range(48)]))
    assert frame_signal(wave[:399], 400, 160).shape == (0, 400)


@pytest.mark.parametrize("name", CASES)
def test_frames_before_fft_match_float64(ref, monkeypatch, name):
    wave = torch.from_numpy(ref[f"wave16k_{name}"])
    wave = wave - wave.mean()
    seen, n_fft = fft_input(monkeypatch, wave)
    want, scale = kaldi_frames_float64(wave.numpy())
    assert n_fft == 512 and seen.shape == want.shape
    assert (np.abs(seen.double().numpy() - want) / scale).max() <= 16 * EPS32  # measured: <= 4 ulp


@pytest.mark.parametrize("mutation", ["povey window", "periodic hann window", "no pre-emphasis", "pre-emphasis 0.95"])
def test_frames_check_catches_mutations(ref, monkeypatch, mutation):
    wave = torch.from_numpy(ref["wave16k_noise"])
    monkeypatch.setattr(*FBANK_MUTATIONS[mutation])
    seen, _ = fft_input(monkeypatch, wave)
    want, scale = kaldi_frames_float64(wave.numpy())
    assert (np.abs(seen.double().numpy() - want) / scale).max() > 1000 * EPS32


def kaldi_mel_banks_float64(num_bins: int = 128, n_fft: int = 512, sr: float = 16000.0, low: float = 20.0,
                            high: float = 8000.0) -> np.ndarray:
    """Kaldi's triangles, linear in ``1127 ln(1 + f / 700)``, all in float64 -> ``[bins, n_fft/2 + 1]``."""
    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)
    lo, hi = mel(low), mel(high)
    delta = (hi - lo) / (num_bins + 1)
    b = np.arange(num_bins)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    m = mel(sr / n_fft * np.arange(n_fft // 2))[None]
    banks = np.maximum(0.0, np.minimum((m - left) / (center - left), (right - m) / (right - center)))
    return np.pad(banks, ((0, 0), (0, 1)))


def test_mel_banks_match_float64_formula():
    want = kaldi_mel_banks_float64()
    got = mel_banks(128, 512, 16000.0, 20.0, 0.0).double().numpy()
    assert ((got > 0) == (want > 0)).all()  # same support
    assert np.abs(got - want).max() <= 5e-5  # float32 mel values (as Kaldi): measured 1.4e-5
    wrong = slaney_mel_banks(128, 512, 16000.0, 20.0, 0.0).double().numpy()
    assert np.abs(wrong - want).max() > 0.1


def test_fbank_batched_equals_single_and_channel0(ref):
    waves = torch.stack([torch.from_numpy(ref[f"wave16k_{n}"]) for n in ("sweep", "noise", "tones")])
    batched = _fbank_batch(waves)
    for i in range(3):
        assert_fbank_close(batched[i], kaldi_fbank(waves[i]), tol=1e-5)
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


def test_resample_comparison_catches_phase_shift(ref, monkeypatch):
    kernel = audio_mod._sinc_kernel

    def shifted(*args):  # every polyphase filter delayed by one input sample
        filters, width = kernel(*args)
        return filters.roll(1, dims=1), width
    monkeypatch.setattr(audio_mod, "_sinc_kernel", shifted)
    for sr in (44100, 22050, 48000, 8000):
        got = resample(torch.from_numpy(ref[f"wave{sr}"]), sr, 16000)
        assert (got - torch.from_numpy(ref[f"resampled{sr}_to16k"])).abs().max().item() > 1e-2


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
    # overlapping clips of a short waveform with a DC offset; the correct per-clip mean subtraction
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
