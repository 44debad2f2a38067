"""The ``finetune`` section of a run's config: a classification head on one pretrained tower.

A run whose config has this section is a fine-tuning run (``mmssl finetune`` writes it): the trainer
builds :class:`mmssl.finetune.FinetuneTask` instead of the pretraining task, from the tower named here
(its weights come from ``model.<tower>.init_from``, the pretrained run). The rest of the config is the
pretrained run's, with the data, optimizer and schedule the fine-tuning uses.

This module imports nothing of mmssl: ``mmssl.config`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class FinetuneConfig:
    """Which tower, which classes, and how the tower trains under the head."""

    tower: Literal["image", "text", "audio"] = "audio"
    source: str = ""  # the pretrained run, checkpoint or export the tower starts from (for the record)
    num_classes: int = 0  # 0: found from the training labels or classes.json before the run starts
    # class names in id order (classes.json, or the sorted distinct names of the training labels);
    # empty: integer labels without names
    classes: tuple[str, ...] = ()
    # True: the tower is locked (mmssl/lock.py) and only the head trains (a linear probe by SGD)
    linear: bool = False
    # layer-wise learning-rate decay (BEiT): the head trains at optim.lr, the tower's last block (with
    # its final norm) at lr x layer_decay, each block below at one more factor, the embeddings at
    # lr x layer_decay^(depth + 1); 1.0 trains every layer at optim.lr
    layer_decay: float = 1.0
    label_smoothing: float = 0.0  # the target puts this much mass evenly over all classes

    def validate(self, path: str = "finetune") -> None:
        if self.num_classes < 2:
            raise ValueError(f"{path}.num_classes must be at least 2, got {self.num_classes}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(
                f"{path}.classes names {len(self.classes)} classes but {path}.num_classes={self.num_classes}"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{path}.classes names a class twice")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"{path}.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{path}.label_smoothing must be in [0, 1), got {self.label_smoothing}")
