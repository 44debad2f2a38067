"""Classification for fine-tuning: a linear head on a tower's pooled features and its loss.

Cross-entropy with label smoothing (the target puts ``smoothing`` of its mass evenly over all ``C``
classes, ``1 - smoothing`` on the true one, as ``torch.nn.functional.cross_entropy`` defines it), over
the rows that carry a label: a row without one (id -1, or a sample lacking the tower's modality) adds
nothing, and a micro-batch without any labelled row gives a loss of 0, not NaN.

Axis legend: B batch, D tower width, C classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -1  # the label id of a row without a label


class ClassifierHead(nn.Module):
    """``[B, D] -> [B, C]`` logits. Small initial weights (MAE's fine-tuning head uses std 2e-5; 0.01
    here keeps a linear probe's first steps from stalling) and a zero bias: every class starts equal."""

    def __init__(self, width: int, num_classes: int, init_std: float = 0.01):
        super().__init__()
        self.linear = nn.Linear(width, num_classes)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


class ClassificationLoss(nn.Module):
    """Mean label-smoothed cross-entropy over the labelled rows; also their count and accuracy."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``logits`` ``[B, C]``, ``labels`` ``[B]`` (``IGNORE`` where unlabelled) -> ``{"classify_loss",
        "accuracy", "labelled"}``."""
        per_row = F.cross_entropy(
            logits.float(), labels, ignore_index=IGNORE, label_smoothing=self.smoothing, reduction="none"
        )  # [B], 0 at ignored rows
        known = labels != IGNORE  # [B]
        count = known.sum()
        loss = per_row.sum() / count.clamp(min=1)
        hits = ((logits.argmax(dim=-1) == labels) & known).sum()
        accuracy = hits.float() / count.clamp(min=1)
        return {"classify_loss": loss, "accuracy": accuracy.detach(), "labelled": count.float()}
