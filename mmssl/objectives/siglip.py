"""SigLIP: the sigmoid pairwise loss between two modalities (any pair), exact across ranks.

Every (row i of side a, row j of side b) of the global batch is its own binary question, "do these
two belong together?", answered by a logit with a learned scale t and bias::

    logits[i, j] = t * a_i . b_j + bias
    loss = -1/n * sum_i sum_j log sigmoid(z_ij * logits[i, j]),   z_ij = +1 if i == j else -1

with i and j running over the *valid* rows (both sides of the row present) and n the number of valid
rows in the global batch. Absent rows take no part, neither as positives nor as negatives.

No softmax couples a row's columns, so the double sum splits into blocks: each rank scores its own a
rows against one block of b rows at a time, its own block first (it holds the diagonal, the
positives), then every other rank's block (negatives only). The b blocks travel between neighbouring
ranks (open_clip's ``NeighbourExchange`` idea), so logits are formed O(B x B) at a time, never as one
B x N matrix (N = W x B). For backward the plain form keeps each block's logits (B x N in all, as
open_clip does); the chunked form below keeps none.

- ``bidir`` (default): each round sends to both neighbours at once, so after round k a rank holds
  the blocks of ranks r-k and r+k; floor((W-1)/2) such rounds, plus one one-way hop when W-1 is odd.
- ``gather``: one all-gather of every b block (fewer, larger messages; O(W x B) features held).

Each exchange is an autograd Function whose backward sends the gradient back to the block's owner.
A b block travels with its presence flags as one extra column, so a hop is one message and every
rank learns n (the sum of all flags) without another collective.

Normalisation: each rank returns W/n times the sum over its own rows. The engine averages gradients
(and logged losses) over ranks, so what it optimises is exactly the loss above over the whole global
batch, as one process holding every row would compute it (the 2-rank test checks this). open_clip
divides by the local batch size instead, which is the same thing when every row is present.

Chunked form (``chunk_size`` > 0) for large local batches: rows of a are scored ``chunk_size`` at a
time, each chunk recomputed in backward (activation checkpointing), so the logits held at once are
O(chunk_size x B) and only features are kept for backward (one more logit matmul per block). It uses log sigmoid(-x) = -softplus(x) and softplus(-x) = softplus(x) - x:
loss_sum = sum softplus(logits) over valid pairs - sum of the valid diagonal logits.

Axis legend: B rows per rank, C rows of one b block (= B), K rows per chunk, E embedding (+1 with the
presence flag column), W world size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Exchange = Literal["bidir", "gather"]


def bias_for_batch(global_batch: int) -> float:
    """log(p / (1 - p)) with p = 1 / global_batch: the initial bias that makes the mean predicted
    probability match the share of positives (open_clip issue 650), = -log(global_batch - 1)."""
    return -math.log(max(global_batch - 1, 1))


def _p2p(sends: list[tuple[Tensor, int]], sources: list[int]) -> list[Tensor]:
    """Send each tensor to its rank and receive one tensor (shaped like the first sent) from each
    source, all in one batch of point-to-point operations."""
    like = sends[0][0]
    received = [torch.empty_like(like) for _ in sources]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst) for t, dst in sends]
    ops += [dist.P2POp(dist.irecv, buf, src) for buf, src in zip(received, sources, strict=True)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class ShiftBlock(torch.autograd.Function):
    """Send ``x`` to rank ``dst`` and receive the same-shaped block from rank ``src``. Backward: the
    gradient of the received block goes back to ``src``; ``x``'s gradient comes back from ``dst``."""

    @staticmethod
    def forward(ctx, x: Tensor, src: int, dst: int) -> Tensor:  # type: ignore[override]
        ctx.src, ctx.dst = src, dst
        return _p2p([(x, dst)], [src])[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _p2p([(grad, ctx.src)], [ctx.dst])[0], None, None


class SwapWithNeighbours(torch.autograd.Function):
    """Send ``to_left`` to rank ``left`` and ``to_right`` to rank ``right`` at once; receive one block
    from each. The backward is the same exchange applied to the gradients (W >= 3: left != right)."""

    @staticmethod
    def forward(ctx, to_left: Tensor, to_right: Tensor, left: int, right: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.left, ctx.right = left, right
        from_left, from_right = _p2p([(to_left, left), (to_right, right)], [left, right])
        return from_left, from_right

    @staticmethod
    def backward(ctx, g_left: Tensor, g_right: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        to_left, to_right = _p2p([(g_left, ctx.left), (g_right, ctx.right)], [ctx.left, ctx.right])
        return to_left, to_right, None, None


def block_loss_plain(
    a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, valid_a: Tensor, valid_b: Tensor, diagonal: bool
) -> Tensor:
    """Sum of -log sigmoid(z * logits) over the valid (row, column) pairs of one block."""
    logits = (scale * a @ b.T + bias).float()  # [B, C]
    z = 2 * torch.eye(*logits.shape, device=a.device) - 1 if diagonal else -torch.ones_like(logits)
    keep = valid_a[:, None] & valid_b[None, :]  # [B, C]
    return torch.where(keep, -F.logsigmoid(z * logits), 0.0).sum()


def _chunk_loss(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Tensor,
    valid_a: Tensor,
    valid_b: Tensor,
    start: int,
    diagonal: bool,
) -> Tensor:
    logits = (scale * a @ b.T + bias).float()  # [K, C]
    keep = valid_a[:, None] & valid_b[None, :]  # [K, C]
    total = torch.where(keep, F.softplus(logits), 0.0).sum()
    if diagonal:  # row start + k of this rank is the positive of column start + k
        rows = torch.arange(a.shape[0], device=a.device)
        positive = logits[rows, start + rows]  # [K]
        total = total - torch.where(valid_a & valid_b[start + rows], positive, 0.0).sum()
    return total


def block_loss_chunked(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Tensor,
    valid_a: Tensor,
    valid_b: Tensor,
    diagonal: bool,
    chunk_size: int,
) -> Tensor:
    """:func:`block_loss_plain` in the softplus form, ``chunk_size`` rows of a at a time, each chunk's
    logits recomputed in backward rather than kept."""
    total = a.new_zeros((), dtype=torch.float32)
    for start in range(0, a.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            _chunk_loss, a[rows], b, scale, bias, valid_a[rows], valid_b, start, diagonal, use_reentrant=False
        )
    return total


class SigLipLoss(nn.Module):
    """The loss of one pair on this rank; the scale and bias are the caller's (one pair's parameters).
    Rows per rank must be equal on every rank (the blocks are exchanged as fixed-shape buffers)."""

    def __init__(
        self, *, rank: int = 0, world_size: int = 1, exchange: Exchange = "bidir", chunk_size: int = 0
    ):
        super().__init__()
        assert exchange in ("bidir", "gather"), exchange
        self.rank, self.world_size, self.exchange, self.chunk_size = rank, world_size, exchange, chunk_size

    def remote_blocks(self, packed: Tensor) -> list[Tensor]:
        """``[C, E+1]`` this rank's b block with its flags -> every other rank's block, with gradient."""
        w, r = self.world_size, self.rank
        if self.exchange == "gather":
            blocks = dist_fn.all_gather(packed)
            return [blk for i, blk in enumerate(blocks) if i != r]
        left, right = (r - 1) % w, (r + 1) % w
        out = []
        to_left = to_right = packed
        rounds, one_way = divmod(w - 1, 2)
        for _ in range(rounds):
            from_left, from_right = SwapWithNeighbours.apply(to_left, to_right, left, right)
            out += [from_left, from_right]
            # keep each block moving the way it came: what came from the left goes on to the right
            to_left, to_right = from_right, from_left
        if one_way:
            out.append(ShiftBlock.apply(to_right, left, right))
        return out

    def block(
        self, a: Tensor, packed: Tensor, scale: Tensor, bias: Tensor, valid: Tensor, diagonal: bool
    ) -> Tensor:
        b, valid_b = packed[:, :-1], packed[:, -1].detach() > 0.5  # [C, E], [C]
        if self.chunk_size and self.chunk_size < a.shape[0]:
            return block_loss_chunked(a, b, scale, bias, valid, valid_b, diagonal, self.chunk_size)
        return block_loss_plain(a, b, scale, bias, valid, valid_b, diagonal)

    def forward(self, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, valid: Tensor) -> Tensor:
        """``a``, ``b``: ``[B, E]`` normalised features of the pair's two sides; ``valid``: ``[B]`` rows
        where both are present. Returns this rank's share: W / n * (its rows' loss sum)."""
        return self.counted(a, b, scale, bias, valid)[0]

    def counted(
        self, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The loss as ``forward`` gives it, and n, the valid rows of the global batch (a float tensor,
        the same on every rank: counted from the blocks the exchange carries anyway, no extra sync)."""
        packed = torch.cat([b, valid[:, None].to(b.dtype)], dim=1)  # [C, E+1]
        total = self.block(a, packed, scale, bias, valid, diagonal=True)
        n_valid = valid.sum()
        if self.world_size > 1:
            for remote in self.remote_blocks(packed):
                total = total + self.block(a, remote, scale, bias, valid, diagonal=False)
                n_valid = n_valid + (remote[:, -1].detach() > 0.5).sum()
        return total * (self.world_size / n_valid.clamp(min=1)), n_valid.float()
