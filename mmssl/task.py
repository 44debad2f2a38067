"""The training task: model + objectives -> ``{"loss", every named term, metrics}``.

This is the module DeepSpeed wraps. By default each tower runs once per step: on its masked input
when its masked objective is on, and that same pass gives the pooled embedding for the contrastive
loss (FLIP, CAV-MAE), so the masked objectives make a step cheaper, not dearer. With
``objectives.unmasked_contrastive_pass`` a second, clean pass feeds the contrastive loss instead.

In the last ``objectives.unmasked_tuning_steps`` steps (FLIP's unmasked tuning) the masked objectives
are off: each tower sees its whole input once, only the contrastive loss trains, the masked losses are
absent from the output (nothing was reconstructed: a 0 would read as a perfect reconstruction) and the
mask ratios are 0, so the logs show the switch.

Terms are weighted (with their schedules) and summed here; every term is also returned unweighted,
so a weight never hides a term from the logs.

Axis legend: B batch, E shared embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.config import RunConfig
from mmssl.model import MultimodalModel
from mmssl.objectives import (
    ContrastiveObjective,
    MaskedTextObjective,
    masked_audio_objective,
    masked_image_objective,
)


def mask_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Distinct, reproducible seeds per (run seed, rank, optimizer step, micro-batch within it)."""
    return (seed * 0x9E3779B1 + rank * 0x85EBCA77 + step * 0xC2B2AE3D + micro * 0x27D4EB2F) % (2**63 - 1)


class Task(nn.Module):
    def __init__(self, cfg: RunConfig, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.rank = rank
        m, o = cfg.model, cfg.objectives
        self.model = MultimodalModel(m)
        self.contrastive = ContrastiveObjective(o.contrastive, m.modalities, rank=rank, world_size=world_size)
        on = {name: m_cfg is not None and o.masked(name).enabled for name, m_cfg in
              (("image", m.image), ("text", m.text), ("audio", m.audio))}  # fmt: skip
        self.masked_image = masked_image_objective(o.masked_image, m.image) if on["image"] else None
        self.masked_text = MaskedTextObjective(o.masked_text, m.text) if on["text"] else None
        self.masked_audio = masked_audio_objective(o.masked_audio, m.audio) if on["audio"] else None

    def masked_objective(self, modality: str) -> nn.Module | None:
        return getattr(self, f"masked_{modality}")

    def unmasked_tuning(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is one of the last ``unmasked_tuning_steps``."""
        return step >= self.cfg.train.steps - self.cfg.objectives.unmasked_tuning_steps

    def forward(self, batch: dict[str, Tensor], step: int = 0, micro: int = 0) -> dict[str, Tensor]:
        """``step`` (optimizer steps so far) sets the scheduled loss weights; with ``micro`` (the micro-batch
        within a gradient-accumulation window) it seeds the masks."""
        o = self.cfg.objectives
        present = batch["present"]
        generator = None
        tuning = self.unmasked_tuning(step)
        embeddings: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        for modality in self.model.modalities:
            if modality not in batch:
                continue
            x = batch[modality]
            objective = self.masked_objective(modality)
            if objective is not None and tuning:
                terms[f"masked_{modality}_ratio"] = torch.zeros((), device=x.device)
                objective = None
            if objective is None:
                embeddings[modality] = self.model.embed(modality, x)  # [B, E]
                continue
            if generator is None:
                seed = mask_seed(self.cfg.train.seed, self.rank, step, micro)
                generator = torch.Generator(device=x.device).manual_seed(seed)
            tower = getattr(self.model, modality)
            if modality == "text":
                features, corrupted, masked_terms = objective(tower, x, present[modality], generator)
                pooled = tower.forward_head(features, corrupted)
            else:
                features, masked_terms = objective(tower, x, present[modality], generator)
                pooled = tower.forward_head(features)
            terms.update(masked_terms)
            if o.unmasked_contrastive_pass:
                embeddings[modality] = self.model.embed(modality, x)
            else:
                embeddings[modality] = F.normalize(pooled, dim=-1)  # [B, E]

        contrastive_terms = self.contrastive(embeddings, present)  # pairs weighted by their valid rows
        if not contrastive_terms:
            raise ValueError(f"batch with modalities {sorted(embeddings)} gives no contrastive pair")
        loss = o.contrastive.loss.at(step) * contrastive_terms["contrastive_loss"]
        for modality in self.model.modalities:
            name = f"masked_{modality}_loss"
            if name in terms:
                loss = loss + o.masked(modality).loss.at(step) * terms[name]
        out = {"loss": loss, **contrastive_terms, **terms}
        for name, scale in self.contrastive.scales().items():
            out[f"logit_scale_{name}"] = scale.detach()
        return out
