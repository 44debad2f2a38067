"""Masked image modelling (MAE): unstructured random masking of image patches, default ratio 0.75."""

from __future__ import annotations

from mmssl.config import MaskedPatchConfig
from mmssl.encoders import PatchTower
from mmssl.objectives.masked_patches import MaskedPatchObjective


class MaskedImageObjective(MaskedPatchObjective):
    """MAE on the image tower (native or a timm ViT): patches of its patch size, 3 channels each."""

    def __init__(self, cfg: MaskedPatchConfig, tower: PatchTower):
        super().__init__(cfg, name="masked_image", tower=tower)
