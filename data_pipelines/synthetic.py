"""Synthetic samples for tests, benchmarks and smoke runs: no espeak-ng, no data set, any size, fully seeded.

Each sample's image, caption and tone all encode its label (image brightness pattern, the word in the
caption, the tone's pitch), so a model can in principle align them. Audio clips vary in length and
sample rate to exercise cropping, padding and resampling.

Besides mmssl's own layout, `img2dataset_samples` and `clap_samples` imitate the shards those tools
write (img2dataset: jpg + txt + json metadata; LAION-Audio / CLAP: flac + json with a list of captions).
"""

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import soundfile
from PIL import Image

NUM_CLASSES = 10
AUDIO_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def image_bytes(label: int, size: int, rng: np.random.Generator, fmt: str = "png") -> bytes:
    """An RGB image whose bright column's position is the label, encoded as png, jpg or webp."""
    pixels = rng.integers(0, 64, size=(size, size, 3), dtype=np.uint8)  # [H, W, C] dark noise
    band = max(1, size // NUM_CLASSES)
    pixels[:, label * band : (label + 1) * band, :] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format=IMAGE_FORMATS[fmt])
    return buffer.getvalue()


def audio_bytes(label: int, sample_rate: int, seconds: float, channels: int, fmt: str = "wav") -> bytes:
    """A tone whose pitch encodes the label, encoded as wav, flac, ogg or mp3."""
    t = np.arange(max(1, int(sample_rate * seconds)), dtype=np.float32) / sample_rate  # [T]
    tone = 0.3 * np.sin(2 * np.pi * (220.0 * 2 ** (label / 4)) * t)
    wave = np.repeat(tone[:, None], channels, axis=1)  # [T, channels]
    container, subtype = AUDIO_FORMATS[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def synthetic_samples(
    n: int,
    *,
    seed: int = 0,
    prefix: str = "syn",
    image_size: int = 16,
    sample_rates: tuple[int, ...] = (8000, 16000, 22050),
    seconds: tuple[float, float] = (0.1, 0.5),
    drop: dict[str, float] | None = None,
    audio_format: str = "wav",
    image_format: str = "png",
) -> Iterator[dict[str, Any]]:
    """n samples {"__key__", "png", "txt", "wav", "json"} ready for write_shards (other formats change
    the "png"/"wav" extensions).

    `drop` maps an extension ("png", "txt", "wav") to the fraction of samples that lack it, to test
    missing modalities; a sample never loses all three.
    """
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = int(rng.integers(NUM_CLASSES))
        rate = int(rng.choice(sample_rates))
        sample: dict[str, Any] = {
            "__key__": f"{prefix}_{i:06d}",
            image_format: image_bytes(label, image_size, rng, image_format),
            "txt": f"sample {i}: a tone of class {label}",
            audio_format: audio_bytes(label, rate, float(rng.uniform(*seconds)), 1 + i % 2, audio_format),
            "json": {"label": label, "index": i, "sample_rate": rate},
        }
        dropped = [ext for ext, fraction in (drop or {}).items() if rng.random() < fraction]
        for ext in dropped[:2]:
            del sample[{"png": image_format, "wav": audio_format}.get(ext, ext)]
        yield sample


def img2dataset_samples(
    n: int, *, seed: int = 0, prefix: str = "i2d", image_size: int = 16
) -> Iterator[dict[str, Any]]:
    """Samples laid out as img2dataset writes them: jpg + txt + json (url, size, status; no label)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = int(rng.integers(NUM_CLASSES))
        caption = f"a photo of pattern {label}"
        yield {
            "__key__": f"{prefix}{i:09d}",
            "jpg": image_bytes(label, image_size, rng, "jpg"),
            "txt": caption,
            "json": {
                "url": f"https://example.com/{i}.jpg",
                "key": f"{prefix}{i:09d}",
                "status": "success",
                "caption": caption,
                "width": image_size,
                "height": image_size,
            },
        }


def clap_samples(
    n: int, *, seed: int = 0, prefix: str = "clap", captions: int = 3, sample_rate: int = 48000
) -> Iterator[dict[str, Any]]:
    """Samples laid out as LAION-Audio-630K / CLAP shards: flac + json whose "text" is a list of captions."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = int(rng.integers(NUM_CLASSES))
        yield {
            "__key__": f"{prefix}_{i:06d}",
            "flac": audio_bytes(label, sample_rate, float(rng.uniform(0.1, 0.4)), 2, "flac"),
            "json": {
                "text": [f"caption {j} of clip {i}, a tone of class {label}" for j in range(captions)],
                "tag": [f"class {label}"],
                "original_data": {"index": i},
            },
        }
