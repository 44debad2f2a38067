"""Cached gradient accumulation (``objectives.contrastive.accumulate=cached``): the contrastive loss of
a whole accumulation window, at the memory of one micro-batch (GradCache, Gao et al. 2021; open_clip's
``--accum-freq``).

The contrastive loss couples the rows of a batch: each row's negatives are the other rows. Plain
accumulation scores each micro-batch against its own negatives only. Here an optimizer step over a
window of K micro-batches runs in three phases:

1. each micro-batch through the towers without gradients: its embeddings are kept, with the masked
   terms (so a non-finite window is skipped before anything is backpropagated);
2. the contrastive loss over all K micro-batches at once (gathered across ranks as usual), and the
   view objectives' NT-Xent over the window's view projections (their negatives span the window too),
   and their gradient w.r.t. the kept embeddings, projections and logit scales;
3. each micro-batch again, with gradients: backward of ``sum(fresh embeddings * their slice of that
   gradient)`` (and the same for the projections) plus the micro-batch's own masked terms; the
   scales' gradient rides on the first micro-batch only.

The parameters' gradient is then the one of a single batch of the window's rows (same masks: they are
seeded by (seed, rank, step, micro), and torch's random state is replayed for the second pass).

Axis legend: K micro-batches in a window, B rows of one, E embedding dim, P view projection dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmssl import engine
from mmssl.task import Task, WindowGradients


def train_window(
    eng: engine.Engine, batches: list[dict[str, Any]], *, step: int, poison: bool = False
) -> dict[str, Tensor] | None:
    """One optimizer step over the K micro-batches of a window (K = optim.grad_accum_steps). Returns the
    window's loss and terms for the log, or None when the loss was not finite on some rank: then no rank
    ran backward or step."""
    task: Task = eng.module
    device = eng.info.device
    rng, passes = [], []
    with torch.no_grad():
        for micro, batch in enumerate(batches):
            rng.append(_rng_state(device))
            passes.append(eng(batch, step=step, micro=micro, embed_only=True))
    embeddings, present = _window_embeddings(task, passes, batches)  # {modality: [K*B, E]}, {modality: [K*B]}
    views = _window_views(passes, batches)  # {modality: ([K*B, P], [K*B, P])}
    scales = {name: s.detach().requires_grad_() for name, s in passes[0]["scales"].items()}
    biases = {name: b.detach().requires_grad_() for name, b in passes[0]["biases"].items()}
    with torch.enable_grad():
        contrastive_terms = task.contrastive_loss(embeddings, present, scales, biases)
        view_terms = task.view_terms(views, present)
    weighted = task.cfg.objectives.contrastive.loss.at(step) * contrastive_terms["contrastive_loss"]
    weighted = task.add_local_terms(weighted, view_terms, step)  # + the weighted view terms
    loss = weighted.detach() + torch.stack([p["masked_loss"] for p in passes]).mean()
    if poison:  # a fault drill (train.inject_nonfinite_at)
        loss = loss * float("nan")
    eng.watch(loss)
    if not eng.window_finite():  # the step's one host sync, before any backward
        return None

    # The engine divides each micro-batch's loss by K, which averages the masked terms over the window;
    # each micro-batch's slice of the window's gradient is already its whole share: scale it back up.
    # Leaves are keyed (kind, name[, view]); a leaf the loss does not reach gets no gradient.
    leaves = {("embeddings", m): e for m, e in embeddings.items()}
    leaves |= {("views", m, i): v for m, pair in views.items() for i, v in enumerate(pair)}
    leaves |= {("scales", n): s for n, s in scales.items()} | {("biases", n): b for n, b in biases.items()}
    grads = torch.autograd.grad(weighted * eng.loss_divisor, list(leaves.values()), allow_unused=True)
    grad = {key: g for key, g in zip(leaves, grads, strict=True) if g is not None}
    stepped, start = False, 0
    for micro, batch in enumerate(batches):
        _set_rng_state(rng[micro], device)
        rows, start = slice(start, start + _rows(batch)), start + _rows(batch)  # this micro-batch's rows
        window = _micro_gradients(grad, rows, batch, first=micro == 0)
        # the window's loss is checked above: these per-micro-batch surrogates need no second check
        eng.backward(eng(batch, step=step, micro=micro, window=window)["loss"], watch=False)
        stepped = eng.step() == "stepped"
    assert stepped, "a cached window must end at the engine's accumulation boundary"

    out = {"loss": loss, **{name: value.detach() for name, value in (contrastive_terms | view_terms).items()}}
    for name in passes[0]:
        if name not in ("embeddings", "views", "scales", "biases", "masked_loss"):  # local terms, averaged
            out[name] = torch.stack([p[name] for p in passes if name in p]).mean()
    out.update({f"logit_scale_{name}": s.detach() for name, s in scales.items()})
    out.update({f"logit_bias_{name}": b.detach() for name, b in biases.items()})
    return {**out, "stepped": True}


def _micro_gradients(
    grad: dict[tuple, Tensor], rows: slice, batch: dict[str, Any], *, first: bool
) -> WindowGradients:
    """One micro-batch's share of the window's gradient ``grad`` (keyed as the leaves in train_window):
    its ``rows`` of the embeddings' and view projections', and the scales' and biases' on the ``first``
    micro-batch only, so that they count once."""

    def of(kind: str) -> dict[str, Tensor]:
        return {key[1]: g for key, g in grad.items() if key[0] == kind}

    return WindowGradients(
        embeddings={m: g[rows] for m, g in of("embeddings").items() if m in batch},
        views={m: (grad[("views", m, 0)][rows], grad[("views", m, 1)][rows])
               for m in batch if ("views", m, 0) in grad},
        scales=of("scales") if first else {},
        biases=of("biases") if first else {},
    )  # fmt: skip


def _rows(batch: dict[str, Any]) -> int:
    return len(batch["__key__"])


def _window_embeddings(
    task: Task, passes: list[dict[str, Any]], batches: list[dict[str, Any]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The window's embeddings ``{modality: [K*B, E]}`` as leaves that take a gradient, and their presence
    ``{modality: [K*B]}``. A micro-batch without some modality gives it zero rows marked absent."""
    rows = [_rows(b) for b in batches]
    embeddings, present = {}, {}
    for m in task.model.modalities:
        kept = [p["embeddings"].get(m) for p in passes]
        if all(e is None for e in kept):
            continue
        embeddings[m] = _window_leaf(kept, rows)  # [K*B, E]
        present[m] = torch.cat(
            [b["present"][m] if m in b["present"] else embeddings[m].new_zeros(n, dtype=torch.bool)
             for b, n in zip(batches, rows, strict=True)]
        )  # fmt: skip
    return embeddings, present


def _window_views(
    passes: list[dict[str, Any]], batches: list[dict[str, Any]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """The window's view projections ``{modality: ([K*B, P], [K*B, P])}`` as leaves that take a gradient
    (zero rows for a micro-batch without the modality: its presence, from the batch, is all False)."""
    rows = [_rows(b) for b in batches]
    modalities = dict.fromkeys(m for p in passes for m in p["views"])
    return {
        m: tuple(_window_leaf([p["views"][m][i] if m in p["views"] else None for p in passes], rows)
                 for i in (0, 1))
        for m in modalities
    }  # fmt: skip


def _window_leaf(kept: list[Tensor | None], rows: list[int]) -> Tensor:
    """Micro-batches' ``[B, X]`` tensors (None: zeros of its ``rows``) -> the window's ``[K*B, X]`` as a leaf
    that takes a gradient."""
    like = next(t for t in kept if t is not None)
    parts = [like.new_zeros(n, like.shape[1]) if t is None else t for t, n in zip(kept, rows, strict=True)]
    return torch.cat(parts).requires_grad_()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
