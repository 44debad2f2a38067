"""Training objectives: each an ``nn.Module`` built from its config and its tower's config, returning a
dict of named terms ``{"<name>_loss": t, ...}``."""

from mmssl.objectives.contrastive import ContrastiveObjective, MaskedClipLoss
from mmssl.objectives.distill import DistillObjective, EmaTeacher
from mmssl.objectives.masked_audio import MaskedAudioObjective
from mmssl.objectives.masked_image import MaskedImageObjective
from mmssl.objectives.masked_patches import MaskedPatchObjective
from mmssl.objectives.masked_text import MaskedTextObjective
from mmssl.objectives.siglip import SigLipLoss
from mmssl.objectives.views import NTXentLoss, ViewObjective

__all__ = [
    "ContrastiveObjective",
    "DistillObjective",
    "EmaTeacher",
    "MaskedAudioObjective",
    "MaskedClipLoss",
    "MaskedImageObjective",
    "MaskedPatchObjective",
    "MaskedTextObjective",
    "NTXentLoss",
    "SigLipLoss",
    "ViewObjective",
]
