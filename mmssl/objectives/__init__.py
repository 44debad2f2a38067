"""Training objectives: each an ``nn.Module`` built from its config and its tower's config, returning a
dict of named terms ``{"<name>_loss": t, ...}``."""

from mmssl.objectives.contrastive import ContrastiveObjective, MaskedClipLoss
from mmssl.objectives.masked_audio import MaskedAudioObjective
from mmssl.objectives.masked_image import MaskedImageObjective
from mmssl.objectives.masked_patches import MaskedPatchObjective
from mmssl.objectives.masked_text import MaskedTextObjective
from mmssl.objectives.views import NTXentLoss, ViewObjective

# The names mmssl.task still imports; the classes above replace them (drop with task.py's next edit)
masked_audio_objective = MaskedAudioObjective
masked_image_objective = MaskedImageObjective

__all__ = [
    "ContrastiveObjective",
    "MaskedAudioObjective",
    "MaskedClipLoss",
    "MaskedImageObjective",
    "MaskedPatchObjective",
    "MaskedTextObjective",
    "NTXentLoss",
    "ViewObjective",
    "masked_audio_objective",
    "masked_image_objective",
]
