"""Decode and transform one sample's fields, one pure function per modality.

Axis legend: C channels, H height, W width, T audio samples, M mel bins, F frames, L tokens.
All functions take raw bytes (or a decoded waveform) and return CPU tensors; they hold no state
except cached, stateless torchaudio modules.
"""

import functools
import io
import math
from collections.abc import Callable

import numpy as np
import soundfile
import torch
import torchaudio
from einops import rearrange
from PIL import Image

from data_pipelines.specs import AudioSpec, ImageSpec

Tokenizer = Callable[[list[str]], torch.Tensor]  # list of N captions -> LongTensor [N, L]

_LOG_EPS = 1e-6


def decode_image(data: bytes, spec: ImageSpec, train: bool) -> torch.Tensor:
    """PNG/JPEG/WebP bytes -> float32 [3, size, size], normalised by spec.mean/std.

    `train` is accepted so augmentation can be added without changing callers; it does nothing yet.
    """
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB").resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # [H, W, C] uint8
    image = rearrange(pixels, "h w c -> c h w").float().div_(255.0)  # [C, H, W] in [0, 1]
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (image - mean) / std  # [3, size, size]


def decode_audio(data: bytes) -> tuple[torch.Tensor, int]:
    """Audio file bytes (wav/flac/ogg/mp3, via libsndfile) -> (mono float32 [T], sample rate).

    Channels are averaged. torchaudio.load is not used: it needs torchcodec and FFmpeg.
    """
    wave, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [T, channels]
    if wave.shape[0] == 0:
        raise ValueError("audio has no samples")
    mono = wave.mean(axis=1, dtype=np.float32)  # [T]
    return torch.from_numpy(np.ascontiguousarray(mono)), int(sample_rate)


def decode_text(data: bytes) -> str:
    """Caption bytes (UTF-8 .txt) -> stripped string."""
    return data.decode("utf-8").strip()


def tokenize(caption: str, tokenizer: Tokenizer) -> torch.Tensor:
    """One caption -> LongTensor [L] with the tokenizer mmssl hands in (open_clip's convention)."""
    tokens = tokenizer([caption])  # [1, L]
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(
            f"tokenizer must map a list of 1 caption to a [1, L] tensor, got {tuple(tokens.shape)}"
        )
    return tokens[0].long()  # [L]


@functools.cache
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    # The module precomputes its sinc kernel; rebuilding it per clip (functional.resample) is ~15x slower.
    return torchaudio.transforms.Resample(orig_rate, new_rate)


@functools.cache
def _mel(sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, center=True, power=2.0
    )


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[T] at orig_rate -> [T'] at new_rate (returns the input unchanged when the rates agree)."""
    if orig_rate == new_rate:
        return wave
    with torch.no_grad():
        return _resampler(orig_rate, new_rate)(wave)


def crop_or_pad(
    wave: torch.Tensor, length: int, *, train: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[T] -> [length]: random crop (train) or centre crop (eval) when longer, zero pad on the right when shorter."""
    excess = wave.shape[0] - length
    if excess > 0:
        start = int(torch.randint(0, excess + 1, (1,), generator=generator)) if train else excess // 2
        return wave[start : start + length]
    if excess < 0:
        return torch.nn.functional.pad(wave, (0, -excess))
    return wave


def audio_to_logmel(
    wave: torch.Tensor | np.ndarray,
    sr: int,
    spec: AudioSpec,
    train: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mono waveform [T] at `sr` -> normalised log-mel float32 [n_mels, spec.n_frames].

    The clip is cropped (random in train, centred in eval) or right-padded with zeros to
    spec.clip_samples at spec.sample_rate. When `sr` differs, the crop/pad happens first, at `sr`, on
    the span that resamples to one clip: resampling then sees one fixed input length per source rate
    (a new length per clip makes the resampling convolution ~5x slower) and only the kept audio.
    """
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.dim() != 1:
        raise ValueError(f"audio_to_logmel expects a mono waveform [T], got shape {tuple(wave.shape)}")
    if sr != spec.sample_rate:
        span = math.ceil(spec.clip_samples * sr / spec.sample_rate)
        wave = crop_or_pad(wave, span, train=train, generator=generator)  # [span] at sr
        wave = resample(wave, sr, spec.sample_rate)  # [>= clip_samples] at spec.sample_rate
        wave = crop_or_pad(wave, spec.clip_samples, train=False)  # drops the rounding sample, if any
    else:
        wave = crop_or_pad(wave, spec.clip_samples, train=train, generator=generator)  # [clip_samples]
    mel_fn = _mel(spec.sample_rate, spec.n_fft, spec.hop_length, spec.n_mels)
    with torch.no_grad():
        mel = mel_fn(wave)  # [M, F]
    logmel = (torch.log(mel + _LOG_EPS) - spec.mean) / (2 * spec.std)
    assert logmel.shape == (spec.n_mels, spec.n_frames), (tuple(logmel.shape), spec)
    return logmel  # [n_mels, n_frames]
