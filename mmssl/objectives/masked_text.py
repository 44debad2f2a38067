"""Masked language modelling (BERT) on the text tower.

Of each caption's ``n`` ordinary tokens (not padding, start or end of text), ``select_prob * n`` are
selected at random, rounded stochastically (down or up, so the expected count is exactly
``select_prob * n`` for every length; BERT's reference code also picks a count per sequence and then
that many positions). Of the selected tokens, ``mask_prob`` become [MASK], ``random_prob`` a random
ordinary token and the rest stay as they were. The tower runs bidirectionally on the corrupted text,
and a head predicts the original ids at the selected positions only. The end-of-text token is never
corrupted, so the same pass also gives the pooled embedding for the contrastive loss.

Every shape here is fixed by the config (each caption gets ``K = ceil(select_prob * (L - 2))`` slots,
the unused ones weighted 0), so the objective never waits on the device to size a tensor (no host
sync in the step) and the head costs ``B * K`` positions, not ``B * L``.

Axis legend: B batch, L context, K selection slots per caption, D width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from mmssl.config import MaskedTextConfig
from mmssl.encoders.text import TextTower, Vocabulary


def selection_slots(context_length: int, select_prob: float) -> int:
    """K: the most tokens a caption of ``context_length`` can have selected."""
    return max(1, math.ceil(select_prob * (context_length - 2)))


def ordinary_tokens(text: Tensor, vocab: Vocabulary) -> Tensor:
    """``[B, L]`` bool: the tokens that are neither padding nor special."""
    special = torch.tensor(vocab.special, dtype=text.dtype, device=text.device)
    return (text != vocab.pad) & ~torch.isin(text, special)


class MaskedTextObjective(nn.Module):
    """On any text tower offering ``vocab``, ``context_length`` and ``masked_lm_head()``: the native
    tower's head is fresh (its output layer tied to the token embedding with ``tie_head``), a Hugging
    Face tower's is its model's own masked-LM head."""

    def __init__(self, cfg: MaskedTextConfig, tower: TextTower):
        super().__init__()
        self.cfg = cfg
        self.vocab = tower.vocab
        assert self.vocab.mask is not None, "the text tower has no [MASK] id"
        self.slots = selection_slots(tower.context_length, cfg.select_prob)
        self.head = tower.masked_lm_head(tie=cfg.tie_head)

    def corrupt(self, text: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids ``[B, L]`` -> corrupted ids ``[B, L]``, slot positions ``[B, K]`` and which slots are
        selected ``[B, K]`` (bool)."""

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=generator.device).to(text.device)

        assert text.shape[1] >= self.slots, (
            f"text of {text.shape[1]} tokens has fewer than {self.slots} slots"
        )
        ordinary = ordinary_tokens(text, self.vocab)  # [B, L]
        count = torch.floor(self.cfg.select_prob * ordinary.sum(dim=1) + rand(text.shape[0]))  # [B]
        scores = rand(*text.shape).masked_fill_(~ordinary, 2.0)  # ordinary tokens (< 1) come first
        positions = scores.topk(self.slots, dim=1, largest=False).indices  # [B, K], random order
        chosen = torch.arange(self.slots, device=text.device) < count[:, None]  # [B, K]
        selected = torch.zeros_like(ordinary).scatter_(1, positions, chosen)  # [B, L]
        u = rand(*text.shape)
        to_mask = selected & (u < self.cfg.mask_prob)
        to_random = selected & (u >= self.cfg.mask_prob) & (u < self.cfg.mask_prob + self.cfg.random_prob)
        low, high = self.vocab.random_ids
        random_ids = (rand(*text.shape) * (high - low)).long() + low  # [B, L], in [low, high)
        corrupted = torch.where(to_mask, self.vocab.mask, torch.where(to_random, random_ids, text))
        return corrupted, positions, chosen

    def forward(
        self,
        tower: TextTower,
        text: Tensor,
        present: Tensor,
        generator: torch.Generator,
        corruption: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One bidirectional pass on corrupted text (``corruption`` as :meth:`corrupt` returns it, drawn
        here unless given: the task draws it first when distillation shares the pass). Returns its
        features ``[B, L, D]``, the corrupted ids (for pooling) and ``{"masked_text_loss",
        "masked_text_ratio"}``."""
        corrupted, positions, chosen = corruption or self.corrupt(text, generator)
        features = tower.forward_features(corrupted)  # [B, L, D]
        picked = torch.gather(
            features, 1, repeat(positions, "b k -> b k d", d=features.shape[-1])
        )  # [B, K, D]
        logits = self.head(picked)  # [B, K, V]
        targets = torch.gather(text, 1, positions)  # [B, K]
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [B*K]
        weight = (chosen & present[:, None]).flatten().to(ce.dtype)  # [B*K]
        loss = (ce * weight).sum() / weight.sum().clamp(min=1)
        ordinary = ordinary_tokens(text, self.vocab) & present[:, None]
        ratio = (weight.sum() / ordinary.sum().clamp(min=1)).detach()
        return features, corrupted, {"masked_text_loss": loss, "masked_text_ratio": ratio}
