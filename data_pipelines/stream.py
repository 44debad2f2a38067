"""The WebDataset pipeline: shard list -> samples -> decoded tensors -> batches, as an explicit list of stages.

This is the only module that assembles a webdataset pipeline. Train mode reads resampled shards
forever (use `.with_epoch(n)` on the loader to bound an epoch); eval mode reads each shard once, in order.

Seeds: every random choice (shard draws, shuffle buffer, audio crops) is seeded from
(cfg.seed, rank, worker, epoch), so two ranks or two workers never draw the same sequence and a run is
reproducible from cfg.seed alone. webdataset's own defaults are not: ResampledShards mixes in the pid,
the clock and os.urandom unless deterministic=True, and its shuffle seeds from the pid and clock.
"""

import functools
import glob
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds

from data_pipelines.collate import collate
from data_pipelines.specs import AudioSpec, ImageSpec
from data_pipelines.transforms import (
    Tokenizer,
    audio_to_logmel,
    decode_audio,
    decode_image,
    decode_text,
    tokenize,
)

_GLOB_CHARS = frozenset("*?[")


@dataclass(kw_only=True)
class StreamConfig:
    """One stream of shards for one rank. Modalities left as None (or text=False) are not loaded."""

    shards: str  # brace pattern, glob, directory of *.tar, or a comma-separated list of these
    batch_size: int  # per rank
    train: bool = True  # resampled shards + shuffle + random crops; False: each shard once, in order
    num_workers: int = 1
    shuffle_buffer: int = 1000
    seed: int = 0
    image: ImageSpec | None = None
    audio: AudioSpec | None = None
    text: bool = True
    image_keys: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
    audio_keys: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")
    text_keys: tuple[str, ...] = ("txt",)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"StreamConfig.batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"StreamConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"StreamConfig.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.seed < 0:
            raise ValueError(f"StreamConfig.seed must be >= 0, got {self.seed}")
        if self.image is None and self.audio is None and not self.text:
            raise ValueError("StreamConfig loads no modality: set image, audio or text")

    def modality_keys(self) -> dict[str, tuple[str, ...]]:
        """Configured modality -> the file extensions that may hold it (first match wins)."""
        keys = {"image": self.image_keys, "text": self.text_keys, "audio": self.audio_keys}
        wanted = {"image": self.image is not None, "text": self.text, "audio": self.audio is not None}
        return {m: tuple(k.lower().lstrip(".") for k in keys[m]) for m in keys if wanted[m]}


# ---------------------------------------------------------------------------------------------- shards


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside braces, so "a-{0,1}.tar,b/*.tar" gives two parts."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_shards(spec: str) -> list[str]:
    """Resolve a shard spec to an explicit list of existing local .tar paths, in order.

    Forms (combinable with commas): "dir/shard-{000000..000003}.tar" (every expansion must exist),
    "dir/*.tar" (sorted glob, must match), "dir" (its *.tar, sorted, must have some), "dir/x.tar".
    """
    parts = _split_top_level(spec)
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}")
    urls: list[str] = []
    for part in parts:
        try:
            paths = list(braceexpand.braceexpand(os.path.expanduser(part)))
        except braceexpand.UnbalancedBracesError as exn:
            raise ValueError(f"unbalanced braces in shard spec {spec!r}") from exn
        for path in paths:
            if _GLOB_CHARS & set(path):
                matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
                if not matches:
                    raise FileNotFoundError(f"no shard file matches {path!r} (from shard spec {spec!r})")
                urls.extend(matches)
            elif os.path.isdir(path):
                matches = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not matches:
                    raise FileNotFoundError(
                        f"no *.tar shard in directory {path!r} (from shard spec {spec!r})"
                    )
                urls.extend(matches)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise FileNotFoundError(f"shard {path!r} does not exist (from shard spec {spec!r})")
    return urls


# ----------------------------------------------------------------------------------------------- seeds


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _mix(*parts: int) -> int:
    """Well-mixed 32-bit seed from non-negative ints (unlike sums, (1, 0) and (0, 1) do not collide)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# Distinct streams of randomness per purpose.
_SHARDS, _SHUFFLE, _CROP = 1, 2, 3


@dataclass
class _WorkerSeed:
    """ResampledShards' worker_seed: called inside each loader worker, so it sees that worker's id."""

    seed: int
    rank: int

    def __call__(self) -> int:
        return _mix(self.seed, self.rank, _worker()[0], _SHARDS)


class _Shuffle:
    """Sample-level shuffle buffer with an rng seeded per (seed, rank, worker, epoch)."""

    def __init__(self, bufsize: int, seed: int, rank: int) -> None:
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, -1

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = random.Random(_mix(self.seed, self.rank, _worker()[0], self.epoch, _SHUFFLE))
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


# ---------------------------------------------------------------------------------------------- decode


def has_modality(sample: Mapping[str, Any], keys: Mapping[str, tuple[str, ...]]) -> bool:
    """False for samples holding none of the configured modalities (e.g. the end-of-shard marker)."""
    return any(k in sample for exts in keys.values() for k in exts)


def _first(sample: Mapping[str, Any], exts: tuple[str, ...]) -> bytes | None:
    return next((sample[k] for k in exts if k in sample), None)


def _label(sample: Mapping[str, Any]) -> int:
    if "json" not in sample:
        return -1
    meta = json.loads(sample["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json must be an object, got {type(meta).__name__}")
    return -1 if meta.get("label") is None else int(meta["label"])


def decode_sample(
    sample: Mapping[str, Any],
    cfg: StreamConfig,
    *,
    tokenizer: Tokenizer | None,
    generator: torch.Generator | None,
) -> dict[str, Any]:
    """Raw sample (extension -> bytes) -> {"__key__", "label", modality: tensor or None (missing)}.

    Any failure is raised as one ValueError naming the shard and the sample key.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    keys = cfg.modality_keys()
    try:
        out: dict[str, Any] = {"__key__": key, "label": _label(sample)}
        if "image" in keys:
            data = _first(sample, keys["image"])
            out["image"] = None if data is None else decode_image(data, cfg.image, cfg.train)  # [3, S, S]
        if "text" in keys:
            data = _first(sample, keys["text"])
            out["text"] = None if data is None else tokenize(decode_text(data), tokenizer)  # [L]
        if "audio" in keys:
            data = _first(sample, keys["audio"])
            if data is None:
                out["audio"] = None
            else:
                wave, sr = decode_audio(data)  # [T]
                out["audio"] = audio_to_logmel(wave, sr, cfg.audio, cfg.train, generator)  # [M, F]
    except Exception as exn:
        reason = f"{type(exn).__name__}: {exn}".replace("\n", " ")
        raise ValueError(f"cannot decode sample {key!r} of shard {url}: {reason}") from exn
    return out


class _Decode:
    """Pipeline stage around decode_sample; owns the per-worker generator for random crops."""

    def __init__(self, cfg: StreamConfig, tokenizer: Tokenizer | None, rank: int) -> None:
        self.cfg, self.tokenizer, self.rank, self.epoch = cfg, tokenizer, rank, -1

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        self.epoch += 1
        generator = None
        if self.cfg.train:
            seed = _mix(self.cfg.seed, self.rank, _worker()[0], self.epoch, _CROP)
            generator = torch.Generator().manual_seed(seed)
        for sample in src:
            yield decode_sample(sample, self.cfg, tokenizer=self.tokenizer, generator=generator)


def _templates(cfg: StreamConfig, tokenizer: Tokenizer | None) -> dict[str, torch.Tensor]:
    """Per-sample zero tensors, used by collate when a whole batch lacks a modality."""
    templates = {}
    if cfg.image is not None:
        templates["image"] = torch.zeros(3, cfg.image.size, cfg.image.size)
    if cfg.text and tokenizer is not None:
        templates["text"] = torch.zeros_like(tokenize("", tokenizer))
    if cfg.audio is not None:
        templates["audio"] = torch.zeros(cfg.audio.n_mels, cfg.audio.n_frames)
    return templates


# ---------------------------------------------------------------------------------------------- loader


def build_loader(
    cfg: StreamConfig,
    *,
    tokenizer: Tokenizer | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> wds.WebLoader:
    """Batches of collate()'s format for one rank. Train mode never ends; eval mode reads its shards once.

    Eval with world_size > 1 gives rank r the shards r, r + world_size, ... (no process group needed),
    so ranks may see different sample counts; with several workers each worker ends on its own
    partial batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if cfg.text and tokenizer is None:
        raise ValueError("StreamConfig.text is True but no tokenizer was given to build_loader")
    urls = expand_shards(cfg.shards)
    keys = cfg.modality_keys()

    if cfg.train:
        # Resampled shards need no node/worker split: each (rank, worker) draws its own sequence.
        shard_stages: list[Any] = [
            wds.ResampledShards(
                urls, seed=cfg.seed, worker_seed=_WorkerSeed(cfg.seed, rank), deterministic=True
            )
        ]
    else:
        mine = urls[rank::world_size]
        if not mine:
            raise ValueError(f"rank {rank} of {world_size} gets no shard: {cfg.shards!r} has {len(urls)}")
        shard_stages = [wds.SimpleShardList(mine), wds.split_by_worker]

    stages: list[Callable | Any] = [
        *shard_stages,
        wds.tarfile_to_samples(),  # {"__key__", "__url__", ext: bytes}
        wds.select(functools.partial(has_modality, keys=keys)),
    ]
    if cfg.train and cfg.shuffle_buffer > 1:
        stages.append(_Shuffle(cfg.shuffle_buffer, cfg.seed, rank))
    stages += [
        _Decode(cfg, tokenizer, rank),
        wds.batched(
            cfg.batch_size,
            collation_fn=functools.partial(collate, templates=_templates(cfg, tokenizer)),
            partial=not cfg.train,
        ),
    ]
    dataset = wds.DataPipeline(*stages)
    return wds.WebLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
