"""Zero-shot classification of any non-text modality from class names and prompt templates (CLIP).

A class's prototype is the mean of its prompts' normalised text embeddings, normalised again; a
sample is given the class whose prototype is most similar to its embedding. The scores are
CLIP_benchmark's: top-1 and top-5 accuracy (top-5 only with 5 classes or more) and mean per-class
recall (balanced accuracy); tests check them against its code on the same embeddings.

Class names come from a file given by the user, ``classes.json`` next to the shards (the demo writes
one), or, when the samples' labels are class names, those names (``mmssl.eval.labels``); templates from :data:`DEFAULT_TEMPLATES` or a file. A template holds
``{}`` (or ``{c}``, CLIP_benchmark's spelling) where the class name goes.

Axis legend: N samples, C classes, T templates, E embedding dim, L tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from data_pipelines import expand_shards
from mmssl.model import MultimodalModel

if TYPE_CHECKING:
    from mmssl.eval.embeddings import Embeddings

DEFAULT_TEMPLATES = (
    "{}",
    "a {}",
    "the {}",
    "a photo of the {}",
    "an image of {}",
    "a picture of the number {}",
    "the number {}",
    "the digit {}",
    "a recording of {}",
    "someone saying {}",
    "the sound of {}",
)
TOP_K = (1, 5)


def read_list(path: str | Path) -> list[str]:
    """A JSON list of strings, or plain text with one entry per line (blank lines and # comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"{path} must hold a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not items:
        raise ValueError(f"{path} lists nothing")
    return items


def find_classes(shards: str) -> tuple[list[str] | None, str]:
    """(the names in ``classes.json`` in the first shard's directory or its parent (the demo's layout),
    or None; the file's path, for messages)."""
    first = Path(expand_shards(shards)[0]).parent
    for folder in (first, first.parent):
        if (folder / "classes.json").is_file():
            return read_list(folder / "classes.json"), str(folder / "classes.json")
    return None, "classes.json"


def check_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    for t in templates:
        if t.format("X", c="X") == t:
            raise ValueError(f"template {t!r} has no '{{}}' where the class name goes")
    return templates


@dataclass
class Prompts:
    classes: list[str]
    templates: tuple[str, ...]

    def texts(self) -> list[str]:
        """Every class's prompts, class-major: ``C * T`` strings."""
        check_templates(self.templates)
        return [t.format(c, c=c) for c in self.classes for t in self.templates]

    @torch.no_grad()
    def embed(
        self,
        model: MultimodalModel,
        tokenizer: Callable[[list[str]], Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Class prototypes ``[C, E]``: the mean normalised prompt embedding of each class, renormalised."""
        tokens = tokenizer(self.texts()).to(device)  # [C*T, L]
        was_training = model.training
        model.eval()  # no dropout in the prototypes (model.text.dropout)
        emb = model.embed("text", tokens).float().cpu()  # [C*T, E], normalised
        model.train(was_training)
        return prototypes(rearrange(emb, "(c t) e -> c t e", c=len(self.classes)))


def prototypes(prompt_emb: Tensor) -> Tensor:
    """``[C, T, E]`` normalised prompt embeddings -> ``[C, E]`` prototypes (CLIP's recipe)."""
    mean = prompt_emb.mean(dim=1)  # [C, E]
    return mean / mean.norm(dim=-1, keepdim=True)


def scores(logits: Tensor, labels: Tensor) -> dict[str, float | None]:
    """Top-k accuracy and mean per-class recall of ``[N, C]`` logits against ``[N]`` labels."""
    n, classes = logits.shape
    out: dict[str, float | None] = {}
    for k in TOP_K:
        if k > classes:
            out[f"top{k}"] = None
            continue
        top = logits.topk(k, dim=1).indices  # [N, k]
        out[f"top{k}"] = int((top == labels[:, None]).any(dim=1).sum()) / n
    out["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), labels)
    return out


def mean_per_class_recall(pred: Tensor, labels: Tensor) -> float:
    """The mean over the classes present in ``labels`` of the share of their samples predicted right."""
    y, p = labels.numpy(), pred.numpy()
    per_class = [np.sum(p[y == c] == c) / np.sum(y == c) for c in np.unique(y)]
    return float(np.mean(np.array(per_class, dtype=np.float64)))


def score_zeroshot(data: Embeddings, protos: Tensor, classes: list[str], templates: tuple[str, ...]) -> dict:
    """Zero-shot scores for every non-text modality of ``data`` against ``[C, E]`` prototypes."""
    known = data.labels >= 0
    if bool((data.labels[known] >= len(classes)).any()):
        raise ValueError(f"a sample's label is {int(data.labels.max())} but only {len(classes)} class names")
    per_modality = {}
    for m in sorted(data.emb):
        if m == "text":
            continue
        rows = (data.mask(m) & known).nonzero()[:, 0]  # [N']
        if rows.numel() == 0:
            continue
        logits = data.emb[m][rows] @ protos.T  # [N', C]
        per_modality[m] = {**scores(logits, data.labels[rows]), "samples": int(rows.numel())}
    return {"classes": list(classes), "templates": list(templates), "modalities": per_modality}


def format_zeroshot(results: dict) -> str:
    if "skipped" in results:
        return f"zero-shot classification: skipped ({results['skipped']})"
    head = f"{'modality':<18}{'top-1':>8}{'top-5':>8}{'mean/class':>12}"
    lines = [
        f"zero-shot classification against {len(results['classes'])} class names x "
        f"{len(results['templates'])} prompt templates (chance top-1 ~ {1 / len(results['classes']):.3f})",
        head,
        "-" * len(head),
    ]
    for m, s in results["modalities"].items():
        top5 = "-" if s["top5"] is None else f"{s['top5']:.3f}"
        lines.append(f"{m:<18}{s['top1']:>8.3f}{top5:>8}{s['mean_per_class_recall']:>12.3f}")
    return "\n".join(lines)
