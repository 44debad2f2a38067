"""The evaluation's embeddings: one type (:class:`Embeddings`) that every evaluation reads, and the
loop that fills it from held-out shards. The bottom of ``mmssl.eval``: it imports none of the others.

Sharded: with ``world_size > 1`` each rank embeds the shards ``rank::world_size``, the embeddings are
gathered and put in one canonical order (by sample key), so every figure equals the one-process run.
Every rank runs the towers the same number of times (a rank that runs out of batches repeats a
dummy one), as ZeRO-3's gathered parameters need.

Axis legend: N samples, E embedding dim, L tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from data_pipelines import expand_shards
from data_pipelines.remote import mask
from mmssl import data
from mmssl.config import RunConfig
from mmssl.encoders.text import PAD_ID
from mmssl.model import MultimodalModel


@dataclass
class Embeddings:
    emb: dict[str, Tensor]  # modality -> [N, E], normalised; rows of samples lacking it are zero
    labels: Tensor  # [N] class ids, -1 where unknown (or a class name not yet mapped: mmssl.eval.labels)
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
    # a rank left without a shard adds nothing, and its missing tokens must not hide the others'
    parts = [p for p in parts if p.keys] or parts[:1]
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
