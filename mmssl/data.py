"""What mmssl hands to ``data_pipelines``: the tensor specs its towers expect and a tokenizer.

The pipeline itself is built in ``data_pipelines.stream``; this module only translates the run
config, so that the towers' input contract (image size, mel settings, context length) has one source.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from open_clip.tokenizer import SimpleTokenizer

from data_pipelines import AudioSpec, ImageSpec, StreamConfig, build_loader, expand_shards
from mmssl.config import RunConfig


def tokenizer(cfg: RunConfig) -> SimpleTokenizer | None:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: nothing is downloaded)."""
    text = cfg.model.text
    return SimpleTokenizer(context_length=text.context_length) if text is not None else None


def stream_config(
    cfg: RunConfig,
    *,
    train: bool,
    shards: str | None = None,
    batch_size: int | None = None,
    seed_offset: int = 0,
) -> StreamConfig:
    m = cfg.model
    image = None
    if m.image is not None:
        image = ImageSpec(size=m.image.image_size)
    audio = None
    if m.audio is not None:
        a = m.audio
        audio = AudioSpec(
            sample_rate=a.sample_rate,
            clip_samples=a.clip_samples,
            n_fft=a.n_fft,
            hop_length=a.hop_length,
            n_mels=a.n_mels,
        )
    return StreamConfig(
        shards=shards or (cfg.data.train_shards if train else cfg.data.eval_shards),
        batch_size=batch_size or (cfg.optim.micro_batch_size if train else cfg.eval.batch_size),
        train=train,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed + seed_offset,
        image=image,
        audio=audio,
        text=m.text is not None,
    )


def check_shards(cfg: RunConfig) -> None:
    """Fail before any worker starts when a shard path names nothing."""
    for field in ("train_shards", "eval_shards"):
        spec = getattr(cfg.data, field)
        if spec:
            try:
                expand_shards(spec)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"data.{field}: {e}") from None


def loader(
    cfg: RunConfig, *, train: bool, rank: int = 0, world_size: int = 1, **kwargs: Any
) -> Iterable[dict]:
    return build_loader(
        stream_config(cfg, train=train, **kwargs), tokenizer=tokenizer(cfg), rank=rank, world_size=world_size
    )
