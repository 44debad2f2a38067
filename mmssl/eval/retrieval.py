"""Retrieval between every ordered pair of modalities of held-out embeddings.

A retrieved item is correct under one of two rules, and every result says which it used:
- ``pair``: it is the query's own pair (the same sample);
- ``label``: it carries the query's label. ``auto`` picks this one when captions repeat across samples
  (as in the demo, where many samples say "the number 7"), since then the own-pair rule would punish
  a model for ranking an identical caption first.
Pairs that never met in training are scored like any other (emergent retrieval).

Axis legend: N samples, E embedding dim, Q queries in a chunk, T targets.
"""

from __future__ import annotations

from itertools import permutations

import torch
from torch import Tensor

from mmssl.config import EvalConfig
from mmssl.eval.embeddings import Embeddings


def choose_rule(match: str, data: Embeddings) -> str:
    if match != "auto":
        if match == "label" and bool((data.labels < 0).any()):
            raise ValueError("eval.match=label but some samples carry no label")
        return match
    has_labels = bool((data.labels >= 0).all())
    text = None if data.text is None else data.text[data.mask("text")]
    repeated = text is not None and torch.unique(text, dim=0).shape[0] < text.shape[0]
    return "label" if has_labels and repeated else "pair"


def ranks_of_first_hit(
    query: Tensor, target: Tensor, query_ids: Tensor, target_ids: Tensor, chunk: int = 1024
) -> Tensor:
    """1-based rank of the first target whose id equals the query's id (sample index for the own-pair
    rule, label for the same-label rule). Every query must have at least one matching target."""
    ranks = []
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ target.T  # [Q, T]
        order = sims.argsort(dim=1, descending=True, stable=True)  # [Q, T]
        correct = query_ids[start : start + chunk, None] == target_ids[None, :]  # [Q, T]
        hits = torch.gather(correct, 1, order)  # [Q, T], in ranked order
        assert bool(hits.any(dim=1).all()), "a query without any correct target"
        ranks.append(hits.float().argmax(dim=1) + 1)  # first True
    return torch.cat(ranks)


def recall_at_k(
    query: Tensor, target: Tensor, query_ids: Tensor, target_ids: Tensor, ks: tuple[int, ...]
) -> dict[str, float]:
    ranks = ranks_of_first_hit(query, target, query_ids, target_ids).float()
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.median())
    return out


def pair_retrieval(data: Embeddings, a: str, b: str, rule: str, ks: tuple[int, ...]) -> dict | None:
    """``a -> b`` over the samples carrying ``a`` (queries) and ``b`` (targets); queries without any
    correct target are left out. None when nothing is left to rank."""
    query, target = data.mask(a), data.mask(b)
    if rule == "pair":
        query = query & target
    ids = torch.arange(data.labels.shape[0]) if rule == "pair" else data.labels
    q_idx, t_idx = query.nonzero()[:, 0], target.nonzero()[:, 0]  # [Q], [T]
    q_idx = q_idx[torch.isin(ids[q_idx], ids[t_idx])]
    if q_idx.numel() == 0 or t_idx.numel() < 2:
        return None
    out = recall_at_k(data.emb[a][q_idx], data.emb[b][t_idx], ids[q_idx], ids[t_idx], ks)
    return {**out, "queries": int(q_idx.numel()), "targets": int(t_idx.numel())}


def score_retrieval(data: Embeddings, cfg: EvalConfig) -> dict:
    rule = choose_rule(cfg.match, data)
    n = data.labels.shape[0]
    pairs = {}
    for a, b in permutations(sorted(data.emb), 2):
        scored = pair_retrieval(data, a, b, rule, cfg.ks)
        if scored is not None:
            pairs[f"{a}->{b}"] = scored
    return {
        "rule": rule,
        "samples": n,
        "chance_R@1": _chance_r1(data.labels, rule),
        "classes": int(data.labels.max()) + 1 if rule == "label" else n,
        "pairs": pairs,
    }


def _chance_r1(labels: Tensor, rule: str) -> float:
    """R@1 of a random ranking: 1/N for own-pair, the mean share of a query's label for same-label."""
    n = labels.shape[0]
    if rule == "pair":
        return 1.0 / n
    counts = torch.bincount(labels.clamp(min=0))
    return float((counts[labels.clamp(min=0)].float() / n).mean())


def format_retrieval(results: dict) -> str:
    """The retrieval table of ``score_retrieval``'s results."""
    lines = [
        f"retrieval on {results['samples']} held-out samples; a hit is "
        + ("a sample with the query's label" if results["rule"] == "label" else "the query's own pair")
        + f" (rule '{results['rule']}', chance R@1 = {results['chance_R@1']:.3f})"
    ]
    if results["pairs"]:
        ks = [k for k in next(iter(results["pairs"].values())) if k.startswith("R@")]
        head = f"{'query -> target':<18}" + "".join(f"{k:>8}" for k in ks) + f"{'med.rank':>10}"
        lines += [head, "-" * len(head)]
        for name, m in results["pairs"].items():
            lines.append(f"{name:<18}" + "".join(f"{m[k]:>8.3f}" for k in ks) + f"{m['median_rank']:>10.1f}")
    return "\n".join(lines)
