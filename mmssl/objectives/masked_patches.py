"""MAE-style masked patch reconstruction, shared by the image and audio objectives.

The tower's encoder sees only the kept patches (``forward_features(x, keep)``); a light decoder puts
its tokens back in place among mask tokens, adds decoder positions and predicts the values of every
patch; the loss is the mean squared error over the masked patches of the rows where the modality is
present. Targets are normalised per patch by default (MAE's norm_pix).

Axis legend: B batch, L patches, K kept, R the tower's prefix tokens (class, registers), D encoder width, Dd decoder width, P values per patch.
"""

from __future__ import annotations

import torch
from einops import repeat
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.config import MaskedPatchConfig
from mmssl.encoders import PatchTower
from mmssl.encoders.attention import sdpa_transformer
from mmssl.objectives.masking import mask_from_keep, mask_scores, random_keep


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
        width, patch_dim = tower.width, tower.patch_dim
        num_patches = grid[0] * grid[1]
        dw = cfg.decoder_width
        self.decoder_embed = nn.Linear(width, dw)
        self.mask_token = nn.Parameter(0.02 * torch.randn(dw))
        self.decoder_pos = nn.Parameter(0.02 * torch.randn(num_patches, dw))
        self.decoder = sdpa_transformer(dw, cfg.decoder_depth, cfg.decoder_heads, 4.0)
        self.decoder_norm = LayerNorm(dw)
        self.decoder_pred = nn.Linear(dw, patch_dim)

    def draw_keep(self, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """Kept patch indices ``[B, K]``."""
        return random_keep(
            mask_scores(batch, self.grid, self.cfg.mode, generator, device), self.cfg.mask_ratio
        )

    def decode(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Encoder tokens of the kept patches ``[B, K, D]`` -> predicted patches ``[B, L, P]``."""
        y = self.decoder_embed(tokens)  # [B, K, Dd]
        full = repeat(self.mask_token, "d -> b l d", b=y.shape[0], l=self.decoder_pos.shape[0])
        full = full.scatter(1, repeat(keep, "b k -> b k d", d=y.shape[-1]), y)  # [B, L, Dd]
        full = self.decoder(full + self.decoder_pos)
        return self.decoder_pred(self.decoder_norm(full))  # [B, L, P]

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
        pred = self.decode(features[:, tower.num_prefix_tokens :], keep)  # [B, L, P]
        per_patch = (pred - self.targets(tower, x)).pow(2).mean(dim=-1)  # [B, L]
        masked = mask_from_keep(keep, per_patch.shape[1])  # [B, L]
        weight = (masked & present[:, None]).to(per_patch.dtype)
        loss = (per_patch * weight).sum() / weight.sum().clamp(min=1)
        return features, {f"{self.name}_loss": loss, f"{self.name}_ratio": masked.float().mean().detach()}
