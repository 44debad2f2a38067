"""Masked image modelling (MAE): unstructured random masking of image patches, default ratio 0.75."""

from __future__ import annotations

from mmssl.config import ImageTowerConfig, MaskedPatchConfig
from mmssl.objectives.masked_patches import MaskedPatchObjective


class MaskedImageObjective(MaskedPatchObjective):
    """MAE on the image tower: patches of ``patch_size`` pixels, 3 channels each."""

    def __init__(self, cfg: MaskedPatchConfig, tower: ImageTowerConfig):
        side = tower.image_size // tower.patch_size
        super().__init__(
            cfg, name="masked_image", width=tower.width, grid=(side, side), patch_dim=3 * tower.patch_size**2
        )
