"""Masked image modelling (MAE): unstructured random masking of image patches, default ratio 0.75."""

from __future__ import annotations

from mmssl.config import ImageTowerConfig, MaskedPatchConfig
from mmssl.objectives.masked_patches import MaskedPatchObjective


def masked_image_objective(cfg: MaskedPatchConfig, tower: ImageTowerConfig) -> MaskedPatchObjective:
    side = tower.image_size // tower.patch_size
    return MaskedPatchObjective(
        cfg, name="masked_image", width=tower.width, grid=(side, side), patch_dim=3 * tower.patch_size**2
    )
