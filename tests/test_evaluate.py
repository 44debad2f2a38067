"""Retrieval metrics: ranks against brute force, both matching rules, missing modalities, the table."""

import pytest
import torch
import torch.nn.functional as F

from mmssl.config import EvalConfig
from mmssl.eval.embeddings import Embeddings
from mmssl.eval.retrieval import choose_rule, format_retrieval, ranks_of_first_hit, score_retrieval
from mmssl.eval.run import sample_for_matrix


def brute_force_ranks(query, target, correct):
    ranks = []
    for i in range(query.shape[0]):
        order = sorted(range(target.shape[0]), key=lambda j: -float(query[i] @ target[j]))
        ranks.append(next(r for r, j in enumerate(order, 1) if correct[i, j]))
    return torch.tensor(ranks)


@pytest.mark.parametrize("rule", ["pair", "label"])
def test_ranks_match_brute_force(rule):
    g = torch.Generator().manual_seed(0)
    q, t = (F.normalize(torch.randn(40, 8, generator=g), dim=-1) for _ in range(2))
    labels = torch.randint(0, 5, (40,), generator=g)
    ids = labels if rule == "label" else torch.arange(40)
    correct = ids[:, None] == ids[None, :]
    assert torch.equal(ranks_of_first_hit(q, t, ids, ids, chunk=7), brute_force_ranks(q, t, correct))


def test_perfect_and_shuffled_retrieval():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(50, 16, generator=g), dim=-1)
    perm = torch.randperm(50, generator=g)
    data = Embeddings(emb={"image": a, "text": a.clone(), "audio": a[perm]}, labels=torch.arange(50))
    results = score_retrieval(data, EvalConfig(match="pair"))
    assert results["pairs"]["image->text"]["R@1"] == 1.0
    assert results["pairs"]["text->image"]["median_rank"] == 1.0
    assert results["pairs"]["image->audio"]["R@1"] < 0.2
    assert len(results["pairs"]) == 6
    assert "rule 'pair'" in format_retrieval(results)


def test_auto_rule_uses_labels_when_captions_repeat():
    labels = torch.tensor([0, 1, 0, 1])
    distinct = torch.arange(16).reshape(4, 4)
    repeated = distinct.clone()
    repeated[2] = repeated[0]
    emb = {"image": torch.eye(4), "text": torch.eye(4)}
    assert choose_rule("auto", Embeddings(emb=emb, labels=labels, text=distinct)) == "pair"
    assert choose_rule("auto", Embeddings(emb=emb, labels=labels, text=repeated)) == "label"
    with pytest.raises(ValueError, match="carry no label"):
        choose_rule("label", Embeddings(emb=emb, labels=torch.tensor([0, -1, 0, 1])))
    # under the label rule a query whose top hit is another sample of its label scores
    swapped = {"image": torch.eye(4), "text": torch.eye(4)[[2, 3, 0, 1]]}
    res = score_retrieval(Embeddings(emb=swapped, labels=labels, text=repeated), EvalConfig())
    assert res["rule"] == "label" and res["pairs"]["image->text"]["R@1"] == 1.0
    assert res["chance_R@1"] == 0.5


def test_missing_modalities_only_rank_samples_that_carry_them():
    # samples 0-3 carry image+text, 4-7 audio+text: image<->audio never meet in a sample
    g = torch.Generator().manual_seed(2)
    e = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    present = {
        "image": torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool),
        "text": torch.ones(8, dtype=torch.bool),
        "audio": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool),
    }
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    same = e[[0, 1, 2, 3, 0, 1, 2, 3]]  # audio i+4 embeds like image i
    emb = {"image": same * present["image"][:, None], "text": e, "audio": same * present["audio"][:, None]}
    data = Embeddings(emb=emb, labels=labels, present=present)
    by_pair = score_retrieval(data, EvalConfig(match="pair"))["pairs"]
    assert "image->audio" not in by_pair  # no sample has both: nothing to rank under the own-pair rule
    assert by_pair["image->text"] == {**by_pair["image->text"], "R@1": 1.0, "queries": 4, "targets": 8}
    by_label = score_retrieval(data, EvalConfig(match="label"))["pairs"]
    # the emergent pair under the label rule: image i and audio i+4 share a label and an embedding
    assert by_label["image->audio"] == {**by_label["image->audio"], "R@1": 1.0, "queries": 4, "targets": 4}
    assert sample_for_matrix(data, "image", "audio").numel() == 0
    assert sample_for_matrix(data, "text", "image").tolist() == [0, 1, 2, 3]
