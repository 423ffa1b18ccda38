"""Audio front end of ImageBind in plain torch: sinc resampler, Kaldi fbank, clip sampler.

Both DSP functions are written from their documented algorithms and match the reference front end
(``tests/data/audio_frontend_reference.npz``): fbank within 1e-4, resampling within 1e-5.

Bounds on the work per file (module constants a caller may change; ``None`` switches one off). They are
checked on the header (``soundfile.info`` / the PyAV stream) before decoding, and again while decoding:

- :data:`MAX_AUDIO_SECONDS` (600) and :data:`MAX_AUDIO_SAMPLES` (2**26 samples over all channels, 256 MB
  as float32): longer files are refused (the clips are spread over the whole file, so all of it is read).
- :data:`MAX_AUDIO_CHANNELS` (2): only the first channel is encoded, so a file with more channels (5.1,
  8-channel array recordings) is refused rather than silently reduced to its first channel.
- :data:`MIN_SAMPLE_RATE` / :data:`MAX_SAMPLE_RATE` (4 kHz / 384 kHz): rates outside are not audio the
  encoder can use (a 1 Hz "wav" is refused).
- :data:`MAX_RESAMPLE_FILTER` (2**22 coefficients): the polyphase resampler's filter has ``new * (orig +
  2 * width)`` coefficients for the rates divided by their gcd, so an odd rate such as 44101 Hz -> 16 kHz
  would need 700 million; such rates are refused (all standard rates need fewer than 300 thousand).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .av_input import open_container
from .errors import MediaError, check_limit, open_source
from .video import clip_timepoints

FBANK_MEAN = -4.268
FBANK_STD = 9.138
MAX_AUDIO_SECONDS: float | None = 600.0
"""Longest accepted audio, in seconds."""
MAX_AUDIO_SAMPLES: int | None = 2**26
"""Most samples (frames x channels) decoded from one file."""
MAX_AUDIO_CHANNELS: int | None = 2
"""Most channels accepted (only the first one is encoded)."""
MIN_SAMPLE_RATE: int | None = 4000
"""Lowest accepted sample rate in Hz."""
MAX_SAMPLE_RATE: int | None = 384000
"""Highest accepted sample rate in Hz."""
MAX_RESAMPLE_FILTER: int | None = 2**22
"""Most coefficients of the resampling filter from the file's rate to the model's."""
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".m4a", ".aac",
                    ".opus", ".mp4", ".webm", ".mkv", ".mov", ".avi", ".wma")


# --------------------------------------------------------------------------- resampling
@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[Tensor, int]:
    """Polyphase Hann-windowed sinc filter bank ``[new, 2*width + orig]`` (float64) and ``width``."""
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    # Phase p of the output needs the input at times idx - p/new (in input-sample units / orig).
    t = (-torch.arange(new, dtype=torch.float64) / new)[:, None] + idx[None, :]
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    return sinc * window * (base_freq / orig), width


def resample(
    wave: Tensor, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> Tensor:
    """Band-limited resampling with a Hann-windowed sinc, polyphase after reducing the rates by their gcd.

    ``wave`` is ``[..., time]`` (any leading dims); returns ``[..., ceil(time * new_sr / orig_sr)]`` in the
    input dtype. The cutoff is ``rolloff * min(orig_sr, new_sr) / 2`` and each side of the filter spans
    ``lowpass_filter_width`` zero crossings (the defaults of the reference resampler).
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, float(rolloff))
    shape = wave.shape
    x = wave.reshape(-1, 1, shape[-1])
    length = shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x, kernel.to(wave.dtype)[:, None, :], stride=orig)  # [B, new, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(new * length / orig)
    return y[:, :target].reshape(*shape[:-1], target)


def resample_filter_size(orig_sr: int, new_sr: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> int:
    """Number of coefficients of :func:`resample`'s filter from ``orig_sr`` to ``new_sr`` (0 when equal)."""
    if orig_sr == new_sr:
        return 0
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    width = math.ceil(lowpass_filter_width * orig / (min(orig, new) * rolloff))
    return new * (2 * width + orig)


# --------------------------------------------------------------------------- Kaldi fbank
@lru_cache(maxsize=16)
def mel_banks(num_bins: int, padded_window: int, sample_frequency: float, low_freq: float,
              high_freq: float) -> Tensor:
    """Kaldi triangular mel filters ``[num_bins, padded_window//2 + 1]`` float32 (last FFT bin always 0).

    ``high_freq <= 0`` is an offset from Nyquist (Kaldi convention). Triangles are linear in the mel scale
    ``1127 ln(1 + f/700)``; a bin whose triangle contains no FFT bin stays all-zero. Like Kaldi, the band
    edges are computed in double and the per-FFT-bin mel values and slopes in single precision: low-energy
    bins of the log fbank are sensitive to the weights at the 1e-5 level, so this matters for matching.
    """
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < nyquist or not 0.0 < high_freq <= nyquist or low_freq >= high_freq:
        raise ValueError(f"bad mel range low={low_freq} high={high_freq} for nyquist {nyquist}")
    num_fft_bins = padded_window // 2
    bin_width = sample_frequency / padded_window
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    freqs = bin_width * torch.arange(num_fft_bins, dtype=torch.float32)
    mel = (1127.0 * torch.log(1.0 + freqs / 700.0))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def _fbank_frames(frames: Tensor, num_mel_bins: int, sample_frequency: float, preemphasis: float,
                  remove_dc_offset: bool, round_to_power_of_two: bool, low_freq: float, high_freq: float,
                  use_power: bool, use_log_fbank: bool) -> Tensor:
    """Frames ``[..., F, window]`` -> mel features ``[..., F, num_mel_bins]``."""
    window = frames.shape[-1]
    if remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if preemphasis != 0.0:
        # x[i] -= c * x[i-1], and x[0] -= c * x[0]
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - preemphasis * prev
    frames = frames * torch.hann_window(window, periodic=False, dtype=frames.dtype)
    n_fft = 1 << (window - 1).bit_length() if round_to_power_of_two else window
    spec = torch.fft.rfft(frames, n=n_fft).abs()
    if use_power:
        spec = spec.pow(2)
    banks = mel_banks(num_mel_bins, n_fft, float(sample_frequency), float(low_freq), float(high_freq))
    mel = torch.matmul(spec, banks.to(spec.dtype).T)  # [..., F, bins]
    if use_log_fbank:
        mel = torch.log(torch.clamp(mel, min=torch.finfo(torch.float32).eps))
    return mel


def frame_signal(wave: Tensor, frame_length: int, frame_shift: int) -> Tensor:
    """``[..., N]`` -> ``[..., F, frame_length]`` windows with Kaldi ``snip_edges=True``
    (``F = 1 + (N - frame_length) // frame_shift``, 0 when ``N < frame_length``). A strided view."""
    n = wave.shape[-1]
    if n < frame_length:
        return wave.new_zeros(*wave.shape[:-1], 0, frame_length)
    return wave.unfold(-1, frame_length, frame_shift)


def kaldi_fbank(
    wave: Tensor,
    num_mel_bins: int = 128,
    sample_frequency: float = 16000,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_power: bool = True,
    use_log_fbank: bool = True,
    channel: int = 0,
) -> Tensor:
    """Kaldi-compatible log mel filterbank (ImageBind's settings) -> ``[frames, num_mel_bins]`` float32.

    ``wave`` is ``[N]`` or ``[channels, N]`` (then only ``channel`` is used, default 0 like the reference).
    Settings fixed to ImageBind's: hanning window, no dither, no energy (``htk_compat`` is then a no-op),
    snip edges. Per frame: remove DC, pre-emphasise, window, zero-pad to the next power of two, power
    spectrum, mel filters, ``log(max(x, float32 eps))``. A mel bin that no FFT bin falls into (bin 3 at
    128 bins / 512-point FFT) is ``log(eps) = -15.9424``. No per-frame Python loop.
    """
    if wave.dim() == 2:
        wave = wave[channel]
    elif wave.dim() != 1:
        raise ValueError(f"kaldi_fbank expects [N] or [C,N], got {tuple(wave.shape)}")
    return _fbank_batch(wave.unsqueeze(0), num_mel_bins, sample_frequency, frame_length_ms, frame_shift_ms,
                        preemphasis, remove_dc_offset, round_to_power_of_two, low_freq, high_freq,
                        use_power, use_log_fbank)[0]


def _fbank_batch(waves: Tensor, num_mel_bins: int = 128, sample_frequency: float = 16000,
                 frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                 remove_dc_offset: bool = True, round_to_power_of_two: bool = True, low_freq: float = 20.0,
                 high_freq: float = 0.0, use_power: bool = True, use_log_fbank: bool = True) -> Tensor:
    """``kaldi_fbank`` over a batch of equal-length mono signals ``[B, N]`` -> ``[B, frames, bins]``."""
    waves = waves.float()
    frame_length = int(sample_frequency * frame_length_ms * 0.001)
    frame_shift = int(sample_frequency * frame_shift_ms * 0.001)
    frames = frame_signal(waves, frame_length, frame_shift)
    if frames.shape[-2] == 0:  # shorter than one window: no frames (the FFT backend rejects empty input)
        return waves.new_zeros(*waves.shape[:-1], 0, num_mel_bins)
    return _fbank_frames(frames, num_mel_bins, sample_frequency, preemphasis, remove_dc_offset,
                         round_to_power_of_two, low_freq, high_freq, use_power, use_log_fbank)


# --------------------------------------------------------------------------- decoding
_LIMIT = "ibllm.processing.audio."


def check_audio_stream(source: object, rate: int, channels: int, frames: int | None = None,
                       target_rate: int | None = None) -> None:
    """Refuse audio whose rate, channel count, length (``frames`` per channel, when known) or resampling
    filter to ``target_rate`` is over this module's limits, with a :class:`MediaError` naming the file."""
    def refuse(reason: str) -> None:
        raise MediaError("audio", source, reason)

    if rate <= 0:
        refuse(f"invalid sample rate {rate} Hz")
    if MIN_SAMPLE_RATE is not None and rate < MIN_SAMPLE_RATE:
        refuse(f"sample rate {rate} Hz is below the minimum of {MIN_SAMPLE_RATE} Hz ({_LIMIT}MIN_SAMPLE_RATE)")
    if MAX_SAMPLE_RATE is not None and rate > MAX_SAMPLE_RATE:
        refuse(f"sample rate {rate} Hz is over the maximum of {MAX_SAMPLE_RATE} Hz ({_LIMIT}MAX_SAMPLE_RATE)")
    if MAX_AUDIO_CHANNELS is not None and channels > MAX_AUDIO_CHANNELS:
        refuse(f"{channels} channels: at most {MAX_AUDIO_CHANNELS} are accepted because only the first one is "
               f"encoded; mix it down to mono first ({_LIMIT}MAX_AUDIO_CHANNELS)")
    if target_rate is not None and MAX_RESAMPLE_FILTER is not None:
        size = resample_filter_size(rate, target_rate)
        if size > MAX_RESAMPLE_FILTER:
            refuse(f"sample rate {rate} Hz needs a resampling filter of {size:,} coefficients to reach "
                   f"{target_rate} Hz, over the limit of {MAX_RESAMPLE_FILTER:,} ({_LIMIT}MAX_RESAMPLE_FILTER); "
                   f"convert it to a standard rate first")
    if frames is not None:
        check_length(source, frames, rate, channels)


def max_frames(rate: int, channels: int) -> int | None:
    """Most frames (samples per channel) the limits allow at ``rate`` with ``channels``; ``None``: no limit."""
    caps = []
    if MAX_AUDIO_SECONDS is not None:
        caps.append(int(MAX_AUDIO_SECONDS * rate))
    if MAX_AUDIO_SAMPLES is not None:
        caps.append(MAX_AUDIO_SAMPLES // max(channels, 1))
    return min(caps) if caps else None


def check_length(source: object, frames: int, rate: int, channels: int) -> None:
    """Refuse audio of ``frames`` samples per channel over :data:`MAX_AUDIO_SECONDS` / :data:`MAX_AUDIO_SAMPLES`."""
    check_limit("audio", source, "sample count (frames x channels)", frames * channels, MAX_AUDIO_SAMPLES,
                _LIMIT + "MAX_AUDIO_SAMPLES")
    if MAX_AUDIO_SECONDS is not None and frames > MAX_AUDIO_SECONDS * rate:
        raise MediaError("audio", source, f"duration {frames / rate:,.1f} s is over the limit of "
                                          f"{MAX_AUDIO_SECONDS:g} s ({_LIMIT}MAX_AUDIO_SECONDS)")


def _decode_soundfile(src, source, target_rate: int | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    info = sf.info(src)  # the header only
    check_audio_stream(source, int(info.samplerate), int(info.channels), int(info.frames), target_rate)
    cap = max_frames(int(info.samplerate), int(info.channels))
    if hasattr(src, "seek"):
        src.seek(0)
    data, sr = sf.read(src, frames=-1 if cap is None else cap + 1, dtype="float32",
                       always_2d=True)  # [N, C], ints scaled to [-1, 1)
    check_length(source, data.shape[0], int(sr), data.shape[1])
    return data.T, int(sr)


def _decode_pyav(src, source, target_rate: int | None) -> tuple[np.ndarray, int]:
    import av  # imported on use: PyAV is heavy and only this fallback decoder needs it

    try:
        opened = open_container(src, "audio", source)
    except MediaError as e:  # read_audio reports it among the decoders' failures
        raise ValueError(e.reason) from e
    with opened as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        sr = int(stream.codec_context.sample_rate or stream.rate or 0)
        channels = int(stream.codec_context.channels or 0)
        if stream.duration is not None and stream.time_base is not None:
            declared = int(stream.duration * stream.time_base * sr)
        elif container.duration is not None:
            declared = int(container.duration * sr / 1_000_000)
        else:
            declared = None
        check_audio_stream(source, sr, channels, declared, target_rate)
        cap = max_frames(sr, channels)
        resampler = av.AudioResampler(format="fltp", layout=None, rate=None)
        chunks, total = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                total += chunks[-1].shape[-1]
            if cap is not None and total > cap:  # the header understated the length
                check_length(source, total, sr, channels)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise ValueError("audio stream has no samples")
    data = np.concatenate(chunks, axis=1).astype(np.float32)
    check_audio_stream(source, sr, data.shape[0], data.shape[1], target_rate)
    return data, sr


def read_audio(source: str | Path | bytes, target_rate: int | None = None) -> tuple[Tensor, int]:
    """Decode an audio file (or bytes) -> (float32 waveform ``[channels, samples]`` in [-1,1], rate).

    libsndfile (via ``soundfile``) reads WAV/FLAC/OGG/MP3/AIFF; anything else (AAC, M4A, the audio track of
    a video) is decoded with PyAV. Missing file / undecodable data -> :class:`MediaError`, and so is a file
    over this module's limits (checked on the header first); ``target_rate`` (the rate the caller will
    resample to) adds the resampling-filter check.
    """
    src = open_source(source, "audio", AUDIO_EXTENSIONS if not isinstance(source, (bytes, bytearray)) else None)
    errors = []
    for decoder in (_decode_soundfile, _decode_pyav):
        try:
            if hasattr(src, "seek"):
                src.seek(0)
            data, sr = decoder(src, source, target_rate)
            break
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure falls through to the next decoder
            errors.append(f"{decoder.__name__.removeprefix('_decode_')}: {e}")
    else:
        raise MediaError("audio", source, "cannot decode audio (" + "; ".join(errors) + ")")
    wave = torch.from_numpy(np.ascontiguousarray(data))
    if not torch.isfinite(wave).all():
        raise MediaError("audio", source, "waveform contains NaN or Inf")
    return wave, sr


# --------------------------------------------------------------------------- ImageBind audio pipeline
def waveform_to_clips(
    wave: Tensor,
    sample_rate: int = 16000,
    clip_duration: float = 2.0,
    clips_per_video: int = 3,
    target_length: int = 204,
    num_mel_bins: int = 128,
) -> Tensor:
    """Waveform ``[channels, samples]`` at ``sample_rate`` -> normalised clips ``[clips, 1, bins, target_length]``.

    Clip ``k`` is ``wave[:, int(start*sr):int(end*sr)]`` with the constant-clips-per-video times of
    :func:`~ibllm.processing.video.clip_timepoints`. Each clip has its *own* mean (over all channels and
    samples) subtracted, computed on an unmodified copy — the official code subtracts in place on views of
    one waveform, so overlapping clips lose their mean repeatedly. Per-frame DC removal in the fbank makes
    this difference tiny.
    Then channel 0 -> fbank -> ``[bins, frames]`` -> zero pad / crop to ``target_length`` ->
    ``(x + 4.268) / 9.138``. Silent or too-short clips (< 400 samples) give finite features.
    """
    n = wave.shape[-1]
    duration = n / sample_rate
    clips = []
    for start, end in clip_timepoints(duration, clip_duration, clips_per_video):
        clip = wave[:, int(start * sample_rate): int(end * sample_rate)]
        if clip.numel():
            clip = clip - clip.mean()
        clips.append(clip[0])
    lengths = {c.shape[-1] for c in clips}
    if len(lengths) == 1:
        feats = list(_fbank_batch(torch.stack(clips), num_mel_bins, sample_rate))
    else:
        feats = [_fbank_batch(c[None], num_mel_bins, sample_rate)[0] for c in clips]
    out = wave.new_zeros(len(clips), 1, num_mel_bins, target_length, dtype=torch.float32)
    for k, f in enumerate(feats):
        t = min(f.shape[0], target_length)
        out[k, 0, :, :t] = f[:t].T
    return (out - FBANK_MEAN) / FBANK_STD


def load_audio(
    source: str | Path | bytes,
    clip_duration: float = 2.0,
    clips_per_video: int = 3,
    target_length: int = 204,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
) -> Tensor:
    """ImageBind audio preprocessing: file/bytes -> ``[clips_per_video, 1, 128, target_length]``.

    Decode (float in [-1,1], all channels), resample to ``sample_rate`` with :func:`resample`, then
    :func:`waveform_to_clips` (which encodes the first channel). Defaults give ``[3,1,128,204]``; a 2 s clip
    has 198 fbank frames. Silence gives finite features (``log(eps)``); audio shorter than one 25 ms window
    gives only padding; a file with no samples at all, or one over this module's limits (length, channels,
    sample rate), raises :class:`MediaError`.
    """
    wave, sr = read_audio(source, target_rate=sample_rate)
    if wave.shape[-1] == 0:
        raise MediaError("audio", source, "audio has no samples")
    if sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
    return waveform_to_clips(wave, sample_rate, clip_duration, clips_per_video, target_length, num_mel_bins)
