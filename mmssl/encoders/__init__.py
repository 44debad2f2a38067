"""Tower registry: one builder per modality and kind, each from its own typed config.

``kind=native`` builds mmssl's own towers; ``kind=timm`` (image, audio) and ``kind=hf`` (text) build
towers around timm and Hugging Face models (the ``towers`` extra, imported only then).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmssl.config import AudioTowerConfig, ImageTowerConfig, RunConfig, TextTowerConfig
from mmssl.encoders.audio import AudioTower
from mmssl.encoders.common import PatchTransformer
from mmssl.encoders.hf_text import HFTextTower, check_hf_dir
from mmssl.encoders.image import ImageTower
from mmssl.encoders.text import TextTower
from mmssl.encoders.timm_tower import TimmTower

TowerConfig = ImageTowerConfig | TextTowerConfig | AudioTowerConfig
PatchTower = PatchTransformer | TimmTower  # what the masked patch objectives work on

TOWERS: dict[tuple[type, str], type[nn.Module]] = {
    (ImageTowerConfig, "native"): ImageTower,
    (ImageTowerConfig, "timm"): TimmTower,
    (TextTowerConfig, "native"): TextTower,
    (TextTowerConfig, "hf"): HFTextTower,
    (AudioTowerConfig, "native"): AudioTower,
    (AudioTowerConfig, "timm"): TimmTower,
}


def build_encoder(cfg: TowerConfig, embed_dim: int) -> nn.Module:
    key = (type(cfg), cfg.kind)
    if key not in TOWERS:
        raise ValueError(f"no tower is registered for {type(cfg).__name__} of kind {cfg.kind!r}")
    return TOWERS[key](cfg, embed_dim)


def check_towers(cfg: RunConfig) -> dict[str, Any]:
    """What config validation cannot see without timm or transformers, checked before any rank starts:
    the packages are installed, a timm name exists and builds, a Hugging Face directory loads, a masked
    objective has a tower it can work on. Each tower is built on the meta device (no memory, no weights
    read). Returns ``{modality: tower}`` of those foreign towers; raises ValueError naming the setting."""
    towers: dict[str, Any] = {}
    for name in cfg.model.modalities:
        tower_cfg = getattr(cfg.model, name)
        if tower_cfg.kind == "native":
            continue
        if tower_cfg.kind == "hf":
            check_hf_dir(tower_cfg.hf_path)
        with torch.device("meta"):
            tower = build_encoder(tower_cfg, cfg.model.embed_dim)
        masked = cfg.objectives.masked(name)
        if masked.enabled:
            if name == "text":
                # raises when the model has none, or ties it otherwise than tie_head says
                tower.masked_lm_head(tie=masked.tie_head)
            elif not tower.token_based:
                raise ValueError(
                    f"objectives.masked_{name}: MAE needs a token-based tower; model.{name}.timm_name="
                    f"{tower_cfg.timm_name} has none (a timm VisionTransformer has)"
                )
        towers[name] = tower
    return towers


__all__ = [
    "AudioTower",
    "HFTextTower",
    "ImageTower",
    "PatchTower",
    "TextTower",
    "TimmTower",
    "TOWERS",
    "build_encoder",
    "check_towers",
]
