"""MAE-style masked patch reconstruction, shared by the image and audio objectives.

The tower's encoder sees only the kept patches (``forward_features(x, keep)``); a light decoder puts
its tokens back in place among mask tokens, adds decoder positions and predicts the values of every
patch; the loss is the mean squared error over the masked patches of the rows where the modality is
present. Targets are normalised per patch by default (MAE's norm_pix).

Axis legend: B batch, L patches, K kept, R the tower's prefix tokens (class, registers), D encoder width, Dd decoder width, P values per patch.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from einops import repeat
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.config import MaskedPatchConfig
from mmssl.encoders import PatchTower
from mmssl.encoders.attention import sdpa_transformer
from mmssl.objectives.masking import mask_from_keep, mask_scores, random_keep


class DecoderConfig(Protocol):
    """What sizes a :class:`PatchDecoder` (``objectives.masked_<m>`` and ``objectives.distill`` have it)."""

    decoder_width: int
    decoder_depth: int
    decoder_heads: int


class PatchDecoder(nn.Module):
    """MAE's light decoder, shared by the masked patch objectives (predicting patch values) and
    distillation (predicting the teacher's features): the kept patches' encoder tokens ``[B, K, D]``
    back in place among mask tokens, decoder positions added, a small transformer, a norm, then a
    projection to ``out_dim``: predictions for every patch ``[B, L, out_dim]``."""

    def __init__(self, width: int, num_patches: int, out_dim: int, cfg: DecoderConfig):
        super().__init__()
        dw = cfg.decoder_width
        self.embed = nn.Linear(width, dw)
        self.mask_token = nn.Parameter(0.02 * torch.randn(dw))
        self.pos = nn.Parameter(0.02 * torch.randn(num_patches, dw))
        self.blocks = sdpa_transformer(dw, cfg.decoder_depth, cfg.decoder_heads, 4.0)
        self.norm = LayerNorm(dw)
        self.pred = nn.Linear(dw, out_dim)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        y = self.embed(tokens)  # [B, K, Dd]
        full = repeat(self.mask_token, "d -> b l d", b=y.shape[0], l=self.pos.shape[0])
        full = full.scatter(1, repeat(keep, "b k -> b k d", d=y.shape[-1]), y)  # [B, L, Dd]
        return self.pred(self.norm(self.blocks(full + self.pos)))  # [B, L, out_dim]


# The masked patch objectives held the decoder's parts themselves before the decoder was shared with
# distillation: their state-dict keys (relative to the objective) -> today's. Same tensors, same order.
LEGACY_DECODER_KEYS = {
    "decoder_embed.": "decoder.embed.",
    "mask_token": "decoder.mask_token",
    "decoder_pos": "decoder.pos",
    "decoder.resblocks.": "decoder.blocks.resblocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}


def legacy_decoder_key(key: str) -> str:
    """An old checkpoint's key of a masked patch objective (relative to it) -> today's; others unchanged."""
    for old, new in LEGACY_DECODER_KEYS.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key.removeprefix(old)
    return key


def _rename_legacy_keys(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of :class:`MaskedPatchObjective`: renames old keys in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + legacy_decoder_key(key.removeprefix(prefix))
        if new != key:
            state_dict[new] = state_dict.pop(key)


class MaskedPatchObjective(nn.Module):
    """On a token-based patch tower: its ``width``, ``grid`` and ``patch_dim`` size the decoder."""

    def __init__(self, cfg: MaskedPatchConfig, *, name: str, tower: PatchTower):
        super().__init__()
        if not tower.token_based:
            raise ValueError(
                f"objectives.{name}: MAE needs a token-based tower; model.{name.removeprefix('masked_')} "
                f"({tower.cfg.timm_name}) has none (a timm VisionTransformer has)"
            )
        self.cfg = cfg
        self.name = name
        self.grid = grid = tower.grid
        self.decoder = PatchDecoder(tower.width, grid[0] * grid[1], tower.patch_dim, cfg)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def draw_keep(self, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """Kept patch indices ``[B, K]``."""
        return random_keep(
            mask_scores(batch, self.grid, self.cfg.mode, generator, device), self.cfg.mask_ratio
        )

    def targets(self, tower: PatchTower, x: Tensor) -> Tensor:
        target = tower.patchify(x)  # [B, L, P]
        if self.cfg.norm_targets:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(
        self,
        tower: PatchTower,
        x: Tensor,
        present: Tensor,
        generator: torch.Generator,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One encoder pass on the visible patches (``keep`` ``[B, K]``, drawn here unless given: the task
        draws it first when distillation shares the pass). Returns its token features ``[B, R + K, D]``
        (for the pooled embedding) and ``{"<name>_loss", "<name>_ratio"}``."""
        if keep is None:
            keep = self.draw_keep(x.shape[0], generator, x.device)  # [B, K]
        features = tower.forward_features(x, keep)  # [B, R + K, D]
        pred = self.decoder(features[:, tower.num_prefix_tokens :], keep)  # [B, L, P]
        per_patch = (pred - self.targets(tower, x)).pow(2).mean(dim=-1)  # [B, L]
        masked = mask_from_keep(keep, per_patch.shape[1])  # [B, L]
        weight = (masked & present[:, None]).to(per_patch.dtype)
        loss = (per_patch * weight).sum() / weight.sum().clamp(min=1)
        return features, {f"{self.name}_loss": loss, f"{self.name}_ratio": masked.float().mean().detach()}
