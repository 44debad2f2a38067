"""Training objectives: each a module returning a dict of named terms ``{"<name>_loss": t, ...}``."""

from mmssl.objectives.contrastive import ContrastiveObjective, MaskedClipLoss
from mmssl.objectives.masked_audio import masked_audio_objective
from mmssl.objectives.masked_image import masked_image_objective
from mmssl.objectives.masked_patches import MaskedPatchObjective
from mmssl.objectives.masked_text import MaskedTextObjective
from mmssl.objectives.siglip import SigLipLoss

__all__ = [
    "ContrastiveObjective",
    "MaskedClipLoss",
    "MaskedPatchObjective",
    "MaskedTextObjective",
    "SigLipLoss",
    "masked_audio_objective",
    "masked_image_objective",
]
