"""Audio tower: a transformer over patches of a log-mel spectrogram (AST / AudioMAE style).

The loader computes the normalised log-mel (``data_pipelines.transforms``); this tower cuts it into
``patch_freq x patch_time`` patches. Trailing frames that do not fill a patch are dropped.

Axis legend: B batch, F mel bins, T frames, f/t patch grid, L = f*t patches, D width, E embedding.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from mmssl.config import AudioTowerConfig
from mmssl.encoders.common import PatchTransformer


class AudioTower(PatchTransformer):
    def __init__(self, cfg: AudioTowerConfig, embed_dim: int):
        f, t = cfg.grid
        super().__init__(
            num_patches=f * t,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            embed_dim=embed_dim,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        self.cfg = cfg
        patch = (cfg.patch_freq, cfg.patch_time)
        self.conv1 = nn.Conv2d(1, cfg.width, kernel_size=patch, stride=patch, bias=False)

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def patch_dim(self) -> int:
        return self.cfg.patch_freq * self.cfg.patch_time

    def _crop(self, x: Tensor) -> Tensor:
        assert x.shape[-2:] == (self.cfg.n_mels, self.cfg.n_frames), f"spectrogram of shape {tuple(x.shape)}"
        return x[..., : self.cfg.grid[1] * self.cfg.patch_time]  # [B, F, t*patch_time]

    def embed_patches(self, x: Tensor) -> Tensor:
        """``[B, F, T] -> [B, L, D]``: the patch convolution as one matmul over flattened patches."""
        return self.patchify(x) @ rearrange(self.conv1.weight, "d 1 pf pt -> (pf pt) d")

    def patchify(self, x: Tensor) -> Tensor:
        """Values per patch, in token order: ``[B, F, T] -> [B, L, patch_freq*patch_time]``."""
        pf, pt = self.cfg.patch_freq, self.cfg.patch_time
        return rearrange(self._crop(x), "b (f pf) (t pt) -> b (f t) (pf pt)", pf=pf, pt=pt)
