"""Synthetic samples for tests and smoke runs: no espeak-ng, no data set, any size, fully seeded.

Each sample's image, caption and tone all encode its label (image brightness pattern, the word in the
caption, the tone's pitch), so a model can in principle align them. Audio clips vary in length and
sample rate to exercise cropping, padding and resampling.
"""

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import soundfile
from PIL import Image

NUM_CLASSES = 10


def _png(label: int, size: int, rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 64, size=(size, size, 3), dtype=np.uint8)  # [H, W, C] dark noise
    band = max(1, size // NUM_CLASSES)
    pixels[:, label * band : (label + 1) * band, :] = 255  # a bright column whose position is the label
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _wav(label: int, sample_rate: int, seconds: float, channels: int) -> bytes:
    t = np.arange(int(sample_rate * seconds), dtype=np.float32) / sample_rate  # [T]
    tone = 0.3 * np.sin(2 * np.pi * (220.0 * 2 ** (label / 4)) * t)  # pitch encodes the label
    wave = np.repeat(tone[:, None], channels, axis=1)  # [T, channels]
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
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
) -> Iterator[dict[str, Any]]:
    """n samples {"__key__", "png", "txt", "wav", "json"} ready for write_shards.

    `drop` maps an extension ("png", "txt", "wav") to the fraction of samples that lack it, to test
    missing modalities; a sample never loses all three.
    """
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = int(rng.integers(NUM_CLASSES))
        rate = int(rng.choice(sample_rates))
        sample: dict[str, Any] = {
            "__key__": f"{prefix}_{i:06d}",
            "png": _png(label, image_size, rng),
            "txt": f"sample {i}: a tone of class {label}",
            "wav": _wav(label, rate, float(rng.uniform(*seconds)), channels=1 + i % 2),
            "json": {"label": label, "index": i, "sample_rate": rate},
        }
        dropped = [ext for ext, fraction in (drop or {}).items() if rng.random() < fraction]
        for ext in dropped[:2]:
            del sample[ext]
        yield sample
