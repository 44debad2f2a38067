"""``mmssl embed``: embeddings of every sample of some shards, per modality, for a vector index.

Layout written under the output folder, per modality the model has and the shards carry::

    <modality>.npy          float32 [N, E], L2-normalised (cosine similarity = dot product)
    <modality>_keys.txt     the sample key of each row, one per line
    <modality>_labels.npy   int64 [N] class ids (-1 unknown), when any is known; class-name labels
                            are mapped as in evaluation (mmssl.eval.labels), and the manifest lists the names
    manifest.json           rows, dims, files, the source checkpoint and shards, "classes" when known

Rows follow the sample keys' sorted order; a sample lacking a modality has no row in that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmssl.config import RunConfig
from mmssl.eval import labels, zeroshot
from mmssl.eval.embeddings import Embeddings, embed_split
from mmssl.model import MultimodalModel


def write_embeddings(data: Embeddings, out_dir: str | Path, *, meta: dict[str, Any]) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {**meta, "normalised": True, "modalities": {}}
    for m, emb in sorted(data.emb.items()):
        rows = data.mask(m).nonzero()[:, 0]  # [N_m]
        if rows.numel() == 0:
            continue
        np.save(out / f"{m}.npy", emb[rows].numpy().astype(np.float32))
        keys = [data.keys[i] for i in rows.tolist()]
        (out / f"{m}_keys.txt").write_text("".join(f"{k}\n" for k in keys))
        entry = {"rows": len(keys), "dim": int(emb.shape[1]), "file": f"{m}.npy", "keys": f"{m}_keys.txt"}
        labels = data.labels[rows]
        if bool((labels >= 0).any()):
            np.save(out / f"{m}_labels.npy", labels.numpy().astype(np.int64))
            entry["labels"] = f"{m}_labels.npy"
        manifest["modalities"][m] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def embed_shards(
    model: MultimodalModel,
    cfg: RunConfig,
    shards: str,
    out_dir: str | Path,
    *,
    device: torch.device,
    source: str,
) -> dict[str, Any]:
    data = embed_split(model, cfg, shards, device=device)
    given, where = zeroshot.find_classes(shards)
    data, _, classes = labels.resolve(data, given, source=where, where=shards)
    meta = {"source": source, "shards": shards, "samples": len(data.keys)}
    return write_embeddings(data, out_dir, meta={**meta, **({"classes": classes} if classes else {})})


def format_embed_summary(manifest: dict[str, Any], out_dir: str | Path) -> str:
    lines = [f"embedded {manifest['samples']} samples of {manifest['shards']} -> {out_dir}"]
    for m, e in manifest["modalities"].items():
        lines.append(f"  {m:<6} {e['rows']:>8} x {e['dim']:<5} {e['file']} + {e['keys']}")
    return "\n".join(lines)
