"""Scores of a classifier (a fine-tuned tower and its head) on held-out samples: top-1 and top-5
accuracy, macro-F1, per-class recall and the confusion matrix. Computed here from the logits, with
numpy; ``tests/test_finetune.py`` checks every figure against scikit-learn.

Conventions (scikit-learn's defaults): macro-F1 averages F1 over the classes that occur among the true
labels or the predictions (a class that is never true and never predicted has no F1); per-class recall
is given for the classes that occur among the true labels, and their mean is the mean per-class
recall. The confusion matrix is ``[C, C]`` over all classes: row = true class, column = predicted.

Axis legend: N samples, C classes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

TOP_K = 5


def class_names(classes: list[str] | tuple[str, ...] | None, num_classes: int) -> list[str]:
    """The names to show: the given ones, else the ids as strings."""
    return list(classes) if classes else [str(i) for i in range(num_classes)]


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 over the classes that are true or predicted at least once."""
    hits = np.diag(matrix).astype(np.float64)
    true, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    seen = (true + predicted) > 0
    f1 = 2 * hits[seen] / (true[seen] + predicted[seen])  # 2TP / (2TP + FP + FN)
    return float(f1.mean())


def score_classification(logits: Tensor, labels: Tensor, classes: list[str] | None = None) -> dict:
    """``logits`` ``[N, C]`` and ``labels`` ``[N]`` (ids in ``[0, C)``; rows with -1 are left out) -> the
    scores (JSON-ready). ``classes`` names the ids."""
    num_classes = logits.shape[1]
    known = labels >= 0
    logits, labels = logits[known].float(), labels[known]
    if labels.numel() == 0:
        raise ValueError("the evaluation data holds no labelled sample to classify")
    if int(labels.max()) >= num_classes:
        raise ValueError(
            f"a sample's label is {int(labels.max())} but the classifier has {num_classes} classes"
        )
    names = class_names(classes, num_classes)
    k = min(TOP_K, num_classes)
    top = logits.topk(k, dim=1).indices  # [N, k]
    y, pred = labels.numpy(), top[:, 0].numpy()
    matrix = confusion(pred, y, num_classes)
    true = matrix.sum(axis=1)
    recall = {names[c]: float(matrix[c, c] / true[c]) for c in range(num_classes) if true[c] > 0}
    return {
        "samples": int(labels.numel()),
        "classes": names,
        "top1": float((pred == y).mean()),
        "top5": float((top == labels[:, None]).any(dim=1).double().mean()),
        "top_k": k,  # top-5 is top-C when there are fewer than 5 classes
        "macro_f1": macro_f1(matrix),
        "mean_per_class_recall": float(np.mean(list(recall.values()))),
        "per_class_recall": recall,
        "confusion": matrix.tolist(),
    }


def format_classification(results: dict) -> str:
    """The headline figures, then per-class recall, as text for the terminal."""
    k = results["top_k"]
    lines = [
        f"classification on {results['samples']} held-out samples, {len(results['classes'])} classes",
        f"top-1 {results['top1']:.3f}   top-{k} {results['top5']:.3f}   macro-F1 {results['macro_f1']:.3f}"
        f"   mean per-class recall {results['mean_per_class_recall']:.3f}",
        "per-class recall: "
        + ", ".join(f"{name} {r:.2f}" for name, r in results["per_class_recall"].items()),
    ]
    return "\n".join(lines)


def stack(parts: list[Tensor], width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Concatenate ``[n_i, width]`` chunks (an empty list gives ``[0, width]``)."""
    return torch.cat(parts) if parts else torch.zeros(0, width, dtype=dtype)
