"""Named runs. Each preset is a function returning a whole :class:`RunConfig`; bigger ones derive from
smaller ones and change only what differs. ``tiny`` trains on CPU in seconds (tests, the demo),
``small`` in minutes (CPU benchmarks); ``base`` and ``large`` are GPU-scale (ViT-B/16 and ViT-L/14 class).
"""

from __future__ import annotations

from collections.abc import Callable

from mmssl.config import (
    AudioTowerConfig,
    ImageTowerConfig,
    ModelConfig,
    RunConfig,
    TextTowerConfig,
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


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "small": small, "base": base, "large": large}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
