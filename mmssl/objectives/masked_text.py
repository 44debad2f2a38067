"""Masked language modelling (BERT) on the text tower.

Of the non-special tokens (not padding, start or end of text), ``select_prob`` are selected; of those,
``mask_prob`` become [MASK], ``random_prob`` a random ordinary token and the rest stay as they were.
The tower runs bidirectionally on the corrupted text, and a head predicts the original ids at the
selected positions only. The end-of-text token is never corrupted, so the same pass also gives the
pooled embedding for the contrastive loss.

Axis legend: B batch, L context, D width, S selected positions in the batch, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.config import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, MaskedTextConfig, TextTowerConfig
from mmssl.encoders.text import PAD_ID, TextTower


class MaskedTextObjective(nn.Module):
    def __init__(self, cfg: MaskedTextConfig, tower: TextTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.head = nn.Sequential(
            nn.Linear(tower.width, tower.width),
            nn.GELU(),
            LayerNorm(tower.width),
            nn.Linear(tower.width, tower.vocab_size),
        )

    def corrupt(self, text: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, L]`` -> (corrupted ids ``[B, L]``, selected ``[B, L]`` bool)."""

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=generator.device).to(text.device)

        special = (text == PAD_ID) | (text == SOT_TOKEN_ID) | (text == EOT_TOKEN_ID)
        selected = (rand(*text.shape) < self.cfg.select_prob) & ~special
        u = rand(*text.shape)
        to_mask = selected & (u < self.cfg.mask_prob)
        to_random = selected & (u >= self.cfg.mask_prob) & (u < self.cfg.mask_prob + self.cfg.random_prob)
        random_ids = (rand(*text.shape) * (SOT_TOKEN_ID - 1)).long() + 1  # ordinary BPE ids 1 .. SOT-1
        corrupted = torch.where(to_mask, MASK_TOKEN_ID, torch.where(to_random, random_ids, text))
        return corrupted, selected

    def forward(
        self, tower: TextTower, text: Tensor, present: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One bidirectional pass on corrupted text. Returns its features ``[B, L, D]``, the corrupted ids
        (for pooling) and ``{"masked_text_loss", "masked_text_ratio"}``."""
        corrupted, selected = self.corrupt(text, generator)
        selected = selected & present[:, None]
        features = tower.forward_features(corrupted)  # [B, L, D]
        # boolean indexing syncs with the host once (it sizes S); logits for all B*L positions would
        # cost B*L*V memory instead
        logits = self.head(features[selected])  # [S, V]
        loss = F.cross_entropy(logits.float(), text[selected], reduction="sum") / selected.sum().clamp(min=1)
        ordinary = (text != PAD_ID) & (text != SOT_TOKEN_ID) & (text != EOT_TOKEN_ID) & present[:, None]
        ratio = (selected.sum() / ordinary.sum().clamp(min=1)).detach()
        return features, corrupted, {"masked_text_loss": loss, "masked_text_ratio": ratio}
