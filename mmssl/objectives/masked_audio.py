"""Masked spectrogram modelling (AudioMAE): patches of the log-mel, default ratio 0.8.

``mode`` picks the masking: ``unstructured`` (each patch on its own, AudioMAE's best for pretraining),
``time`` (whole time columns), ``frequency`` (whole mel-band rows) or ``time_frequency`` (rows and
columns together). Every mode keeps exactly ``round(L * (1 - ratio))`` patches per sample.
"""

from __future__ import annotations

from mmssl.config import MaskedPatchConfig
from mmssl.encoders import PatchTower
from mmssl.objectives.masked_patches import MaskedPatchObjective


class MaskedAudioObjective(MaskedPatchObjective):
    """AudioMAE on the audio tower (native or a timm ViT): patches of ``patch_freq`` mel bands by
    ``patch_time`` frames."""

    def __init__(self, cfg: MaskedPatchConfig, tower: PatchTower):
        super().__init__(cfg, name="masked_audio", tower=tower)
