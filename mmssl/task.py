"""The training task: model + objectives -> ``{"loss", every named term, metrics}``.

This is the module DeepSpeed wraps. Terms are weighted and summed here, and every term is returned
unweighted too, so a weight never hides a term from the logs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.config import RunConfig
from mmssl.model import MultimodalModel
from mmssl.objectives import ContrastiveObjective


class Task(nn.Module):
    def __init__(self, cfg: RunConfig, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.model = MultimodalModel(cfg.model)
        self.contrastive = ContrastiveObjective(
            cfg.objectives.contrastive, cfg.model.modalities, rank=rank, world_size=world_size
        )

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        embeddings = self.model(batch)
        terms = self.contrastive(embeddings)
        if not terms:
            raise ValueError(f"batch with modalities {sorted(embeddings)} gives no contrastive pair")
        contrastive = torch.stack(list(terms.values())).mean()
        out = {"loss": self.cfg.objectives.contrastive.weight * contrastive, "contrastive_loss": contrastive}
        out.update(terms)
        for name, scale in self.contrastive.scales().items():
            out[f"logit_scale_{name}"] = scale.detach()
        return out
