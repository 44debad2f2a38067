"""What a person would rather look at: loss curves as PNG and retrieval results as HTML, next to the run."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

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


def retrieval_html(
    results: dict, out: str | Path, *, title: str = "mmssl retrieval", loss_png: str | None = None
) -> Path:
    ks = [k for k in next(iter(results["pairs"].values())) if k.startswith("R@")]
    rows = "".join(
        "<tr><td>"
        + html.escape(name)
        + "</td>"
        + "".join(f"<td>{m[k]:.3f}</td>" for k in ks)
        + f"<td>{m['median_rank']:.1f}</td></tr>"
        for name, m in results["pairs"].items()
    )
    rule = "same label" if results["rule"] == "label" else "own pair"
    img = f'<h2>Training loss</h2><img src="{html.escape(loss_png)}" alt="loss curves">' if loss_png else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{results["samples"]} held-out samples; a hit is a retrieved item with the <b>{rule}</b> rule;
chance R@1 = {results["chance_R@1"]:.3f}.</p>
<table><tr><th>query &rarr; target</th>{"".join(f"<th>{k}</th>" for k in ks)}<th>median rank</th></tr>{rows}</table>
{img}</body></html>
"""
    Path(out).write_text(page)
    return Path(out)
