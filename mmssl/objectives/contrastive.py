"""CLIP-style InfoNCE between every pair of modalities, with open_clip's loss.

Each pair has its own learnable temperature (stored as a log logit scale, as in CLIP). The scale is
clamped inside forward rather than after the optimizer step, so no code touches parameters outside
forward (which ZeRO-3 would require to be gathered first).

Axis legend: B batch (per rank), E embedding dim.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from mmssl.config import ContrastiveConfig


def pair_name(a: str, b: str) -> str:
    return f"{a}_{b}"


class ContrastiveObjective(nn.Module):
    def __init__(
        self, cfg: ContrastiveConfig, modalities: tuple[str, ...], *, rank: int = 0, world_size: int = 1
    ):
        super().__init__()
        self.cfg = cfg
        self.pairs = list(combinations(modalities, 2))
        init = math.log(1.0 / cfg.init_temperature)
        self.logit_scale = nn.ParameterDict(
            {pair_name(a, b): nn.Parameter(torch.tensor(init)) for a, b in self.pairs}
        )
        self.max_log_scale = math.log(cfg.max_logit_scale)
        # open_clip's loss gathers features from every rank (with gradients) before scoring
        self.loss = ClipLoss(
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def scales(self) -> dict[str, Tensor]:
        return {name: p.clamp(max=self.max_log_scale).exp() for name, p in self.logit_scale.items()}

    def forward(self, embeddings: dict[str, Tensor]) -> dict[str, Tensor]:
        """Normalised embeddings ``{modality: [B, E]}`` -> ``{"contrastive_<a>_<b>_loss": t}`` for every pair
        whose two sides are both present."""
        scales = self.scales()
        terms = {}
        for a, b in self.pairs:
            if a in embeddings and b in embeddings:
                name = pair_name(a, b)
                terms[f"contrastive_{name}_loss"] = self.loss(embeddings[a], embeddings[b], scales[name])
        return terms
