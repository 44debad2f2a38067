"""Evaluation on held-out data: retrieval between every ordered pair of modalities, zero-shot
classification from class names (``mmssl.zeroshot``) and a linear probe (``mmssl.probe``).

A retrieved item is correct under one of two rules, and every result says which it used:
- ``pair``: it is the query's own pair (the same sample);
- ``label``: it carries the query's label. ``auto`` picks this one when captions repeat across samples
  (as in the demo, where many samples say "the number 7"), since then the own-pair rule would punish
  a model for ranking an identical caption first.
Pairs that never met in training are scored like any other (emergent retrieval).

Sharded: with ``world_size > 1`` each rank embeds the shards ``rank::world_size``, the embeddings are
gathered and put in one canonical order (by sample key), so every figure equals the one-process run.
Every rank runs the towers the same number of times (a rank that runs out of batches repeats a
dummy one), as ZeRO-3's gathered parameters need.

Axis legend: N samples, E embedding dim, Q queries in a chunk, T targets, L tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from data_pipelines import expand_shards
from data_pipelines.remote import mask
from mmssl import data, labels, probe, report, zeroshot
from mmssl.config import EvalConfig, RunConfig
from mmssl.encoders.text import PAD_ID
from mmssl.model import MultimodalModel


@dataclass
class Embeddings:
    emb: dict[str, Tensor]  # modality -> [N, E], normalised; rows of samples lacking it are zero
    labels: Tensor  # [N] class ids, -1 where unknown (or a class name not yet mapped: mmssl.labels)
    keys: list[str] = field(default_factory=list)
    present: dict[str, Tensor] = field(default_factory=dict)  # modality -> [N] bool; absent: all rows
    text: Tensor | None = None  # [N, L] token ids, to detect repeated captions
    label_names: list[str] = field(default_factory=list)  # [N] class names, "" where none; empty: none
    shards: list[str] = field(default_factory=list)  # [N] each sample's shard, for messages

    def mask(self, modality: str) -> Tensor:
        """``[N]`` bool: the samples that carry ``modality``."""
        given = self.present.get(modality)
        return torch.ones(self.labels.shape[0], dtype=torch.bool) if given is None else given

    def select(self, index: Tensor) -> Embeddings:
        return Embeddings(
            emb={m: e[index] for m, e in self.emb.items()},
            labels=self.labels[index],
            keys=[self.keys[i] for i in index.tolist()] if self.keys else [],
            present={m: p[index] for m, p in self.present.items()},
            text=None if self.text is None else self.text[index],
            label_names=[self.label_names[i] for i in index.tolist()] if self.label_names else [],
            shards=[self.shards[i] for i in index.tolist()] if self.shards else [],
        )

    def sorted_by_key(self) -> Embeddings:
        """The canonical order (by sample key, stable), the same however the shards were split."""
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        return self.select(torch.tensor(order, dtype=torch.long))


# --------------------------------------------------------------------------------------- embedding


def _any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True when ``flag`` holds on some rank (one tiny all-reduce per call)."""
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _dummy_input(model: MultimodalModel, modality: str) -> Tensor:
    """One all-zero input of the tower's shape: what a rank without data feeds to keep in step."""
    c = model.cfg
    if modality == "image":
        return torch.zeros(1, 3, c.image.image_size, c.image.image_size)  # [1, 3, S, S]
    if modality == "text":
        return torch.zeros(1, c.text.context_length, dtype=torch.long)  # [1, L]
    return torch.zeros(1, c.audio.n_mels, c.audio.n_frames)  # [1, M, F]


@torch.no_grad()
def embed_all(
    model: MultimodalModel,
    batches: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    world_size: int = 1,
) -> Embeddings:
    """Embed every sample of a finite stream of batches, in this process's order.

    Every tower runs on every batch (absent rows are zeroed afterwards), so all ranks make the same
    calls. With ``world_size > 1`` (a process group must exist) a rank whose stream has ended runs
    dummy inputs, discarded, until every rank is done."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
    present: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
    labels, keys, texts, names, shards = [], [], [], [], []
    stream = iter(batches)
    bar = tqdm(desc="embed", unit="batch", disable=not progress, leave=False)
    while True:
        batch = next(stream, None)
        if not _any_rank(batch is not None, world_size, device):
            break
        if batch is None:  # this rank is done, another is not: keep the towers' calls in step
            for m in model.modalities:
                model.embed(m, _to(_dummy_input(model, m), device, dtype))
            continue
        bar.update(1)
        for m in model.modalities:
            if m not in batch:
                continue
            mask = batch.get("present", {}).get(m, torch.ones(len(batch["__key__"]), dtype=torch.bool))
            emb = model.embed(m, _to(batch[m], device, dtype)).float().cpu()  # [B, E]
            chunks[m].append(emb * mask[:, None])
            present[m].append(mask)
        labels.append(batch["label"])
        keys.extend(batch["__key__"])
        names.extend(batch.get("label_name", [""] * len(batch["__key__"])))
        shards.extend(batch.get("__url__", [""] * len(batch["__key__"])))
        if "text" in batch:
            texts.append(batch["text"])
    bar.close()
    model.train(was_training)
    empty = torch.zeros(0, model.cfg.embed_dim)  # a rank without data still names every tower
    return Embeddings(
        emb={m: torch.cat(c) if c else empty for m, c in chunks.items()},
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        keys=keys,
        present={m: torch.cat(p) if p else torch.zeros(0, dtype=torch.bool) for m, p in present.items()},
        text=cat_tokens(texts) if texts else None,
        label_names=names,
        shards=shards,
    )


def cat_tokens(parts: list[Tensor]) -> Tensor:
    """Token batches trimmed to different lengths (data.trim_text), right-padded with the pad id to
    the longest and stacked: [sum B, max L]."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=PAD_ID) for p in parts])


def _to(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = x.to(device)
    return x.to(dtype) if x.is_floating_point() else x


def gather(part: Embeddings, world_size: int) -> Embeddings:
    """Every rank's embeddings, on every rank, in canonical (key) order."""
    if world_size == 1:
        return part.sorted_by_key()
    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, part)  # pickled through gloo/NCCL: fine at evaluation sizes
    text = [p.text for p in parts]
    whole = Embeddings(
        emb={m: torch.cat([p.emb[m] for p in parts]) for m in part.emb},
        labels=torch.cat([p.labels for p in parts]),
        keys=[k for p in parts for k in p.keys],
        present={m: torch.cat([p.present[m] for p in parts]) for m in part.present},
        text=None if any(t is None for t in text) else cat_tokens(text),
        label_names=[n for p in parts for n in p.label_names],
        shards=[u for p in parts for u in p.shards],
    )
    return whole.sorted_by_key()


def embed_split(
    model: MultimodalModel,
    cfg: RunConfig,
    shards: str,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    layout: str | None = None,
) -> Embeddings:
    """Embed one split (read with ``layout``, default ``data.eval_layout``): this rank's shards,
    gathered from all ranks, in canonical order. A rank left without a shard (fewer shards than ranks)
    embeds nothing but keeps in step."""
    has_shard = rank < len(expand_shards(shards))
    batches = (
        data.loader(cfg, train=False, shards=shards, layout=layout, rank=rank, world_size=world_size)
        if has_shard
        else []
    )
    part = embed_all(
        model, batches, device=device, dtype=dtype, progress=progress and rank == 0, world_size=world_size
    )
    whole = gather(part, world_size)
    if not whole.keys:
        raise ValueError(f"the evaluation data {mask(shards)} holds no samples")
    return whole


# --------------------------------------------------------------------------------------- retrieval


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


def retrieval(
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
    out = retrieval(data.emb[a][q_idx], data.emb[b][t_idx], ids[q_idx], ids[t_idx], ks)
    return {**out, "queries": int(q_idx.numel()), "targets": int(t_idx.numel())}


def evaluate_embeddings(data: Embeddings, cfg: EvalConfig) -> dict:
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


def format_table(results: dict) -> str:
    """The retrieval table, then the zero-shot and probe tables when the results hold them."""
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
    if "zeroshot" in results:
        lines += ["", zeroshot.format_table(results["zeroshot"])]
    if "probe" in results:
        lines += ["", probe.format_table(results["probe"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the run


@dataclass(kw_only=True)
class EvalPlan:
    """What to evaluate besides retrieval. None/empty turns a part off."""

    shards: str | None = None  # held-out shards (default: the run's data.eval_shards)
    probe_shards: str | None = None  # train split for the linear probe
    probe_layout: str | None = None  # its layout (default: data.eval_layout)
    # class names, in class-id order (default: classes.json next to the shards, else, for class-name
    # labels, their sorted distinct names): zero-shot's classes, and what names map to (mmssl.labels)
    classes: list[str] | None = None
    templates: tuple[str, ...] = zeroshot.DEFAULT_TEMPLATES
    zeroshot: bool = True
    metrics: Path | None = None  # the run's metrics.jsonl, for the loss curves


def run_eval(
    model: MultimodalModel,
    cfg: RunConfig,
    out_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    shards: str | None = None,
    plan: EvalPlan | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Embed the held-out split (sharded over ``world_size`` ranks of an existing process group, or in
    this process alone) and score it. Every rank runs the towers (ZeRO-3 needs each rank in each
    forward); rank 0 scores, prints the tables and writes eval.json, eval.html and the PNGs, and every
    rank returns its results."""
    plan = plan or EvalPlan()
    shards = shards or plan.shards or cfg.data.eval_shards
    kw = dict(device=device, dtype=dtype, rank=rank, world_size=world_size, progress=progress)
    test = embed_split(model, cfg, shards, **kw)
    train = (
        embed_split(model, cfg, plan.probe_shards, layout=plan.probe_layout, **kw)
        if plan.probe_shards
        else None
    )
    # every rank holds both whole splits: each maps the labels alike, and raises alike on a mistake
    given, source = (plan.classes, "--classes") if plan.classes else zeroshot.find_classes(shards)
    test, train, classes = labels.resolve(
        test, given, source=source, where=shards, probe=train, probe_where=plan.probe_shards or ""
    )
    prompts, prototypes, skipped = None, None, None
    if plan.zeroshot:
        if classes is None:
            skipped = "no class names: pass --classes or put classes.json by the shards"
        elif model.cfg.text is None:
            skipped = "the model has no text tower"
        else:
            prompts = zeroshot.Prompts(classes, plan.templates)
            prototypes = prompts.embed(model, data.tokenizer(cfg), device=device, dtype=dtype)  # [C, E]

    results = None
    if rank == 0:
        results = evaluate_embeddings(test, cfg.eval)
        results["shards"] = mask(shards)  # no URL credentials in the saved results
        if skipped:
            results["zeroshot"] = {"skipped": skipped}
        elif prompts is not None:
            results["zeroshot"] = zeroshot.evaluate(test, prototypes, prompts.classes, prompts.templates)
        if train is not None:
            results["probe"] = probe.evaluate(train, test, progress=progress)
            results["probe_shards"] = mask(plan.probe_shards)
        write_report(results, test, out_dir, plan, class_names=classes)
        print(format_table(results), flush=True)
    if world_size > 1:
        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    return results


def write_report(
    results: dict, test: Embeddings, out_dir: Path, plan: EvalPlan, class_names: list[str] | None
) -> None:
    """eval.json, the similarity matrix of a sample, the loss curves and eval.html that shows them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    metrics = plan.metrics or out_dir / "metrics.jsonl"
    loss_png = report.loss_curves_png(report.read_metrics(metrics), out_dir / "loss.png")
    sim_png = None
    a, b = ("text", "image") if {"text", "image"} <= set(test.emb) else tuple(sorted(test.emb))[:2]
    index = sample_for_matrix(test, a, b)
    if index.numel() >= 2:
        names = [
            class_names[int(y)] if class_names and 0 <= int(y) < len(class_names) else str(int(y))
            for y in test.labels[index]
        ]
        sim_png = report.similarity_png(
            test.emb[a][index], test.emb[b][index], names, out_dir / "similarity.png", query=a, target=b
        )
    report.eval_html(
        results,
        out_dir / "eval.html",
        loss_png=loss_png.name if loss_png else None,
        similarity_png=sim_png.name if sim_png else None,
    )


def sample_for_matrix(data: Embeddings, a: str, b: str, n: int = 16) -> Tensor:
    """Up to ``n`` samples carrying both modalities, taken round-robin over labels (in key order), and
    skipping samples whose ``a`` or ``b`` embedding repeats one already taken (the same image with
    another caption, say); sorted by label."""
    by_label: dict[int, list[int]] = {}
    seen: set[bytes] = set()
    for i in (data.mask(a) & data.mask(b)).nonzero()[:, 0].tolist():
        ea, eb = data.emb[a][i].numpy().tobytes(), data.emb[b][i].numpy().tobytes()
        if ea in seen or eb in seen:
            continue
        seen.update((ea, eb))
        by_label.setdefault(int(data.labels[i]), []).append(i)
    chosen: list[int] = []
    for turn in range(max((len(v) for v in by_label.values()), default=0)):
        chosen += [rows[turn] for rows in by_label.values() if turn < len(rows)]
    chosen = chosen[:n]
    chosen.sort(key=lambda i: (int(data.labels[i]), i))
    return torch.tensor(chosen, dtype=torch.long)
