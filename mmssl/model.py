"""The multimodal model: one tower per modality, each mapping into one shared embedding space.

A plain module: no ranks, no I/O, no DeepSpeed. ``forward(batch)`` embeds every modality the batch
carries and returns L2-normalised embeddings keyed by modality.

Axis legend: B batch, E shared embedding dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.config import MODALITIES, ModelConfig
from mmssl.encoders import build_encoder


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        for name in MODALITIES:
            tower_cfg = getattr(cfg, name)
            setattr(self, name, build_encoder(tower_cfg, cfg.embed_dim) if tower_cfg is not None else None)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.cfg.modalities

    def embed(self, modality: str, x: Tensor) -> Tensor:
        """Raw input of one modality -> normalised embedding ``[B, E]``."""
        return F.normalize(getattr(self, modality)(x), dim=-1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.embed(m, batch[m]) for m in self.modalities if m in batch}  # each [B, E]
