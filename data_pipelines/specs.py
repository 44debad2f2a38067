"""What each modality looks like once decoded: the contract between shards and the towers.

mmssl builds these from its own config and hands them to the stream; nothing here knows about models.
"""

from dataclasses import dataclass


@dataclass(kw_only=True)
class ImageAugment:
    """Training-time image augmentation, open_clip's recipe; every draw comes from the sample's seeded
    generator, so a resumed stream repeats it exactly. Evaluation never augments (it takes the centred
    square of each image, as open_clip's resize-and-centre-crop does).

    crop          RandomResizedCrop (torchvision's draw): a box of `scale` times the image's area and
                  aspect ratio in `ratio` (log-uniform), resized to the output with bicubic. open_clip's
                  default scale (0.9, 1.0) cuts at most ~5% off each side; ImageNet's (0.08, 1.0) would
                  cut whole strokes off small digits and text
    flip          probability of a horizontal flip (off: it reverses text and turns digits into others)
    color_jitter  (brightness, contrast, saturation, hue) as torchvision's ColorJitter on the image: each
                  factor uniform in [1 - x, 1 + x] (hue: a shift in [-x, x] turns), in a random order
    """

    crop: bool = True
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"ImageAugment.scale must be a range within (0, 1], got {self.scale}")
        lo, hi = self.ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"ImageAugment.ratio must be a positive range (lo <= hi), got {self.ratio}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"ImageAugment.flip is a probability in [0, 1], got {self.flip}")
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ValueError(
                "ImageAugment.color_jitter needs 4 values >= 0 (brightness, contrast, saturation, hue <= 0.5), "
                f"got {self.color_jitter}"
            )

    @property
    def active(self) -> bool:
        """Whether it changes anything (when not, decoding draws nothing from the generator)."""
        return self.crop or self.flip > 0 or any(self.color_jitter)


@dataclass(kw_only=True)
class ImageSpec:
    """Images come out as float32 [3, size, size], normalised by mean/std per channel."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: ImageAugment | None = None  # training only

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"ImageSpec.size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageSpec.mean and .std need 3 values each, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"ImageSpec.std must be positive, got {self.std}")


@dataclass(kw_only=True)
class AudioAugment:
    """Training-time audio augmentation; every draw comes from the sample's seeded generator, so a
    resumed stream repeats it exactly. Evaluation never augments.

    speed         play each clip at a random speed in [lo, hi] (tempo and pitch together, as in Kaldi's
                  speed perturbation): a cheap stand-in for unseen speakers' voices
    shift         place a clip shorter than the window at a random offset instead of at the start
    gain_db       random gain, uniform in +-gain_db decibels
    freq_masks / freq_mask_width, time_masks / time_mask_width
                  SpecAugment: that many bands of up to that many mel bins / frames set to 0 (the
                  normalised mean), with torchaudio's mask_along_axis
    """

    speed: tuple[float, float] = (1.0, 1.0)
    shift: bool = False
    gain_db: float = 0.0
    freq_masks: int = 0
    freq_mask_width: int = 0
    time_masks: int = 0
    time_mask_width: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.speed
        if not 0.5 <= lo <= hi <= 2.0:
            raise ValueError(f"AudioAugment.speed must be a range within [0.5, 2.0], got {self.speed}")
        for name in ("gain_db", "freq_masks", "freq_mask_width", "time_masks", "time_mask_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"AudioAugment.{name} must be >= 0, got {getattr(self, name)}")


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
    augment: AudioAugment | None = None  # training only

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
