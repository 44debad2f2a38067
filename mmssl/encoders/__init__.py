"""Tower registry: one builder per modality, each from its own typed config."""

from __future__ import annotations

from torch import nn

from mmssl.config import AudioTowerConfig, ImageTowerConfig, TextTowerConfig
from mmssl.encoders.audio import AudioTower
from mmssl.encoders.image import ImageTower
from mmssl.encoders.text import TextTower

TOWERS: dict[type, type[nn.Module]] = {
    ImageTowerConfig: ImageTower,
    TextTowerConfig: TextTower,
    AudioTowerConfig: AudioTower,
}


def build_encoder(cfg: ImageTowerConfig | TextTowerConfig | AudioTowerConfig, embed_dim: int) -> nn.Module:
    if type(cfg) not in TOWERS:
        raise ValueError(f"no tower is registered for config type {type(cfg).__name__}")
    return TOWERS[type(cfg)](cfg, embed_dim)


__all__ = ["AudioTower", "ImageTower", "TextTower", "TOWERS", "build_encoder"]
