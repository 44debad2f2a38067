"""Text tower: a transformer over open_clip BPE tokens, named like open_clip's TextTransformer.

Causal (CLIP) by default, pooled at the end-of-text token (open_clip finds it as the highest id; we
look for its id, since masked language modelling adds a [MASK] id above it). With ``causal=False``
attention is bidirectional and padding keys are masked, as masked language modelling needs.

Axis legend: B batch, L context length, D width, E embedding, V vocabulary, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.config import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, TextTowerConfig
from mmssl.encoders.attention import sdpa_transformer

PAD_ID = 0  # open_clip's tokenizer pads with zeros


@dataclass(frozen=True)
class Vocabulary:
    """The ids masked language modelling needs from a text tower's tokenizer."""

    pad: int
    special: tuple[int, ...]  # never selected nor corrupted (start, end, separator ...)
    mask: int | None  # the [MASK] id; None: the tower cannot do masked language modelling
    random_ids: tuple[int, int]  # [low, high): ids a selected token may be replaced with at random


# open_clip's BPE: ordinary ids 1 .. SOT-1; [MASK] is the one id above the end-of-text id
CLIP_VOCABULARY = Vocabulary(
    pad=PAD_ID, special=(SOT_TOKEN_ID, EOT_TOKEN_ID), mask=MASK_TOKEN_ID, random_ids=(1, SOT_TOKEN_ID)
)


class TextTower(nn.Module):
    """What the objectives read of a text tower (the Hugging Face tower offers the same): ``width``,
    ``context_length``, ``vocab``, ``masked_lm_head()``; ``pool`` and ``forward_head`` take the ids."""

    kind = "native"

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.width, self.context_length, self.vocab = cfg.width, cfg.context_length, CLIP_VOCABULARY
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = sdpa_transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, causal=cfg.causal,
            grad_checkpointing=cfg.grad_checkpointing, dropout=cfg.dropout,
        )  # fmt: skip
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def _mask(self, text: Tensor) -> Tensor | None:
        """None when causal (SDPA applies the causal mask itself); else an additive mask hiding padding
        keys, ``[B, 1, 1, L]``, broadcast over heads and queries. Position 0 (the start token) stays
        visible, so even an all-padding row (an absent caption) attends to something and gives no NaN."""
        if self.cfg.causal:
            return None
        pad = text == PAD_ID  # [B, L]
        pad[:, 0] = False
        mask = torch.zeros(pad.shape, dtype=self.positional_embedding.dtype, device=text.device)
        return rearrange(mask.masked_fill_(pad, float("-inf")), "b k -> b 1 1 k")

    def forward_features(self, text: Tensor) -> Tensor:
        """Token ids ``[B, L]`` -> token features ``[B, L, D]``. ``L`` may be less than the context length
        (a batch trimmed after its longest caption): positions are the first ``L``."""
        length = text.shape[1]
        assert length <= self.cfg.context_length, f"text of shape {tuple(text.shape)}"
        x = self.token_embedding(text)  # [B, L, D]
        x = self.transformer(x + self.positional_embedding[:length], attn_mask=self._mask(text))
        return self.ln_final(x)

    def pool(self, features: Tensor, text: Tensor) -> Tensor:
        """The end-of-text token's features: ``[B, L, D] -> [B, D]``."""
        position = (text == EOT_TOKEN_ID).int().argmax(dim=-1)  # [B]
        return features[torch.arange(features.shape[0], device=features.device), position]

    def forward_head(self, features: Tensor, text: Tensor) -> Tensor:
        """Pool at the end-of-text token and project: ``[B, L, D] -> [B, E]``."""
        return self.pool(features, text) @ self.text_projection

    def forward(self, text: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(text), text)

    def masked_lm_head(self, *, tie: bool = False) -> nn.Module:
        """A fresh head from token features to vocabulary logits, ``[..., D] -> [..., V]`` (BERT's shape).
        ``tie``: its output layer's weight is the token embedding itself (BERT), the same ``[V, D]``
        parameter, so the head adds no ``V x D`` weight of its own; its output bias stays the head's.
        The shared parameter is registered in both modules, as Hugging Face ties its heads: DeepSpeed
        keeps one copy of it (ZeRO-3 gathers it for whichever module runs, and records the second name
        in its checkpoints), and ``parameters()`` yields it once, so the optimizer steps it once."""
        w = self.cfg.width
        out = nn.Linear(w, self.cfg.vocab_size)  # drawn even when tied: the other weights stay as untied
        if tie:
            out.weight = self.token_embedding.weight
        return nn.Sequential(nn.Linear(w, w), nn.GELU(), LayerNorm(w), out)
