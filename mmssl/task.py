"""The training task: model + objectives -> ``{"loss", every named term, metrics}``.

This is the module DeepSpeed wraps. By default each tower runs once per step: on its masked input
when its masked objective is on, and that same pass gives the pooled embedding for the contrastive
loss (FLIP, CAV-MAE), so the masked objectives make a step cheaper, not dearer. With
``objectives.unmasked_contrastive_pass`` a second, clean pass feeds the contrastive loss instead.

Terms are weighted (with their schedules) and summed here; every term is also returned unweighted,
so a weight never hides a term from the logs. Cached accumulation (mmssl/accumulate.py) uses the
pieces separately: the towers' pass (:meth:`Task.encode`), the contrastive loss over a whole window,
and the masked terms.

Axis legend: B batch, E shared embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def encode(
        self, batch: dict[str, Tensor], step: int, micro: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The towers' pass: normalised embeddings ``{modality: [B, E]}`` for the contrastive loss, and
        the masked objectives' terms (losses and ratios)."""
        o = self.cfg.objectives
        present = batch["present"]
        generator = None
        embeddings: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        for modality in self.model.modalities:
            if modality not in batch:
                continue
            x = batch[modality]
            objective = self.masked_objective(modality)
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
        return embeddings, terms

    def contrastive_loss(
        self,
        embeddings: dict[str, Tensor],
        present: dict[str, Tensor],
        scales: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The unweighted contrastive loss and its per-pair terms (``scales`` as in the objective)."""
        pair_terms = self.contrastive(embeddings, present, scales)
        if not pair_terms:
            raise ValueError(f"batch with modalities {sorted(embeddings)} gives no contrastive pair")
        return torch.stack(list(pair_terms.values())).mean(), pair_terms

    def add_masked(self, loss: Tensor, terms: dict[str, Tensor], step: int) -> Tensor:
        """``loss`` plus the masked objectives' weighted losses."""
        for modality in self.model.modalities:
            name = f"masked_{modality}_loss"
            if name in terms:
                loss = loss + self.cfg.objectives.masked(modality).loss.at(step) * terms[name]
        return loss

    def forward(
        self,
        batch: dict[str, Tensor],
        step: int = 0,
        micro: int = 0,
        *,
        embed_only: bool = False,
        window: WindowGradients | None = None,
    ) -> dict[str, Tensor]:
        """``step`` (optimizer steps so far) sets the scheduled loss weights; with ``micro`` (the micro-batch
        within a gradient-accumulation window) it seeds the masks. Cached accumulation calls it twice per
        micro-batch: ``embed_only`` (its pass without gradients: embeddings, scales and masked terms), then
        with its ``window`` gradients, for a loss to backpropagate (mmssl/accumulate.py)."""
        embeddings, terms = self.encode(batch, step, micro)
        if embed_only:
            masked = self.add_masked(embeddings[next(iter(embeddings))].new_zeros(()), terms, step)
            return {
                "embeddings": embeddings,
                "scales": self.contrastive.scales(),
                "masked_loss": masked,
                **terms,
            }
        if window is not None:
            surrogate = window.surrogate(embeddings, self.contrastive.scales())
            return {"loss": self.add_masked(surrogate, terms, step)}
        contrastive, pair_terms = self.contrastive_loss(embeddings, batch["present"])
        loss = self.add_masked(self.cfg.objectives.contrastive.loss.at(step) * contrastive, terms, step)
        out = {"loss": loss, "contrastive_loss": contrastive, **pair_terms, **terms}
        for name, scale in self.contrastive.scales().items():
            out[f"logit_scale_{name}"] = scale.detach()
        return out


@dataclass
class WindowGradients:
    """What cached accumulation hands a micro-batch's second pass: the window loss's gradient w.r.t. this
    micro-batch's embeddings ``{modality: [B, E]}`` and, for one micro-batch of the window, w.r.t. the
    logit scales ``{pair: scalar}`` (empty for the others, so the scales' gradient counts once)."""

    embeddings: dict[str, Tensor]
    scales: dict[str, Tensor] = field(default_factory=dict)

    def surrogate(self, embeddings: dict[str, Tensor], scales: dict[str, Tensor]) -> Tensor:
        """A scalar whose gradient through the fresh ``embeddings`` and ``scales`` is the window loss's."""
        total = next(iter(embeddings.values())).new_zeros(())
        for modality, grad in self.embeddings.items():
            total = total + (embeddings[modality] * grad).sum()  # [B, E] * [B, E] -> scalar
        for name, grad in self.scales.items():
            total = total + scales[name] * grad
        return total
