"""Pieces shared by the towers: a patch-token transformer with an optional keep-index for masking.

Axis legend: B batch, L patch tokens, K kept (visible) tokens, D tower width, E shared embedding dim.
"""

from __future__ import annotations

import torch
from einops import repeat
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.encoders.attention import sdpa_transformer


class PatchTransformer(nn.Module):
    """A ViT trunk over patch tokens, named like open_clip's VisionTransformer.

    Subclasses turn their raw input into patch tokens (``embed_patches``); this class adds positions,
    keeps only the tokens named by ``keep`` (masked modelling), prepends a class token, runs the
    transformer and pools the class token into the shared space.

    What the masked objectives read of a patch tower (timm towers offer the same): ``width``, ``grid``
    (patches along each axis), ``patch_dim`` (values per patch), ``num_prefix_tokens`` (tokens before the
    patches in ``forward_features``' output), ``token_based`` and ``patchify``.
    """

    kind = "native"
    token_based = True
    num_prefix_tokens = 1  # the class token

    def __init__(
        self,
        *,
        num_patches: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        scale = width**-0.5
        self.num_patches = num_patches
        self.width = width
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_patches + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = sdpa_transformer(
            width, depth, heads, mlp_ratio, grad_checkpointing=grad_checkpointing
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def embed_patches(self, x: Tensor) -> Tensor:
        """Raw input -> patch tokens ``[B, L, D]`` (no positions)."""
        raise NotImplementedError  # each tower defines its own patchify

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Token features ``[B, 1 + K, D]`` (class token first). ``keep`` ``[B, K]`` holds the indices of the
        patches the encoder may see; None keeps all ``L``."""
        tokens = self.embed_patches(x) + self.positional_embedding[1:]  # [B, L, D]
        if keep is not None:
            tokens = torch.gather(tokens, 1, repeat(keep, "b k -> b k d", d=tokens.shape[-1]))  # [B, K, D]
        cls = self.class_embedding + self.positional_embedding[0]
        cls = repeat(cls, "d -> b 1 d", b=tokens.shape[0])
        x = torch.cat([cls, tokens], dim=1)  # [B, 1 + K, D]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)

    def pool(self, features: Tensor) -> Tensor:
        """The class token's features: ``[B, 1 + K, D] -> [B, D]``."""
        return features[:, 0]

    def forward_head(self, features: Tensor) -> Tensor:
        """Pool the class token and project: ``[B, 1 + K, D] -> [B, E]``."""
        return self.pool(features) @ self.proj

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_features(x, keep))
