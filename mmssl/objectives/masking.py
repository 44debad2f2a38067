"""Which tokens an encoder may see: random keep-indices with an exact count per sample.

Every mask is drawn from scores: the ``K = round(L * (1 - ratio))`` lowest-scoring patches of each
sample are kept. Unstructured masking scores each patch independently; structured modes share a
score along a grid axis, so whole time columns and/or frequency rows go together (AudioMAE).
Masks come from an explicit ``torch.Generator``, so they are reproducible from a seed and differ
per sample and per step.

Axis legend: B batch, L patches, K kept, F/T patch-grid rows (frequency) and columns (time).
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor


def keep_count(num_patches: int, ratio: float) -> int:
    return max(1, round(num_patches * (1.0 - ratio)))


def mask_scores(
    batch: int, grid: tuple[int, int], mode: str, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Scores ``[B, F*T]`` (row-major over the grid); lower scores are kept first."""
    f, t = grid

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(device)

    tiebreak = 1e-3 * rand(batch, f, t)  # decides the one partly masked row or column
    if mode == "unstructured":
        scores = rand(batch, f, t)
    elif mode == "time":
        scores = repeat(rand(batch, t), "b t -> b f t", f=f) + tiebreak
    elif mode == "frequency":
        scores = repeat(rand(batch, f), "b f -> b f t", t=t) + tiebreak
    elif mode == "time_frequency":  # a patch survives only if both its row and its column are kept
        rows = repeat(rand(batch, f), "b f -> b f t", t=t)
        cols = repeat(rand(batch, t), "b t -> b f t", f=f)
        scores = torch.maximum(rows, cols) + tiebreak
    else:
        raise ValueError(f"unknown masking mode {mode!r}")
    return scores.flatten(1)


def random_keep(scores: Tensor, ratio: float) -> Tensor:
    """Indices ``[B, K]`` of the kept patches, in ascending order."""
    k = keep_count(scores.shape[1], ratio)
    keep = scores.topk(k, dim=1, largest=False).indices
    return keep.sort(dim=1).values


def mask_from_keep(keep: Tensor, num_patches: int) -> Tensor:
    """``[B, K]`` kept indices -> ``[B, L]`` bool, True where a patch is masked (hidden from the encoder)."""
    masked = torch.ones(keep.shape[0], num_patches, dtype=torch.bool, device=keep.device)
    return masked.scatter(1, keep, False)
