"""Fine-tuning for classification: a linear head on one pretrained tower, trained on labels.

``mmssl finetune RUN --data SHARDS --tower audio`` writes a run config whose ``finetune`` section names
the tower and the classes (:func:`finetune_config`); the tower starts from RUN's weights through
``model.<tower>.init_from`` (mmssl/pretrained.py). Training is pretraining's: the same trainer
(:class:`FinetuneTrainer` changes only what it builds and how it evaluates), DeepSpeed engine, ranks,
checkpoints, exact resume and logs. The task (:class:`FinetuneTask`):

- the head reads the tower's pooled features (class token after the final norm; text: the end
  token), not the shared embedding: the projection into the contrastive space is frozen and unused;
- ``finetune.linear``: the whole tower is locked (mmssl/lock.py) and stays in eval mode: only the head
  trains, a linear probe by SGD;
- ``finetune.layer_decay`` < 1: the tower's lock groups (embeddings, blocks, last block with the final
  norm) train at learning rates decaying from the head down (:meth:`FinetuneTask.lr_scales`, which
  the engine turns into optimizer groups; warm-up and cosine apply to each);
- ``finetune.label_smoothing``: see mmssl/objectives/classify.py.

Labels come as ids (``label``) or names (``label_name``, mapped through ``finetune.classes``); rows
without a label, or without the tower's modality, are left out of the loss. The evaluation at the end
and ``mmssl eval`` of a fine-tuned run score held-out shards with mmssl/eval/classify.py.

Axis legend: B batch, D tower width, C classes, L tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from mmssl import flops
from mmssl.config import RunConfig
from mmssl.encoders import build_encoder
from mmssl.lock import layer_groups, lock_tower
from mmssl.objectives.classify import IGNORE, ClassificationLoss, ClassifierHead
from mmssl.task import mask_seed


class FinetuneTask(nn.Module):
    """The fine-tuned tower (``model.<tower>``, so the state dict names it as pretraining does) and the
    head; ``forward`` gives ``{"loss", "classify_loss", "accuracy", "labelled"}``."""

    def __init__(self, cfg: RunConfig, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        assert cfg.finetune is not None, "a FinetuneTask needs the config's finetune section"
        self.cfg, self.rank = cfg, rank
        f = cfg.finetune
        self.modality = f.tower
        tower_cfg = getattr(cfg.model, f.tower)
        self.model = nn.ModuleDict({f.tower: build_encoder(tower_cfg, cfg.model.embed_dim)})
        self.head = ClassifierHead(tower_cfg.width, f.num_classes)
        self.loss = ClassificationLoss(f.label_smoothing)
        self.class_index = {name: i for i, name in enumerate(f.classes)}
        if f.linear:
            lock_tower(self.tower)  # every group: only the head trains
        else:
            for p in layer_groups(self.tower)[-1]:  # the projection: the head does not read it
                p.requires_grad_(False)
        self.dropout = getattr(tower_cfg, "dropout", 0.0) > 0

    @property
    def tower(self) -> nn.Module:
        return self.model[self.modality]

    def train(self, mode: bool = True) -> FinetuneTask:
        super().train(mode)
        if self.cfg.finetune.linear:
            self.tower.eval()  # a locked tower is a fixed feature extractor: no dropout
        return self

    def lr_scales(self) -> dict[int, float]:
        """``{id(param): factor}`` of the tower's parameters under layer-wise decay (the head: 1). The
        groups are lock.py's without the projection: embeddings, each block, the last block with the
        final norm; group ``k`` of ``n`` trains at ``layer_decay ** (n - k)``."""
        decay = self.cfg.finetune.layer_decay
        if decay == 1.0:
            return {}
        groups = layer_groups(self.tower)[:-1]
        n = len(groups)
        return {id(p): decay ** (n - k) for k, group in enumerate(groups) for p in group}

    def features(self, x: Tensor) -> Tensor:
        """The tower's pooled features ``[B, D]``."""
        tower = self.tower
        if self.modality == "text":
            return tower.pool(tower.forward_features(x), x)
        return tower.pool(tower.forward_features(x))

    def logits(self, batch: dict[str, Any]) -> Tensor:
        """``[B, C]``."""
        return self.head(self.features(batch[self.modality]))

    def labels(self, batch: dict[str, Any]) -> Tensor:
        """``[B]`` class ids: ``label``, or names mapped through ``finetune.classes``; ``IGNORE`` where a row
        has no label or lacks the tower's modality."""
        ids = batch["label"].clone()
        names = batch.get("label_name") or []
        if self.class_index and any(names):
            mapped = []
            for key, name, y in zip(batch["__key__"], names, ids.tolist(), strict=True):
                if name and name not in self.class_index:
                    raise ValueError(
                        f"sample {key!r} has the class name {name!r}, not one of finetune.classes"
                    )
                mapped.append(self.class_index[name] if name else y)
            ids = torch.tensor(mapped, dtype=torch.long, device=ids.device)
        present = batch.get("present", {}).get(self.modality)
        if present is not None:
            ids = ids.masked_fill(~present, IGNORE)
        too_big = ids >= self.cfg.finetune.num_classes
        if bool(too_big.any()):
            i = int(too_big.nonzero()[0, 0])
            raise ValueError(
                f"sample {batch['__key__'][i]!r} has the label {int(ids[i])}, but finetune.num_classes="
                f"{self.cfg.finetune.num_classes}"
            )
        return ids

    def forward(self, batch: dict[str, Any], step: int = 0, micro: int = 0) -> dict[str, Tensor]:
        """``step`` and ``micro`` seed dropout (a text tower's), so a resumed run draws the same."""
        with self.seeded_dropout(
            mask_seed(self.cfg.train.seed, self.rank, step, micro), batch["label"].device
        ):
            logits = self.logits(batch)  # [B, C]
        terms = self.loss(logits, self.labels(batch))
        return {"loss": terms["classify_loss"], **terms}

    @contextlib.contextmanager
    def seeded_dropout(self, seed: int, device: torch.device) -> Iterator[None]:
        if not (self.dropout and self.training and not self.cfg.finetune.linear):
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed ^ 0x5DEECE66D)
            yield


def flops_per_sample(cfg: RunConfig, text_tokens: int | None = None) -> float:
    """Training FLOPs per sample of the tower and head: forward, and backward at twice the forward
    (through the head only when the tower is locked; never into the patch embedding's input)."""
    f = cfg.finetune
    tower = getattr(cfg.model, f.tower)
    if f.tower == "text":
        tokens, embed = text_tokens or tower.context_length, 0.0
    else:
        patches = flops.tower_tokens(cfg)[f.tower]
        values = 3 * tower.patch_size**2 if f.tower == "image" else tower.patch_freq * tower.patch_time
        tokens, embed = patches + 1, 2.0 * patches * values * tower.width
    trunk = flops.transformer_flops(tokens, tower.width, tower.depth, tower.mlp_ratio)
    head = 2.0 * tower.width * f.num_classes
    if f.linear:
        return embed + trunk + 3 * head
    return 2 * embed + 3 * (trunk + head)
