"""What a person would rather look at: loss curves and a similarity matrix as PNG, the evaluation as
HTML (retrieval, zero-shot and linear-probe tables, with the pictures), next to the run."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib
import numpy as np
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves_png(metrics: list[dict], out: str | Path) -> Path | None:
    """One panel with the total loss and every term logged under a ``*_loss`` name."""
    if not metrics:
        return None
    names = sorted({k for row in metrics for k in row if k.endswith("loss")})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        xs = [row["step"] for row in metrics if name in row]
        ys = [row[name] for row in metrics if name in row]
        ax.plot(xs, ys, label=name, linewidth=2.2 if name == "loss" else 1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def similarity_png(
    query_emb: Tensor, target_emb: Tensor, names: list[str], out: str | Path, *, query: str, target: str
) -> Path:
    """Cosine similarities ``[n, n]`` of n samples' two modalities (row i and column i: one sample)."""
    sims = (query_emb @ target_emb.T).numpy()  # [n, n]
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.5 + 0.42 * n, 1.2 + 0.42 * n))
    im = ax.imshow(sims, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel(target)
    ax.set_ylabel(query)
    ax.set_title(f"cosine similarity, {query} vs {target}", fontsize=10)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=5.5, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def confusion_png(matrix: list[list[int]], names: list[str], out: str | Path) -> Path:
    """The confusion matrix ``[C, C]`` (row = true class, column = predicted), each row shaded by the
    share of that class's samples, with the counts written in."""
    counts = np.asarray(matrix, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * n, 1.6 + 0.45 * n))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (row share)", fontsize=10)
    if n <= 40:
        for i in range(n):
            for j in range(n):
                color = "w" if shares[i, j] > 0.5 else "k"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _num(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def eval_html(
    results: dict,
    out: str | Path,
    *,
    title: str = "mmssl evaluation",
    loss_png: str | None = None,
    similarity_png: str | None = None,
) -> Path:
    """One page: the retrieval table (and its rule), zero-shot and probe tables, the pictures."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    rule = "same label" if results["rule"] == "label" else "own pair"
    parts.append(
        f"<h2>Retrieval</h2><p>{results['samples']} held-out samples ({html.escape(str(results.get('shards', '')))});"
        f" a hit is a retrieved item under the <b>{rule}</b> rule; chance R@1 = {results['chance_R@1']:.3f}.</p>"
    )
    if results["pairs"]:
        ks = [k for k in next(iter(results["pairs"].values())) if k.startswith("R@")]
        rows = [
            [name, *(_num(m[k]) for k in ks), _num(m["median_rank"], ".1f"), str(m.get("queries", ""))]
            for name, m in results["pairs"].items()
        ]
        parts.append(_table(["query → target", *ks, "median rank", "queries"], rows))
    zs = results.get("zeroshot")
    if zs is not None:
        parts.append("<h2>Zero-shot classification</h2>")
        if "skipped" in zs:
            parts.append(f"<p>skipped: {html.escape(zs['skipped'])}</p>")
        else:
            parts.append(
                f"<p>{len(zs['classes'])} classes ({html.escape(', '.join(zs['classes']))}), "
                f"{len(zs['templates'])} prompt templates.</p>"
            )
            rows = [
                [m, _num(s["top1"]), _num(s["top5"]), _num(s["mean_per_class_recall"]), str(s["samples"])]
                for m, s in zs["modalities"].items()
            ]
            parts.append(_table(["modality", "top-1", "top-5", "mean per-class recall", "samples"], rows))
    if results.get("probe"):
        parts.append(
            "<h2>Linear probe</h2><p>Logistic regression on frozen embeddings of the train split.</p>"
        )
        rows = [
            [m, _num(s["top1"]), _num(s["mean_per_class_recall"]), f"{s['C']:g}", str(s["train_samples"])]
            for m, s in results["probe"].items()
        ]
        parts.append(_table(["modality", "top-1", "mean per-class recall", "C", "train samples"], rows))
    if similarity_png:
        parts.append(
            f'<h2>Similarity of a sample</h2><img src="{html.escape(similarity_png)}" alt="similarity">'
        )
    if loss_png:
        parts.append(f'<h2>Training loss</h2><img src="{html.escape(loss_png)}" alt="loss curves">')
    return _page(title, parts, out)


def classification_html(
    results: dict,
    out: str | Path,
    *,
    title: str = "mmssl fine-tuned classifier",
    confusion: str | None = None,
    loss_png: str | None = None,
) -> Path:
    """One page for a fine-tuned run: the headline figures, per-class recall, the confusion matrix."""
    c = results["classification"]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append(
        f"<h2>Classification</h2><p>{c['samples']} held-out samples "
        f"({html.escape(str(results.get('shards', '')))}), {len(c['classes'])} classes; the "
        f"{html.escape(results.get('tower', ''))} tower and its head.</p>"
    )
    parts.append(
        _table(
            ["top-1", f"top-{c['top_k']}", "macro-F1", "mean per-class recall", "samples"],
            [
                [
                    _num(c["top1"]),
                    _num(c["top5"]),
                    _num(c["macro_f1"]),
                    _num(c["mean_per_class_recall"]),
                    str(c["samples"]),
                ]
            ],
        )  # fmt: skip
    )
    rows = [[name, _num(r)] for name, r in c["per_class_recall"].items()]
    parts.append("<h2>Per-class recall</h2>" + _table(["class", "recall"], rows))
    if confusion:
        parts.append(f'<h2>Confusion matrix</h2><img src="{html.escape(confusion)}" alt="confusion matrix">')
    if loss_png:
        parts.append(f'<h2>Training loss</h2><img src="{html.escape(loss_png)}" alt="loss curves">')
    return _page(title, parts, out)


def _page(title: str, parts: list[str], out: str | Path) -> Path:
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #bbb;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body>{"".join(parts)}</body></html>
"""
    Path(out).write_text(page)
    return Path(out)
