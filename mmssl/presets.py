"""Named runs. Each preset is a function returning a whole :class:`RunConfig`; bigger ones derive from
smaller ones and change only what differs. ``tiny`` trains on CPU in seconds (tests, the demo),
``small`` in minutes (CPU benchmarks); ``base`` and ``large`` are GPU-scale (ViT-B/16 and ViT-L/14 class).
Each has a ``*_masked`` twin with every masked objective on besides the contrastive one; ``tiny`` and
``small`` have a ``*_siglip`` twin training every pair with the sigmoid loss instead of InfoNCE, a
``*_distill`` twin (``*_masked`` plus self-distillation from an EMA teacher), a ``*_timm`` twin with
timm ViTs as image and audio towers (the same sizes) and a ``*_hf`` twin with a local Hugging Face
text encoder (``model.text.hf_path=DIR``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mmssl.config import (
    AudioTowerConfig,
    ImageTowerConfig,
    ModelConfig,
    RunConfig,
    TextTowerConfig,
    TimmKwargs,
)

DEMO_DATA = "data/demo"


def tiny() -> RunConfig:
    cfg = RunConfig(preset="tiny", run_dir="runs/tiny")
    cfg.model = ModelConfig(
        embed_dim=64,
        image=ImageTowerConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2),
        text=TextTowerConfig(context_length=16, width=64, depth=2, heads=2),
        audio=AudioTowerConfig(
            n_mels=32, clip_seconds=2.0, patch_freq=16, patch_time=16, width=64, depth=2, heads=2
        ),
    )
    cfg.data.train_shards = f"{DEMO_DATA}/train"
    cfg.data.eval_shards = f"{DEMO_DATA}/test"
    cfg.optim.micro_batch_size = 32
    cfg.optim.lr = 2e-3
    cfg.optim.warmup_steps = 30
    cfg.train.steps = 300
    cfg.train.log_every = 10
    cfg.train.ckpt_every = 100
    return cfg


def small() -> RunConfig:
    cfg = tiny()
    cfg.preset, cfg.run_dir = "small", "runs/small"
    cfg.model = ModelConfig(
        embed_dim=128,
        image=ImageTowerConfig(image_size=32, patch_size=4, width=192, depth=4, heads=3),
        text=TextTowerConfig(context_length=16, width=192, depth=4, heads=3),
        audio=AudioTowerConfig(
            n_mels=64, clip_seconds=2.0, patch_freq=16, patch_time=16, width=192, depth=4, heads=3
        ),
    )
    cfg.optim.micro_batch_size = 64
    cfg.optim.lr = 1e-3
    cfg.train.steps = 1000
    cfg.train.ckpt_every = 500
    return cfg


def base() -> RunConfig:
    cfg = small()
    cfg.preset, cfg.run_dir = "base", "runs/base"
    cfg.model = ModelConfig(
        embed_dim=512,
        image=ImageTowerConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12),
        text=TextTowerConfig(context_length=77, width=512, depth=12, heads=8),
        audio=AudioTowerConfig(
            n_mels=128, clip_seconds=10.0, patch_freq=16, patch_time=16, width=768, depth=12, heads=12
        ),
    )
    cfg.data.train_shards = cfg.data.eval_shards = ""  # GPU runs name their own data
    cfg.data.num_workers = 8
    cfg.data.shuffle_buffer = 10000
    cfg.optim.micro_batch_size = 256
    cfg.optim.lr = 5e-4
    cfg.optim.warmup_steps = 2000
    cfg.optim.weight_decay = 0.2
    cfg.train.steps = 100_000
    cfg.train.log_every = 50
    cfg.train.ckpt_every = 2000
    return cfg


def large() -> RunConfig:
    cfg = base()
    cfg.preset, cfg.run_dir = "large", "runs/large"
    cfg.model = ModelConfig(
        embed_dim=768,
        image=ImageTowerConfig(image_size=224, patch_size=14, width=1024, depth=24, heads=16),
        text=TextTowerConfig(context_length=77, width=768, depth=12, heads=12),
        audio=AudioTowerConfig(
            n_mels=128, clip_seconds=10.0, patch_freq=16, patch_time=16, width=1024, depth=24, heads=16
        ),
    )
    cfg.optim.micro_batch_size = 128
    cfg.optim.lr = 4e-4
    return cfg


def with_masked_objectives(
    cfg: RunConfig, *, decoder_width: int, decoder_depth: int, decoder_heads: int
) -> RunConfig:
    """Turn on MAE (image), MLM (text, so the text tower becomes bidirectional) and AudioMAE (audio)."""
    o = cfg.objectives
    for masked in (o.masked_image, o.masked_audio):
        masked.enabled = True
        masked.decoder_width, masked.decoder_depth, masked.decoder_heads = (
            decoder_width,
            decoder_depth,
            decoder_heads,
        )
    o.masked_text.enabled = True
    cfg.model.text.causal = False
    cfg.preset += "_masked"
    cfg.run_dir += "_masked"
    return cfg


def tiny_masked() -> RunConfig:
    return with_masked_objectives(tiny(), decoder_width=64, decoder_depth=1, decoder_heads=2)


def small_masked() -> RunConfig:
    return with_masked_objectives(small(), decoder_width=128, decoder_depth=2, decoder_heads=4)


def base_masked() -> RunConfig:
    return with_masked_objectives(base(), decoder_width=512, decoder_depth=4, decoder_heads=16)


def large_masked() -> RunConfig:
    return with_masked_objectives(large(), decoder_width=512, decoder_depth=8, decoder_heads=16)


def with_siglip(cfg: RunConfig) -> RunConfig:
    """Every pair trained with SigLIP's sigmoid loss instead of InfoNCE (``objectives.contrastive.kind``)."""
    cfg.objectives.contrastive.kind = "siglip"
    cfg.preset += "_siglip"
    cfg.run_dir += "_siglip"
    return cfg


def tiny_siglip() -> RunConfig:
    return with_siglip(tiny())


def small_siglip() -> RunConfig:
    return with_siglip(small())


def with_timm_towers(cfg: RunConfig, name: str, kwargs: TimmKwargs) -> RunConfig:
    """Image and audio towers from timm (the ``towers`` extra): the ViT ``name`` with ``kwargs`` for the
    image, and as an AST-style spectrogram ViT (one channel, the native patches) for the audio. The
    native towers' patch sizes carry over."""
    m = cfg.model
    m.image = ImageTowerConfig(
        kind="timm", timm_name=name, timm_kwargs={**kwargs, "patch_size": m.image.patch_size},
        image_size=m.image.image_size,
    )  # fmt: skip
    m.audio = dataclasses.replace(m.audio, kind="timm", timm_name=name, timm_kwargs=dict(kwargs))
    cfg.preset += "_timm"
    cfg.run_dir += "_timm"
    return cfg


def with_hf_text(cfg: RunConfig) -> RunConfig:
    """A Hugging Face text tower (the ``towers`` extra), pooled at its first token. Its model directory
    is the user's: ``model.text.hf_path=DIR`` (a run refuses to start without it)."""
    cfg.model.text = TextTowerConfig(kind="hf", context_length=cfg.model.text.context_length, pooler="cls")
    cfg.preset += "_hf"
    cfg.run_dir += "_hf"
    return cfg


def tiny_timm() -> RunConfig:
    return with_timm_towers(tiny(), "vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 2})


def small_timm() -> RunConfig:
    return with_timm_towers(small(), "vit_tiny_patch16_224", {"embed_dim": 192, "depth": 4, "num_heads": 3})


def tiny_hf() -> RunConfig:
    return with_hf_text(tiny())


def small_hf() -> RunConfig:
    return with_hf_text(small())


def with_distillation(cfg: RunConfig, *, name: str, top_k: int) -> RunConfig:
    """A ``*_masked`` run plus self-distillation from an EMA teacher on every masked tower (data2vec 2.0
    targets from the teacher's last ``top_k`` blocks; ``objectives.distill``)."""
    d = cfg.objectives.distill
    d.enabled, d.top_k = True, top_k
    masked = cfg.objectives.masked_image
    d.decoder_width, d.decoder_depth, d.decoder_heads = masked.decoder_width, 1, masked.decoder_heads
    d.collapse_warmup_steps = cfg.train.steps // 3
    cfg.preset, cfg.run_dir = name, f"runs/{name}"
    return cfg


def tiny_distill() -> RunConfig:
    return with_distillation(tiny_masked(), name="tiny_distill", top_k=2)


def small_distill() -> RunConfig:
    return with_distillation(small_masked(), name="small_distill", top_k=3)


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "tiny": tiny,
    "small": small,
    "base": base,
    "large": large,
    "tiny_masked": tiny_masked,
    "small_masked": small_masked,
    "base_masked": base_masked,
    "large_masked": large_masked,
    "tiny_siglip": tiny_siglip,
    "small_siglip": small_siglip,
    "tiny_timm": tiny_timm,
    "small_timm": small_timm,
    "tiny_hf": tiny_hf,
    "small_hf": small_hf,
    "tiny_distill": tiny_distill,
    "small_distill": small_distill,
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
