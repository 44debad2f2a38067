"""The stream's settings: where samples come from (one or several weighted sources, each with a layout),
what each modality decodes to, and how the loader runs."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data_pipelines.layouts import Layout, resolve_layout
from data_pipelines.specs import AudioSpec, ImageSpec


@dataclass(kw_only=True)
class SourceConfig:
    """One set of shards in a mix: `weight` is its share of the training samples (weights need not sum to 1)."""

    # brace pattern, glob, directory of *.tar, remote shards (pipe:, http(s)://, s3:// ...), or a
    # comma-separated list of these
    shards: str
    weight: float = 1.0
    layout: str | Layout = "mmssl"

    def __post_init__(self) -> None:
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError(f"SourceConfig.shards must name shards, got {self.shards!r}")
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"SourceConfig.weight of {self.shards!r} must be > 0, got {self.weight!r}")
        self.layout = resolve_layout(self.layout)


def _source(item: Any) -> SourceConfig:
    if isinstance(item, SourceConfig):
        return item
    if isinstance(item, Mapping):
        return SourceConfig(**item)
    if isinstance(item, Sequence) and not isinstance(item, str) and 1 <= len(item) <= 3:
        return SourceConfig(**dict(zip(("shards", "weight", "layout"), item, strict=False)))
    raise ValueError(f"a source is a SourceConfig, a mapping or (shards, weight, layout), got {item!r}")


@dataclass(kw_only=True)
class StreamConfig:
    """One stream of batches for one rank. Modalities left as None (or text=False) are not loaded.

    Samples come from `shards` read with `layout`, or from `sources`: several (shards, weight, layout)
    mixed sample by sample with the given weights in training, read one after another in evaluation.

    Training reads each source in rounds of `shards_per_round` shards drawn at random (with
    replacement) through a shuffle buffer of `shuffle_buffer` samples that empties at the end of each
    round; resuming re-reads the tar headers (not the contents) of at most one round per source and worker.
    """

    batch_size: int  # per rank
    shards: str = ""
    layout: str | Layout = "mmssl"
    sources: Sequence[SourceConfig | Mapping[str, Any] | tuple] = ()
    train: bool = True  # resampled shards + shuffle + random crops; False: each shard once, in order
    num_workers: int = 1
    shuffle_buffer: int = 1000
    shards_per_round: int = 4
    seed: int = 0
    image: ImageSpec | None = None
    audio: AudioSpec | None = None
    text: bool = True
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies
    # cut text batches after their longest caption, but not below this many tokens (None: keep L)
    trim_text: int | None = None
    # training only: modalities ("image", "audio") that also get a second view, "<modality>_view": the
    # same bytes decoded and augmented again with the sample's generator (for view objectives)
    views: tuple[str, ...] = ()
    max_bad_in_a_row: int = 1000  # a worker stops with an error after this many bad samples in a row
    retries: int = 3  # a remote shard's stream that fails mid-way is retried this often, then counted as bad

    def __post_init__(self) -> None:
        for name in ("batch_size", "shards_per_round", "max_bad_in_a_row"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StreamConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer", "seed", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"StreamConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.image is None and self.audio is None and not self.text:
            raise ValueError("StreamConfig loads no modality: set image, audio or text")
        if bool(self.shards) == bool(self.sources):
            raise ValueError("StreamConfig needs exactly one of `shards` (one source) or `sources` (a mix)")
        self.layout = resolve_layout(self.layout)
        self.sources = tuple(_source(s) for s in self.sources)
        configured = self.modalities()
        self.views = tuple(self.views)
        for modality in self.views:
            if modality not in ("image", "audio") or modality not in configured:
                raise ValueError(
                    f"StreamConfig.views: {modality!r} is not an image or audio modality this stream loads"
                )
        for i, source in enumerate(self.source_list()):
            if not any(source.layout.entries(m) for m in configured):
                raise ValueError(
                    f"source {i} ({source.shards!r}): layout {source.layout.describe()} feeds none of the "
                    f"configured modalities {configured}"
                )

    def source_list(self) -> list[SourceConfig]:
        """The sources, with the single-`shards` form as one source of weight 1."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(shards=self.shards, weight=1.0, layout=self.layout)]

    def modalities(self) -> tuple[str, ...]:
        wanted = {"image": self.image is not None, "text": self.text, "audio": self.audio is not None}
        return tuple(m for m in ("image", "text", "audio") if wanted[m])
