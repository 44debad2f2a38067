"""Linear probe: logistic regression on frozen embeddings of a train split, scored on a test split.

One probe per modality (scikit-learn's ``LogisticRegression``, L-BFGS, deterministic). Its inverse
regularisation ``C`` is chosen on a stratified fifth of the train split held out for validation,
then the probe is refit on the whole train split. Scores as in zero-shot: top-1 accuracy and mean
per-class recall.

Axis legend: N samples, E embedding dim.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from mmssl.eval.zeroshot import mean_per_class_recall

if TYPE_CHECKING:
    from mmssl.eval.embeddings import Embeddings

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
VAL_FRACTION = 0.2
MAX_ITER = 1000


def _rows(data: Embeddings, m: str) -> tuple[np.ndarray, np.ndarray]:
    rows = (data.mask(m) & (data.labels >= 0)).nonzero()[:, 0]
    return data.emb[m][rows].double().numpy(), data.labels[rows].numpy()  # [N, E], [N]


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a loose C may stop at max_iter; still usable
        return LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, y)


def validation_split(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Boolean ``[N]`` mask of a stratified, seeded validation fifth (at least one sample per class
    that has two or more)."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = int(round(len(idx) * VAL_FRACTION)) if len(idx) > 1 else 0
        val[rng.permutation(idx)[: max(take, 1 if len(idx) > 1 else 0)]] = True
    return val


def probe_modality(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict:
    (x, y), (x_test, y_test) = train, test
    val = validation_split(y)
    best_c, best_acc = 1.0, float("nan")
    sweep = C_GRID if val.any() and len(np.unique(y[~val])) > 1 else ()  # too few samples: C=1
    for c in sweep:
        acc = float((_fit(x[~val], y[~val], c).predict(x[val]) == y[val]).mean())
        if not acc <= best_acc:  # the first C, then any better one
            best_c, best_acc = c, acc
    clf = _fit(x, y, best_c)
    pred = torch.from_numpy(clf.predict(x_test))
    labels = torch.from_numpy(y_test)
    return {
        "top1": float((pred == labels).double().mean()),
        "mean_per_class_recall": mean_per_class_recall(pred, labels),
        "C": best_c,
        "val_top1": best_acc if sweep else None,
        "train_samples": len(y),
        "test_samples": len(y_test),
    }


def score_probe(train: Embeddings, test: Embeddings, *, progress: bool = True) -> dict:
    """Per modality with labelled samples in both splits: the probe's scores on ``test``."""
    out = {}
    modalities = [m for m in sorted(test.emb) if m in train.emb]
    # One BLAS/OpenMP thread: the fits are small, and torch's OpenMP threads (still spinning after the
    # embedding) make multi-threaded BLAS here ~60x slower on 2 cores.
    with threadpool_limits(limits=1):
        for m in tqdm(modalities, desc="linear probe", unit="modality", disable=not progress, leave=False):
            tr, te = _rows(train, m), _rows(test, m)
            if len(np.unique(tr[1])) >= 2 and len(te[1]) > 0:
                out[m] = probe_modality(tr, te)
    return out


def format_probe(results: dict) -> str:
    head = f"{'modality':<18}{'top-1':>8}{'mean/class':>12}{'C':>10}"
    lines = ["linear probe (logistic regression on frozen embeddings, train split -> test split)", head]
    lines.append("-" * len(head))
    for m, s in results.items():
        lines.append(f"{m:<18}{s['top1']:>8.3f}{s['mean_per_class_recall']:>12.3f}{s['C']:>10g}")
    return "\n".join(lines)
