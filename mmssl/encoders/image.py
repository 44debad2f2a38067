"""Image tower: a ViT over square patches of an RGB image.

Axis legend: B batch, C channels, H/W pixels, h/w patch grid, L = h*w patches, D width, E embedding.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from mmssl.config import ImageTowerConfig
from mmssl.encoders.common import PatchTransformer


class ImageTower(PatchTransformer):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__(
            num_patches=cfg.num_patches,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            embed_dim=embed_dim,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.patch_size
        return side, side

    @property
    def patch_dim(self) -> int:
        return 3 * self.cfg.patch_size**2

    def embed_patches(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W] -> [B, L, D]``: the patch convolution as one matmul over flattened patches
        (the same weights and result; about twice as fast as the convolution on CPU)."""
        assert x.shape[-2:] == (self.cfg.image_size,) * 2, f"image of shape {tuple(x.shape)}"
        p = self.cfg.patch_size
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)  # [B, L, 3*p*p]
        return patches @ rearrange(self.conv1.weight, "d c p1 p2 -> (c p1 p2) d")

    def patchify(self, x: Tensor) -> Tensor:
        """Pixels per patch, in token order: ``[B, 3, H, W] -> [B, L, p*p*3]`` (targets for masked modelling)."""
        p = self.cfg.patch_size
        return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
