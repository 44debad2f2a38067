"""The training task: model + objectives -> ``{"loss", every named term, metrics}``.

This is the module DeepSpeed wraps. By default each tower runs once per step: on its masked input
when its masked objective is on, and that same pass gives the pooled embedding for the contrastive
loss (FLIP, CAV-MAE), so the masked objectives make a step cheaper, not dearer. With
``objectives.unmasked_contrastive_pass`` (every tower, or the towers listed) a second, clean pass feeds
the contrastive loss instead.

View objectives (``objectives.views.<modality>``) contrast the pass the contrastive loss saw (the
first view) with one more pass of a second view: the loader's second augmentation of the image or
clip (``batch["<modality>_view"]``), or the same caption again under other dropout. The second pass
is treated like the first: masked at the same ratio with a fresh mask (text: a fresh corruption)
when the contrastive pass is masked, whole otherwise; its masks are drawn after every first-pass
mask, so turning views on leaves the first passes as they were. Dropout draws are seeded per (run
seed, rank, step, micro-batch), like the masks, so a resumed run repeats them.

In the last ``objectives.unmasked_tuning_steps`` steps (FLIP's unmasked tuning) the masked objectives
are off: each tower sees its whole input once, only the contrastive loss (and any view objective)
trains, the masked losses are absent from the output (nothing was reconstructed: a 0 would read as a
perfect reconstruction) and the mask ratios are 0, so the logs show the switch.

Self-distillation (``objectives.distill``) rides on the masked pass of each tower it trains: the
masked objective's mask (or text corruption) is drawn here first and shared, the EMA teacher (a plain
attribute, not a submodule) computes its targets from the whole input under ``no_grad``, and the
student's masked features are regressed onto them (mmssl/objectives/distill.py).

Terms are weighted (with their schedules) and summed here; every term is also returned unweighted,
so a weight never hides a term from the logs. Cached accumulation (mmssl/accumulate.py) uses the
pieces separately: the towers' pass (:meth:`Task.encode`), the contrastive and view losses over a
whole window, and the masked terms.

Axis legend: B batch, E shared embedding dim, D tower width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmssl.config import RunConfig
from mmssl.lock import lock_towers
from mmssl.model import MultimodalModel
from mmssl.objectives import (
    ContrastiveObjective,
    DistillObjective,
    EmaTeacher,
    MaskedAudioObjective,
    MaskedImageObjective,
    MaskedTextObjective,
    ViewObjective,
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
        lock_towers(self.model, m)  # LiT: before the engine builds the optimizer from trainable parameters
        self.contrastive = ContrastiveObjective(
            o.contrastive,
            m.modalities,
            rank=rank,
            world_size=world_size,
            global_batch=cfg.optim.micro_batch_size * world_size,  # rows scored together in one step
        )
        on = {name: m_cfg is not None and o.masked(name).enabled for name, m_cfg in
              (("image", m.image), ("text", m.text), ("audio", m.audio))}  # fmt: skip
        towers = self.model  # each objective reads its tower's shape (width, patch grid, vocabulary)
        self.masked_image = MaskedImageObjective(o.masked_image, towers.image) if on["image"] else None
        self.masked_text = MaskedTextObjective(o.masked_text, towers.text) if on["text"] else None
        self.masked_audio = MaskedAudioObjective(o.masked_audio, towers.audio) if on["audio"] else None
        # built last: the other modules' initial weights do not depend on whether views are on
        self.views = nn.ModuleDict(
            {
                name: ViewObjective(
                    getattr(o.views, name),
                    name,
                    getattr(towers, name).width,
                    rank=rank,
                    world_size=world_size,
                )
                for name in o.views.enabled()
                if getattr(m, name) is not None
            }
        )
        # any tower with dropout (the native text tower's, a timm or Hugging Face model's own)
        self.dropout = any(isinstance(x, nn.Dropout) and x.p > 0 for x in self.model.modules())
        # self-distillation, built after the views for the same reason; the teacher is a plain attribute,
        # not a submodule: DeepSpeed must not partition, cast or step it (mmssl/objectives/distill.py)
        self.distilled = cfg.distilled_modalities()
        self.distill = DistillObjective(o.distill, m, self.distilled) if self.distilled else None
        self.teacher = (
            EmaTeacher(
                {name: getattr(self.model, name) for name in self.distilled}, o.distill, cfg.train.steps
            )
            if self.distilled
            else None
        )

    def masked_objective(self, modality: str) -> nn.Module | None:
        return getattr(self, f"masked_{modality}")

    def encode(
        self, batch: dict[str, Tensor], step: int, micro: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """The towers' pass: normalised embeddings ``{modality: [B, E]}`` for the contrastive loss, the
        micro-batch's own terms (masked objectives' losses and ratios) and the view objectives' normalised
        projections of both views ``{modality: ([B, P], [B, P])}``, scored by :meth:`view_terms` (over the
        micro-batch, or over a whole window under cached accumulation)."""
        present = batch["present"]
        device = next(iter(present.values())).device
        seed = mask_seed(self.cfg.train.seed, self.rank, step, micro)
        generator = torch.Generator(device=device).manual_seed(seed)
        tuning = self.cfg.unmasked_tuning(step)
        embeddings: dict[str, Tensor] = {}
        first_views: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}
        projections: dict[str, tuple[Tensor, Tensor]] = {}
        with self.seeded_dropout(seed, device):
            for modality in self.model.modalities:
                if modality not in batch:
                    continue
                masked = self.masked_objective(modality) is not None
                if masked and tuning:
                    terms[f"masked_{modality}_ratio"] = torch.zeros((), device=device)
                    masked = False
                if not masked and modality not in self.views:
                    embeddings[modality] = self.model.embed(modality, batch[modality])  # [B, E]
                    continue
                features, seen, masked_terms = self.contrastive_pass(modality, batch, generator, masked)
                terms.update(masked_terms)
                tower = getattr(self.model, modality)
                args = (features, seen) if modality == "text" else (features,)  # text pools at its end token
                embeddings[modality] = F.normalize(tower.forward_head(*args), dim=-1)  # [B, E]
                if modality in self.views:
                    first_views[modality] = tower.pool(*args)  # [B, D]
            for modality, first in first_views.items():
                masked = self.masked_objective(modality) is not None and not tuning
                second = self.second_view(modality, batch, generator, masked)  # [B, D]
                projections[modality] = self.views[modality].project(first, second)  # [B, P] each
        return embeddings, terms, projections

    def view_terms(
        self, projections: dict[str, tuple[Tensor, Tensor]], present: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Unweighted ``views_<modality>_loss`` of the rows of ``projections`` (``[R, P]`` pairs) whose
        ``present`` ``[R]`` is set."""
        terms: dict[str, Tensor] = {}
        for modality, (a, b) in projections.items():
            terms.update(self.views[modality].score(a, b, present[modality]))
        return terms

    def contrastive_loss(
        self,
        embeddings: dict[str, Tensor],
        present: dict[str, Tensor],
        scales: dict[str, Tensor] | None = None,
        biases: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted: ``"contrastive_loss"`` (pairs weighted by their valid rows) and every pair's term
        (``scales`` and ``biases`` as in the objective)."""
        terms = self.contrastive(embeddings, present, scales, biases)
        if not terms:
            raise ValueError(f"batch with modalities {sorted(embeddings)} gives no contrastive pair")
        return terms

    def add_local_terms(self, loss: Tensor, terms: dict[str, Tensor], step: int) -> Tensor:
        """``loss`` plus the weighted masked and view objectives' losses of one micro-batch."""
        o = self.cfg.objectives
        for modality in self.model.modalities:
            for name, weight in ((f"masked_{modality}_loss", o.masked(modality).loss),
                                 (f"views_{modality}_loss", getattr(o.views, modality).loss),
                                 (f"distill_{modality}_loss", o.distill.loss)):  # fmt: skip
                if name in terms:
                    loss = loss + weight.at(step) * terms[name]
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
        within a gradient-accumulation window) it seeds the masks and dropout. Cached accumulation calls it
        twice per micro-batch: ``embed_only`` (its pass without gradients: embeddings, scales, biases and
        local terms), then with its ``window`` gradients, for a loss to backpropagate (mmssl/accumulate.py)."""
        embeddings, terms, projections = self.encode(batch, step, micro)
        if embed_only:  # the view terms are scored over the whole window: not local here
            local = self.add_local_terms(embeddings[next(iter(embeddings))].new_zeros(()), terms, step)
            return {
                "embeddings": embeddings,
                "views": projections,
                "scales": self.contrastive.scales(),
                "biases": self.contrastive.biases(),
                "masked_loss": local,
                **terms,
            }
        if window is not None:
            scales, biases = self.contrastive.scales(), self.contrastive.biases()
            surrogate = window.surrogate(embeddings, scales, biases, projections)
            return {"loss": self.add_local_terms(surrogate, terms, step)}
        terms |= self.view_terms(projections, batch["present"])
        contrastive_terms = self.contrastive_loss(embeddings, batch["present"])
        weighted = self.cfg.objectives.contrastive.loss.at(step) * contrastive_terms["contrastive_loss"]
        out = {"loss": self.add_local_terms(weighted, terms, step), **contrastive_terms, **terms}
        for name, scale in self.contrastive.scales().items():
            out[f"logit_scale_{name}"] = scale.detach()
        for name, bias in self.contrastive.biases().items():
            out[f"logit_bias_{name}"] = bias.detach()
        if self.teacher is not None:  # the momentum of the teacher's next EMA update
            out["distill_momentum"] = out["loss"].new_tensor(self.teacher.momentum()).detach()
        return out

    def contrastive_pass(
        self, modality: str, batch: dict[str, Tensor], generator: torch.Generator, masked: bool
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The pass whose pooled embedding the contrastive loss takes: its token features, the input they
        came from (text: the ids the tower saw, which pooling needs) and the masked objective's terms
        (none unless ``masked``)."""
        x, tower = batch[modality], getattr(self.model, modality)
        objective = self.masked_objective(modality) if masked else None
        if objective is None:
            return tower.forward_features(x), x, {}
        present = batch["present"][modality]
        distill = self.distill is not None and modality in self.distilled
        if modality == "text":
            corruption = objective.corrupt(x, generator)  # corrupted ids, slot positions, chosen slots
            features, seen, masked_terms = objective(tower, x, present, generator, corruption)
            if distill:
                target = self.teacher.targets(modality, x)  # [B, L, D], from the whole caption
                masked_terms |= self.distill.text_terms(features, *corruption[1:], target, present)
        else:
            keep = objective.draw_keep(x.shape[0], generator, x.device)  # [B, K]
            features, masked_terms = objective(tower, x, present, generator, keep)
            seen = x
            if distill:
                target = self.teacher.targets(modality, x)  # [B, L, D], from the whole input
                masked_terms |= self.distill.patch_terms(modality, features, keep, target, present)
        if self.cfg.objectives.unmasked_pass(modality):
            features, seen = tower.forward_features(x), x
        return features, seen, masked_terms

    def second_view(
        self, modality: str, batch: dict[str, Tensor], generator: torch.Generator, masked: bool
    ) -> Tensor:
        """Pooled features ``[B, D]`` of a sample's second view, passed as the contrastive pass was (masked
        when ``masked`` and the contrastive pass takes the masked pass)."""
        tower, objective = getattr(self.model, modality), self.masked_objective(modality)
        masked = masked and not self.cfg.objectives.unmasked_pass(modality)
        if modality == "text":
            text = batch["text"]  # the same caption: dropout makes the view
            tokens = objective.corrupt(text, generator)[0] if masked else text
            return tower.pool(tower.forward_features(tokens), tokens)
        key = f"{modality}_view"
        assert key in batch, f"objectives.views.{modality} is on but the batch has no {key!r} (see data.py)"
        x = batch[key]
        keep = objective.draw_keep(x.shape[0], generator, x.device) if masked else None  # [B, K]
        return tower.pool(tower.forward_features(x, keep))

    @contextlib.contextmanager
    def seeded_dropout(self, seed: int, device: torch.device) -> Iterator[None]:
        """Dropout draws from torch's global generator: in training, seed it for this micro-batch (and
        put it back afterwards), so ranks draw differently and a resumed run draws the same."""
        if not (self.dropout and self.training):
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed ^ 0x5DEECE66D)
            yield


@dataclass
class WindowGradients:
    """What cached accumulation hands a micro-batch's second pass: the window loss's gradient w.r.t. this
    micro-batch's embeddings ``{modality: [B, E]}`` and view projections ``{modality: ([B, P], [B, P])}``
    and, for one micro-batch of the window, w.r.t. the logit scales and SigLIP biases ``{pair: scalar}``
    (empty for the others, so they count once)."""

    embeddings: dict[str, Tensor]
    scales: dict[str, Tensor] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def surrogate(
        self,
        embeddings: dict[str, Tensor],
        scales: dict[str, Tensor],
        biases: dict[str, Tensor],
        projections: dict[str, tuple[Tensor, Tensor]],
    ) -> Tensor:
        """A scalar whose gradient through the fresh ``embeddings``, ``scales``, ``biases`` and view
        ``projections`` is the window loss's."""
        total = next(iter(embeddings.values())).new_zeros(())
        for modality, grad in self.embeddings.items():
            total = total + (embeddings[modality] * grad).sum()  # [B, E] * [B, E] -> scalar
        for modality, grads in self.views.items():
            for fresh, grad in zip(projections[modality], grads, strict=True):
                total = total + (fresh * grad).sum()  # [B, P] * [B, P] -> scalar
        for name, grad in self.scales.items():
            total = total + scales[name] * grad
        for name, grad in self.biases.items():
            total = total + biases[name] * grad
        return total
