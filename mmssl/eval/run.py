"""An evaluation run: retrieval (``mmssl.eval.retrieval``), zero-shot classification from class names
(``mmssl.eval.zeroshot``) and a linear probe (``mmssl.eval.probe``) on the embeddings of held-out
shards (``mmssl.eval.embeddings``), written as eval.json and eval.html (``mmssl.eval.report``).

Axis legend: N samples, E embedding dim, C classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from data_pipelines.remote import mask
from mmssl import data
from mmssl.config import RunConfig
from mmssl.eval import labels, probe, report, retrieval, zeroshot
from mmssl.eval.embeddings import Embeddings, embed_split
from mmssl.model import MultimodalModel


@dataclass(kw_only=True)
class EvalPlan:
    """What to evaluate besides retrieval. None/empty turns a part off."""

    shards: str | None = None  # held-out shards (default: the run's data.eval_shards)
    probe_shards: str | None = None  # train split for the linear probe
    probe_layout: str | None = None  # its layout (default: data.eval_layout)
    # class names, in class-id order (default: classes.json next to the shards, else, for class-name
    # labels, their sorted distinct names): zero-shot's classes, and what names map to (mmssl.eval.labels)
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
        results = retrieval.score_retrieval(test, cfg.eval)
        results["shards"] = mask(shards)  # no URL credentials in the saved results
        if skipped:
            results["zeroshot"] = {"skipped": skipped}
        elif prompts is not None:
            results["zeroshot"] = zeroshot.score_zeroshot(
                test, prototypes, prompts.classes, prompts.templates
            )
        if train is not None:
            results["probe"] = probe.score_probe(train, test, progress=progress)
            results["probe_shards"] = mask(plan.probe_shards)
        write_report(results, test, out_dir, plan, class_names=classes)
        print(format_results(results), flush=True)
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


def format_results(results: dict) -> str:
    """The retrieval table, then the zero-shot and probe tables when the results hold them."""
    lines = [retrieval.format_retrieval(results)]
    if "zeroshot" in results:
        lines += ["", zeroshot.format_zeroshot(results["zeroshot"])]
    if "probe" in results:
        lines += ["", probe.format_probe(results["probe"])]
    return "\n".join(lines)
