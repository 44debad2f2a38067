"""Our metric code against CLIP_benchmark's (the `clip-benchmark` dev dependency): on the same
embeddings every figure is identical.

What each figure is compared with:

- retrieval recall@k (both matching rules): CLIP_benchmark's ``recall_at_k`` through its ``batchify``;
- zero-shot prototypes and logits: its ``zero_shot_classifier`` and ``run_classification``;
- zero-shot top-1/top-5 accuracy: its ``accuracy()`` only where it runs (numpy < 2.4). It ends in
  ``float()`` of a one-element array, which numpy >= 2.4 refuses, and the pinned stack installs numpy
  2.4, so here the reference is written in this test: a hit is the true class among the k best logits,
  counted with CLIP_benchmark's ``recall_at_k`` on the one-hot targets;
- mean per-class recall: scikit-learn's ``balanced_accuracy_score``, the function CLIP_benchmark's own
  classification evaluation calls.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as cb_cls
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from open_clip.tokenizer import SimpleTokenizer
from sklearn.metrics import balanced_accuracy_score

from mmssl.config import EvalConfig, TextTowerConfig
from mmssl.encoders import TextTower
from mmssl.eval import zeroshot
from mmssl.eval.embeddings import Embeddings
from mmssl.eval.retrieval import score_retrieval

# CLIP_benchmark's accuracy() ends in float() of a one-element array, which numpy >= 2.4 refuses
ACCURACY_RUNS = np.lib.NumpyVersion(np.__version__) < "2.4.0"
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def noisy_views(n: int, e: int, seed: int, modalities=("image", "text", "audio"), noise=1.2):
    """Embeddings sharing a signal per sample, so recall is neither 0 nor 1."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, e, generator=g)
    return {m: F.normalize(base + noise * torch.randn(n, e, generator=g), dim=-1) for m in modalities}


def clip_benchmark_recall(query, target, positive, k):
    scores = query @ target.T
    per_query = cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 64, "cpu", k=k)  # [Q]
    return (per_query > 0).float().mean().item()  # its CLIP-style R@k: any positive in the top k


@pytest.mark.parametrize("rule", ["pair", "label"])
def test_retrieval_recall_equals_clip_benchmark(rule):
    n = 300
    emb = noisy_views(n, 16, seed=0)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    results = score_retrieval(Embeddings(emb=emb, labels=labels), EvalConfig(match=rule, ks=(1, 5, 10)))
    ids = labels if rule == "label" else torch.arange(n)
    positive = ids[:, None] == ids[None, :]  # [N, N]
    assert len(results["pairs"]) == 6
    for name, ours in results["pairs"].items():
        a, b = name.split("->")
        for k in (1, 5, 10):
            theirs = clip_benchmark_recall(emb[a], emb[b], positive, k)
            assert ours[f"R@{k}"] == theirs, (name, k)
        assert 0.05 < ours["R@1"] < 0.95  # the figures carry information


class _TextOnly(torch.nn.Module):
    """One text tower behind both interfaces: ours (embed) and CLIP_benchmark's (encode_text/encode_image)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text = TextTower(TextTowerConfig(context_length=16, width=32, depth=1, heads=2), 24)

    def embed(self, modality, x):
        return F.normalize(self.text(x), dim=-1)

    def encode_text(self, tokens):
        return self.text(tokens)

    def encode_image(self, features):  # the "images" are embeddings already
        return features


def test_zeroshot_prototypes_and_scores_equal_clip_benchmark():
    model, tokenizer = _TextOnly().eval(), SimpleTokenizer(context_length=16)
    templates = ("{}", "the number {}", "a photo of the digit {}")
    ours = zeroshot.Prompts(CLASSES, templates).embed(model, tokenizer, device=torch.device("cpu"))  # [C, E]
    theirs = cb_cls.zero_shot_classifier(
        model, tokenizer, CLASSES, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False
    )  # [E, C]
    torch.testing.assert_close(ours, theirs.T, rtol=0, atol=2e-6)

    # samples: noisy copies of their class prototype; labels skip class 9, which is still predicted
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 9, (400,), generator=g)
    image = F.normalize(ours[labels] + 0.25 * torch.randn(400, ours.shape[1], generator=g), dim=-1)
    loader = [(image[i : i + 100], labels[i : i + 100]) for i in range(0, 400, 100)]
    logits, target = cb_cls.run_classification(model, ours.T, loader, "cpu", amp=False)  # [N, C], [N]
    pred = logits.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true"
        their_recall = balanced_accuracy_score(target, pred)
    if ACCURACY_RUNS:
        their_top1, their_top5 = cb_cls.accuracy(logits, target, topk=(1, 5))
    else:  # the reference written here (numpy >= 2.4): a hit is the true class among the k best
        one_hot = F.one_hot(target, len(CLASSES)).bool()
        their_top1, their_top5 = (
            (cb_ret.recall_at_k(logits, one_hot, k) > 0).float().sum().item() / len(target) for k in (1, 5)
        )

    data = Embeddings(emb={"image": image}, labels=labels)
    result = zeroshot.score_zeroshot(data, ours, CLASSES, templates)["modalities"]["image"]
    assert result["top1"] == their_top1 and result["top5"] == their_top5
    assert result["mean_per_class_recall"] == their_recall
    assert 0.3 < result["top1"] < 0.95 and int((pred == 9).sum()) > 0  # informative, and class 9 is predicted
