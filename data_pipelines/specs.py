"""What each modality looks like once decoded: the contract between shards and the towers.

mmssl builds these from its own config and hands them to the stream; nothing here knows about models.
"""

from dataclasses import dataclass


@dataclass(kw_only=True)
class ImageSpec:
    """Images come out as float32 [3, size, size], normalised by mean/std per channel."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"ImageSpec.size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageSpec.mean and .std need 3 values each, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"ImageSpec.std must be positive, got {self.std}")


@dataclass(kw_only=True)
class AudioSpec:
    """Audio comes out as a normalised log-mel spectrogram, float32 [n_mels, n_frames].

    Every clip is resampled to `sample_rate`, cropped or right-padded to `clip_samples`, turned into a
    power mel spectrogram (centred frames) and normalised AudioMAE-style: (log(mel) - mean) / (2 * std).
    """

    sample_rate: int
    clip_samples: int
    n_fft: int
    hop_length: int
    n_mels: int
    mean: float = -4.0
    std: float = 4.0

    def __post_init__(self) -> None:
        for name in ("sample_rate", "clip_samples", "n_fft", "hop_length", "n_mels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AudioSpec.{name} must be positive, got {getattr(self, name)}")
        if self.std <= 0:
            raise ValueError(f"AudioSpec.std must be positive, got {self.std}")

    @property
    def n_frames(self) -> int:
        """Frames of a centred STFT over exactly `clip_samples` samples."""
        return self.clip_samples // self.hop_length + 1
