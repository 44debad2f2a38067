"""What mmssl hands to ``data_pipelines``: the tensor specs its towers expect and a tokenizer.

The pipeline itself is built in ``data_pipelines.stream``; this module only translates the run
config, so that the towers' input contract (image size, mel settings, context length) has one source.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from data_pipelines import (
    AudioAugment,
    AudioSpec,
    ImageSpec,
    StreamConfig,
    StreamLoader,
    build_loader,
    check_layout,
)
from mmssl.config import RunConfig
from mmssl.objectives.masked_text import selection_slots
from mmssl.tokenizer import ClipTokenizer, HFTokenizer


def tokenizer(cfg: RunConfig) -> ClipTokenizer | HFTokenizer | None:
    """open_clip's BPE tokenizer, same output, faster (its vocabulary ships in the wheel: nothing is
    downloaded); for a Hugging Face text tower, its model directory's own tokenizer."""
    text = cfg.model.text
    if text is None:
        return None
    if text.kind == "hf":
        return HFTokenizer(text.hf_path, text.context_length)
    return ClipTokenizer(context_length=text.context_length)


def trims_text(cfg: RunConfig) -> bool:
    """Whether text batches are cut after their longest caption (``data.trim_text``): only when the
    tokenizer pads with id 0, which is what the loader's trimming takes for padding."""
    text = cfg.model.text
    if not cfg.data.trim_text or text is None:
        return False
    return text.kind == "native" or HFTokenizer(text.hf_path, text.context_length).pad_token_id == 0


def stream_config(
    cfg: RunConfig,
    *,
    train: bool,
    shards: str | None = None,
    layout: str | None = None,
    batch_size: int | None = None,
) -> StreamConfig:
    """The stream of the run's training data (or of ``shards``), or with ``train=False`` of its
    evaluation data (or of ``shards``) read with ``data.eval_layout`` (which follows the training
    layout unless set); ``layout`` overrides either."""
    m, d = cfg.model, cfg.data
    # a fine-tuning run reads only its tower's modality (and the labels)
    wanted = (cfg.finetune.tower,) if cfg.finetune is not None else ("image", "text", "audio")
    audio = None
    if m.audio is not None and "audio" in wanted:
        a = m.audio
        augment = d.audio_augment
        audio = AudioSpec(
            sample_rate=a.sample_rate,
            clip_samples=a.clip_samples,
            n_fft=a.n_fft,
            hop_length=a.hop_length,
            n_mels=a.n_mels,
            augment=augment if augment != AudioAugment() else None,  # off: no random draws at all
        )
    image = None
    if m.image is not None and "image" in wanted:
        augment = d.image_augment
        image = ImageSpec(size=m.image.image_size, augment=augment if augment.active else None)
    if shards or not train:
        where = {
            "shards": shards or d.eval_shards,
            "layout": layout or (d.layout if train else d.eval_layout_name()),
        }
    elif d.sources:
        where = {"sources": tuple(dataclasses.asdict(s) for s in d.sources)}
    else:
        where = {"shards": d.train_shards, "layout": d.layout}
    return StreamConfig(
        **where,
        batch_size=batch_size or (cfg.optim.micro_batch_size if train else cfg.eval.batch_size),
        train=train,
        num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer,
        shards_per_round=d.shards_per_round,
        retries=d.retries,
        seed=cfg.train.seed,
        image=image,
        audio=audio,
        text=m.text is not None and "text" in wanted,
        pin_memory=torch.cuda.is_available(),
        trim_text=min_text_tokens(cfg) if trims_text(cfg) else None,
        # a second augmented view for view objectives (text's second view is a dropout pass, not data)
        views=tuple(v for v in cfg.objectives.views.enabled() if v != "text") if train else (),
    )


def min_text_tokens(cfg: RunConfig) -> int:
    """The shortest a trimmed text batch may be: start and end tokens, and room for every MLM slot."""
    o = cfg.objectives.masked_text
    return 2 + (selection_slots(cfg.model.text.context_length, o.select_prob) if o.enabled else 0)


def check_shards(cfg: RunConfig) -> None:
    """Fail before any worker starts when a shard path names nothing or a layout matches no file."""
    checks = [("data.train_shards" if cfg.data.train_shards else "data.sources", True)]
    if cfg.data.eval_shards and cfg.train.eval_at_end:  # training reads them only to evaluate at the end
        cfg.data.eval_layout_name()  # raises naming data.eval_layout when it has no default
        checks.append(("data.eval_shards", False))
    for field, train in checks:
        try:
            check_layout(stream_config(cfg, train=train))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{field}: {e}") from None


def loader(
    cfg: RunConfig,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    resume: dict | None = None,
    **kwargs: Any,
) -> StreamLoader:
    """A training loader (infinite; ``resume`` continues a checkpointed position) or an eval loader
    (each shard once)."""
    return build_loader(
        stream_config(cfg, train=train, **kwargs),
        tokenizer=tokenizer(cfg),
        rank=rank,
        world_size=world_size,
        resume=resume,
        check=False,  # check_shards() ran before the workers started
    )
