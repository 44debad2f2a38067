"""Self-attention on ``scaled_dot_product_attention``, inside open_clip's transformer blocks.

open_clip's ``ResidualAttentionBlock`` holds an ``nn.MultiheadAttention``, whose Python wrapper packs
and unpacks heads with several copies and, for a causal or padded text, needs a materialised float
mask (``[B*H, L, L]`` for per-sample padding). :class:`SelfAttention` takes its place: one fused QKV
projection, one SDPA call (``is_causal`` for causal text, a ``[B, 1, 1, L]`` mask broadcast over
heads and queries for padding), one output projection. Its parameters have nn.MultiheadAttention's
names and layout, so state dicts, checkpoints and open_clip exports are unchanged;
``tests/test_encoders.py`` checks forward and backward parity with nn.MultiheadAttention.

Optional dropout (BERT's places, training only): on the attention weights inside SDPA and on both
residual branches of every block (open_clip's blocks have none; its identity ``ls_1``/``ls_2``
layer-scale slots take an ``nn.Dropout``, which holds no parameters, so state dicts stay the same).

Axis legend: B batch, L tokens, H heads, Dh head width, D = H*Dh width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.transformer import Transformer
from torch import Tensor, nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, *, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # [q; k; v] rows
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def adopt(
        cls, mha: nn.MultiheadAttention, *, causal: bool = False, dropout: float = 0.0
    ) -> SelfAttention:
        """Take over an initialised nn.MultiheadAttention's parameters (same values, same names)."""
        assert mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
        attn = cls.__new__(cls)
        nn.Module.__init__(attn)
        attn.heads, attn.causal, attn.dropout = mha.num_heads, causal, dropout
        attn.in_proj_weight, attn.in_proj_bias, attn.out_proj = (
            mha.in_proj_weight,
            mha.in_proj_bias,
            mha.out_proj,
        )
        return attn

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """nn.MultiheadAttention's call as open_clip's block makes it, for self-attention: ``query``
        ``[B, L, D]`` (open_clip passes the same tensor as key and value; they are not read, since under
        ZeRO-3 DeepSpeed's hooks hand them over as other tensor objects); ``attn_mask`` additive,
        broadcastable to ``[B, H, L, L]``."""
        assert key is None or key.shape == query.shape, "self-attention only"
        assert not need_weights, "SDPA does not return attention weights"
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        q, k, v = rearrange(qkv, "b l (n h d) -> n b h l d", n=3, h=self.heads).unbind(0)  # [B, H, L, Dh]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=self.causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, L, Dh]
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)")), None


def sdpa_transformer(
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    *,
    causal: bool = False,
    grad_checkpointing: bool = False,
    dropout: float = 0.0,
) -> Transformer:
    """open_clip's pre-norm ``Transformer`` (batch first) with :class:`SelfAttention` in every block,
    initialised exactly as open_clip initialises it; ``dropout`` > 0 adds dropout (module docstring)."""
    transformer = Transformer(width, depth, heads, mlp_ratio, batch_first=True)
    for block in transformer.resblocks:
        block.attn = SelfAttention.adopt(block.attn, causal=causal, dropout=dropout)
        if dropout > 0:
            assert isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)
            block.ls_1, block.ls_2 = nn.Dropout(dropout), nn.Dropout(dropout)  # on the residual branches
    transformer.grad_checkpointing = grad_checkpointing
    return transformer
