"""Duplicate samples, found before shards are written (``write_from_manifest(dedup=...)``).

Samples are offered in manifest order; the first of a set of duplicates is kept and each later one is
dropped for the first reason that holds:
    same_caption  the same normalised caption(s) and byte-identical media (or none): the sample again
    same_image    byte-identical image (the same picture under another caption or sound)
    same_audio    byte-identical audio
    near_image    (mode "near" only) an image whose perceptual hash is within NEAR_DISTANCE bits of a
                  kept image's: the same picture resized, recompressed or converted
A caption is normalised by casefolding, collapsing whitespace and stripping punctuation at both ends.
Samples and media are compared by SHA-256 digests, and images by imagehash's 64-bit pHash (an optional
dependency: ``pip install 'mmssl[dedup]'``), so memory grows by about a hundred bytes per kept sample.
"""

import hashlib
import io
import string
from collections import defaultdict
from typing import Any

from PIL import Image

MODES = ("exact", "near")
REASONS = ("same_caption", "same_image", "same_audio", "near_image")
NEAR_DISTANCE = 6  # of 64 pHash bits; resized or recompressed copies of a picture differ by 0-4
_HASH_BITS = 64
_ENDS = string.punctuation + string.whitespace


def check_mode(mode: str | None) -> None:
    """Raise ValueError for an unknown mode, or for "near" when imagehash is not installed."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"dedup must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "near":
        _imagehash()


def _imagehash() -> Any:
    try:
        import imagehash
    except ImportError:
        raise ValueError(
            "dedup 'near' needs the imagehash package: pip install 'mmssl[dedup]' (or pip install imagehash)"
        ) from None
    return imagehash


def normalise_caption(text: str) -> str:
    """``"  A Dog, running! "`` -> ``"a dog, running"``."""
    return " ".join(text.casefold().split()).strip(_ENDS)


def _digest(data: bytes | None) -> bytes | None:
    return None if data is None else hashlib.sha256(data).digest()


class Duplicates:
    """The kept samples' fingerprints; :meth:`check` says whether a sample repeats one of them."""

    def __init__(self, mode: str = "exact", *, near_distance: int = NEAR_DISTANCE) -> None:
        check_mode(mode)
        self.mode = mode
        self.samples: dict[bytes, str] = {}  # digest of (captions, image digest, audio digest) -> key kept
        self.images: dict[bytes, str] = {}
        self.audios: dict[bytes, str] = {}
        self.near = _NearImages(near_distance) if mode == "near" else None

    def check(
        self, key: str, *, image: bytes | None, audio: bytes | None, captions: list[str]
    ) -> dict[str, str] | None:
        """``{"reason", "of"}`` (the kept sample's key) when the sample is a duplicate; else None, and
        the sample is kept."""
        text = tuple(normalise_caption(c) for c in captions)
        image_id, audio_id = _digest(image), _digest(audio)
        whole = hashlib.sha256(repr((text, image_id, audio_id)).encode()).digest()
        phash = None
        if text and whole in self.samples:
            return {"reason": "same_caption", "of": self.samples[whole]}
        if image_id is not None and image_id in self.images:
            return {"reason": "same_image", "of": self.images[image_id]}
        if audio_id is not None and audio_id in self.audios:
            return {"reason": "same_audio", "of": self.audios[audio_id]}
        if self.near is not None and image is not None:
            phash = self.near.hash(image)
            if phash is not None and (of := self.near.find(phash)) is not None:
                return {"reason": "near_image", "of": of}
        self.samples.setdefault(whole, key)
        if image_id is not None:
            self.images[image_id] = key
            if phash is not None:
                self.near.add(phash, key)
        if audio_id is not None:
            self.audios[audio_id] = key
        return None


class _NearImages:
    """Kept images by pHash. Two hashes within ``distance`` bits agree exactly on at least one of
    ``distance + 1`` disjoint bands of bits, so only images sharing a band are compared."""

    def __init__(self, distance: int) -> None:
        self.distance = distance
        self.width = -(-_HASH_BITS // (distance + 1))  # bits per band
        self.bands: defaultdict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
        self.imagehash = _imagehash()

    def hash(self, data: bytes) -> int | None:
        """The image's 64-bit pHash, or None when it cannot be decoded."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                return int(str(self.imagehash.phash(img)), 16)
        except Exception:  # PIL raises many types for bad bytes; such an image is compared by bytes only
            return None

    def _bands(self, phash: int) -> list[tuple[int, int]]:
        mask = (1 << self.width) - 1
        return [(i, (phash >> start) & mask) for i, start in enumerate(range(0, _HASH_BITS, self.width))]

    def find(self, phash: int) -> str | None:
        for band in self._bands(phash):
            for other, key in self.bands.get(band, ()):
                if (phash ^ other).bit_count() <= self.distance:
                    return key
        return None

    def add(self, phash: int, key: str) -> None:
        for band in self._bands(phash):
            self.bands[band].append((phash, key))
