"""The linear probe learns what the embeddings carry and nothing else: on linearly separable classes it
scores 1.0; with the train labels shuffled (no relation left to learn) it scores near chance."""

import torch
import torch.nn.functional as F

from mmssl.eval import probe
from mmssl.eval.embeddings import Embeddings

CLASSES, PER_CLASS, DIM = 10, 30, 16


def clustered(seed: int, spread: float) -> Embeddings:
    """``PER_CLASS`` samples per class around one random direction per class (the same directions for
    every seed), normalised like real embeddings; two modalities, the second noisier."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)  # [N]
    emb = {
        m: F.normalize(centres[labels] + s * torch.randn(len(labels), DIM, generator=g), dim=-1)
        for m, s in (("image", spread), ("audio", 2 * spread))
    }
    return Embeddings(emb=emb, labels=labels)


def test_separable_classes_are_probed_perfectly():
    results = probe.score_probe(clustered(1, 0.05), clustered(2, 0.05), progress=False)
    assert set(results) == {"image", "audio"}
    for modality, r in results.items():
        assert r["top1"] == 1.0 and r["mean_per_class_recall"] == 1.0, modality
        assert r["train_samples"] == r["test_samples"] == CLASSES * PER_CLASS


def test_shuffled_train_labels_leave_the_probe_at_chance():
    train = clustered(1, 0.05)
    train.labels = train.labels[torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(3))]
    results = probe.score_probe(train, clustered(2, 0.05), progress=False)
    for modality, r in results.items():
        # chance is 1/10; over 300 test samples its standard deviation is 0.017
        assert r["top1"] < 0.2 and r["mean_per_class_recall"] < 0.2, (modality, r)
