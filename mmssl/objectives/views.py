"""View objectives: an intra-modal contrastive term between two views of each sample.

SimCLR / SLIP for images (two augmentations), SimCSE for text (two dropout passes of one caption),
two crops (and augmentations) of one clip for audio. Each view's pooled tower features go through a
small projection head (SLIP's 3-layer MLP, with LayerNorm in place of BatchNorm so that no statistic
mixes rows: absent rows and other ranks stay out of every row's value), are L2-normalised and scored
with NT-Xent at a fixed temperature: each of the ``2N`` views of the global batch is an anchor whose
positive is the other view of its sample and whose negatives are both views of every other sample.

Features are gathered from every rank with gradients (``torch.distributed.nn.all_gather``, as in the
cross-modal loss); each rank scores its own rows as anchors against all ``2N`` columns, and its value
is scaled so that the engine's mean over ranks is the mean over every valid anchor of the global
batch (the cross-modal loss's ``local_loss`` form). Rows absent for the modality are neither anchors
nor negatives. ``tests/test_views.py`` checks it against a plain NT-Xent and on 2 gloo ranks.

Axis legend: B rows per rank, N = B * world_size rows in all, D tower width, P projection dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import gather_features
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.config import ViewConfig

ABSENT_LOGIT = -1e4  # finite, so an anchor with no valid candidate gives no NaN


def projection_head(width: int, cfg: ViewConfig) -> nn.Sequential:
    """``head_layers`` linear layers ``D -> head_width ... -> out_dim``, LayerNorm + GELU between them."""
    dims = [width] + [cfg.head_width] * (cfg.head_layers - 1) + [cfg.out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < cfg.head_layers - 1:
            layers += [LayerNorm(d_out), nn.GELU()]
    return nn.Sequential(*layers)


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) over two views, gathered across ranks, with a presence mask per row."""

    def __init__(self, temperature: float, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.temperature, self.rank, self.world_size = temperature, rank, world_size

    def gather(self, a: Tensor, b: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, P], [B, P], [B]`` -> the global batch ``[N, P], [N, P], [N]`` (features with gradients)."""
        if self.world_size == 1:
            return a, b, valid
        a_all, b_all = gather_features(
            a, b, gather_with_grad=True, rank=self.rank, world_size=self.world_size
        )
        parts = [torch.empty_like(valid) for _ in range(self.world_size)]
        dist.all_gather(parts, valid)
        return a_all, b_all, torch.cat(parts)

    def forward(self, a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
        """Normalised views ``a``, ``b`` ``[B, P]`` of the same rows, ``valid`` ``[B]`` bool -> this rank's share
        of the loss (its mean over ranks is the mean over the global batch's valid anchors)."""
        rows = a.shape[0]
        a_all, b_all, valid_all = self.gather(a, b, valid)  # [N, P], [N, P], [N]
        n = len(valid_all)
        own = self.rank * rows + torch.arange(rows, device=a.device)  # [B]: this rank's rows among the N
        # candidates of an anchor: the N other-view columns (its positive at `own`), then the N same-view
        # columns (itself at N + own, never a candidate); absent rows are no candidates either
        excluded = ~torch.cat([valid_all, valid_all]).expand(rows, -1).clone()  # [B, 2N]
        excluded[torch.arange(rows, device=a.device), n + own] = True

        def per_anchor(x: Tensor, other: Tensor, same: Tensor) -> Tensor:
            logits = x @ torch.cat([other, same]).T / self.temperature  # [B, 2N]
            logits = logits.masked_fill(excluded, ABSENT_LOGIT)
            return F.cross_entropy(logits, own, reduction="none")  # [B]

        ce = per_anchor(a, b_all, a_all) + per_anchor(b, a_all, b_all)  # [B], both views as anchors
        n_valid = valid_all.sum().clamp(min=1)
        return (ce * valid).sum() / (2 * n_valid) * self.world_size


class ViewObjective(nn.Module):
    """One modality's view term: the head on both views' pooled features, then NT-Xent."""

    def __init__(self, cfg: ViewConfig, modality: str, width: int, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.cfg, self.modality = cfg, modality
        self.head = projection_head(width, cfg)
        self.loss = NTXentLoss(cfg.temperature, rank=rank, world_size=world_size)

    def project(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled tower features of the two views ``[B, D]`` each -> their normalised projections
        ``[B, P]`` each (what cached accumulation keeps per micro-batch, to score a whole window)."""
        return F.normalize(self.head(first), dim=-1), F.normalize(self.head(second), dim=-1)

    def score(self, a: Tensor, b: Tensor, present: Tensor) -> dict[str, Tensor]:
        """Projections ``[R, P]`` each (R rows: a micro-batch's, or a whole window's), presence ``[R]`` ->
        ``{"views_<modality>_loss": t}``."""
        return {f"views_{self.modality}_loss": self.loss(a, b, present)}

    def forward(self, first: Tensor, second: Tensor, present: Tensor) -> dict[str, Tensor]:
        """Pooled tower features of the two views ``[B, D]`` each, presence ``[B]`` ->
        ``{"views_<modality>_loss": t}``."""
        return self.score(*self.project(first, second), present)
