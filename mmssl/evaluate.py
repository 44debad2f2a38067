"""Retrieval between every pair of modalities on held-out data.

A retrieved item is correct under one of two rules, and every result says which it used:
- ``pair``: it is the query's own pair (the same sample);
- ``label``: it carries the query's label. ``auto`` picks this one when captions repeat across samples
  (as in the demo, where many samples say "the number 7"), since then the own-pair rule would punish
  a model for ranking an identical caption first.

Axis legend: N samples, E embedding dim, Q queries in a chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mmssl import data, report
from mmssl.config import EvalConfig, RunConfig
from mmssl.model import MultimodalModel


@dataclass
class Embeddings:
    emb: dict[str, Tensor]  # modality -> [N, E], normalised
    labels: Tensor  # [N], -1 where unknown
    keys: list[str] = field(default_factory=list)
    text: Tensor | None = None  # [N, L] token ids, to detect repeated captions


@torch.no_grad()
def embed_all(
    model: MultimodalModel,
    batches,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Embeddings:
    """Embed every sample of a finite stream of batches."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
    labels, keys, texts = [], [], []
    for batch in tqdm(batches, desc="embed", unit="batch", disable=not progress, leave=False):
        for m in model.modalities:
            if m in batch:
                x = batch[m].to(device)
                x = x.to(dtype) if x.is_floating_point() else x
                chunks[m].append(model.embed(m, x).float().cpu())
        labels.append(batch["label"])
        keys.extend(batch["__key__"])
        if "text" in batch:
            texts.append(batch["text"])
    model.train(was_training)
    if not keys:
        raise ValueError("the evaluation data holds no samples")
    return Embeddings(
        emb={m: torch.cat(c) for m, c in chunks.items() if c},
        labels=torch.cat(labels),
        keys=keys,
        text=torch.cat(texts) if texts else None,
    )


def choose_rule(match: str, data: Embeddings) -> str:
    if match != "auto":
        if match == "label" and bool((data.labels < 0).any()):
            raise ValueError("eval.match=label but some samples carry no label")
        return match
    has_labels = bool((data.labels >= 0).all())
    repeated = data.text is not None and torch.unique(data.text, dim=0).shape[0] < data.text.shape[0]
    return "label" if has_labels and repeated else "pair"


def ranks_of_first_hit(query: Tensor, target: Tensor, correct: Tensor, chunk: int = 1024) -> Tensor:
    """1-based rank of the first correct target for each query. ``correct`` is ``[N, N]`` bool."""
    ranks = []
    for start in range(0, query.shape[0], chunk):
        sims = query[start : start + chunk] @ target.T  # [Q, N]
        order = sims.argsort(dim=1, descending=True)  # [Q, N]
        hits = torch.gather(correct[start : start + chunk], 1, order)  # [Q, N], in ranked order
        ranks.append(hits.float().argmax(dim=1) + 1)  # first True
    return torch.cat(ranks)


def retrieval(query: Tensor, target: Tensor, correct: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    ranks = ranks_of_first_hit(query, target, correct).float()
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.median())
    return out


def evaluate_embeddings(data: Embeddings, cfg: EvalConfig) -> dict:
    rule = choose_rule(cfg.match, data)
    n = data.labels.shape[0]
    if rule == "label":
        correct = data.labels[:, None] == data.labels[None, :]  # [N, N]
    else:
        correct = torch.eye(n, dtype=torch.bool)
    pairs = {
        f"{a}->{b}": retrieval(data.emb[a], data.emb[b], correct, cfg.ks)
        for a, b in permutations(sorted(data.emb), 2)
    }
    classes = int(data.labels.max()) + 1 if rule == "label" else n
    return {
        "rule": rule,
        "samples": n,
        "chance_R@1": _chance_r1(data.labels, rule),
        "classes": classes,
        "pairs": pairs,
    }


def _chance_r1(labels: Tensor, rule: str) -> float:
    """R@1 of a random ranking: 1/N for own-pair, the mean share of a query's label for same-label."""
    n = labels.shape[0]
    if rule == "pair":
        return 1.0 / n
    counts = torch.bincount(labels.clamp(min=0))
    return float((counts[labels.clamp(min=0)].float() / n).mean())


def format_table(results: dict) -> str:
    ks = [k for k in next(iter(results["pairs"].values())) if k.startswith("R@")]
    head = f"{'query -> target':<18}" + "".join(f"{k:>8}" for k in ks) + f"{'med.rank':>10}"
    lines = [
        f"retrieval on {results['samples']} held-out samples; a hit is "
        + ("a sample with the query's label" if results["rule"] == "label" else "the query's own pair")
        + f" (rule '{results['rule']}', chance R@1 = {results['chance_R@1']:.3f})",
        head,
        "-" * len(head),
    ]
    for name, m in results["pairs"].items():
        lines.append(f"{name:<18}" + "".join(f"{m[k]:>8.3f}" for k in ks) + f"{m['median_rank']:>10.1f}")
    return "\n".join(lines)


def run_eval(
    model: MultimodalModel,
    cfg: RunConfig,
    out_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    shards: str | None = None,
) -> dict:
    """Embed the held-out split in this process, print the retrieval table, write eval.json/eval.html."""
    batches = data.loader(cfg, train=False, shards=shards)
    results = evaluate_embeddings(embed_all(model, batches, device=device, dtype=dtype), cfg.eval)
    results["shards"] = shards or cfg.data.eval_shards
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    loss_png = report.loss_curves_png(report.read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
    report.retrieval_html(results, out_dir / "eval.html", loss_png=loss_png.name if loss_png else None)
    print(format_table(results), flush=True)
    return results
