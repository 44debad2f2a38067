"""Towers from timm (the ``towers`` extra): any timm image backbone, or an AST-style spectrogram ViT.

The trunk is ``timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=..., **timm_kwargs)``:
nothing is downloaded, weights come from ``init_from`` (mmssl/pretrained.py). Pooling is timm's own
(``forward_head(pre_logits=True)``: the class token, or the mean of the patch tokens, as the model is
configured); mmssl adds its projection ``proj`` into the shared embedding, as for its native towers.

Masked modelling needs tokens. A timm ``VisionTransformer`` embeds the patches and adds its positions
and prefix tokens (class, registers) the way it always does (its ``patch_embed`` and ``_pos_embed``);
then, as MAE does, only the kept patch tokens go on, behind the prefix tokens, through its blocks and
final norm. Other families (convnets, hybrids) see whole inputs only and refuse masking.

Audio: the normalised log-mel ``[B, F, T]`` is a one-channel ``F x T`` image, cut into patches of
``patch_freq x patch_time`` (the native audio tower's input contract); timm's patch convolution
drops the trailing frames that fill no patch, as the native tower does.

Axis legend: B batch, C channels, H/W pixels (audio: F mel bins, T frames), h/w patch grid,
L = h*w patches, K kept, P prefix tokens, D trunk width, E shared embedding.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from mmssl.config import AudioTowerConfig, ImageTowerConfig
from mmssl.optional import require


def create_trunk(cfg: ImageTowerConfig | AudioTowerConfig, path: str) -> nn.Module:
    """The timm model ``cfg`` names, without classifier and without downloading anything. A name timm
    does not know, or arguments its constructor refuses, are one ValueError naming ``path``'s setting."""
    timm = require("timm", f"{path}.kind=timm")
    if not timm.is_model(cfg.timm_name):
        raise ValueError(
            f"{path}.timm_name={cfg.timm_name!r} is not a timm model (timm.list_models('*vit*') lists some)"
        )
    kwargs = dict(cfg.timm_kwargs)
    if isinstance(cfg, AudioTowerConfig):
        kwargs |= {"img_size": (cfg.n_mels, cfg.n_frames), "in_chans": 1,
                   "patch_size": (cfg.patch_freq, cfg.patch_time)}  # fmt: skip
    else:
        kwargs["img_size"] = cfg.image_size
    try:
        return timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        if "img_size" in str(e) and isinstance(cfg, ImageTowerConfig):  # a convnet: no fixed input size
            del kwargs["img_size"]
            return timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **kwargs)
        raise ValueError(
            f"{path}.timm_kwargs: timm cannot build {cfg.timm_name} with {kwargs}: {e}"
        ) from None


def is_token_based(trunk: nn.Module) -> bool:
    """Whether visible-token selection applies: a timm ViT with fixed-size absolute positions."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(trunk, VisionTransformer) and not trunk.dynamic_img_size


class TimmTower(nn.Module):
    """A timm trunk with mmssl's projection, keyed ``trunk.*`` and ``proj`` in the state dict."""

    kind = "timm"

    def __init__(self, cfg: ImageTowerConfig | AudioTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.audio = isinstance(cfg, AudioTowerConfig)
        self.trunk = create_trunk(cfg, "model.audio" if self.audio else "model.image")
        if cfg.grad_checkpointing:
            self.trunk.set_grad_checkpointing(True)
        self.width = self.trunk.num_features
        self.proj = nn.Parameter(self.width**-0.5 * torch.randn(self.width, embed_dim))
        self.token_based = is_token_based(self.trunk)
        if self.token_based:
            embed = self.trunk.patch_embed
            self.grid: tuple[int, int] = tuple(embed.grid_size)
            self.patch: tuple[int, int] = tuple(embed.patch_size)
            self.num_prefix_tokens: int = self.trunk.num_prefix_tokens
            self.patch_dim = math.prod(self.patch) * (1 if self.audio else 3)

    @property
    def num_patches(self) -> int:
        """Patch tokens per input (1 for a tower without tokens: one input, one feature map)."""
        return self.grid[0] * self.grid[1] if self.token_based else 1

    def _as_image(self, x: Tensor) -> Tensor:
        """Audio ``[B, F, T] -> [B, 1, F, T]``; images as they are."""
        return rearrange(x, "b f t -> b 1 f t") if self.audio else x

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Token features ``[B, P + K, D]`` (prefix tokens first; a tower without tokens: its own feature
        map). ``keep`` ``[B, K]``: indices of the patches the trunk may see; None: all ``L``."""
        x = self._as_image(x)
        if not self.token_based:
            assert keep is None, "masked modelling needs a token-based tower (a timm VisionTransformer)"
            return self.trunk.forward_features(x)
        t, p = self.trunk, self.num_prefix_tokens
        tokens = t._pos_embed(t.patch_embed(x))  # [B, P + L, D], positions added
        if keep is not None:
            patches = torch.gather(tokens[:, p:], 1, repeat(keep, "b k -> b k d", d=tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :p], patches], dim=1)  # [B, P + K, D]
        tokens = t.norm_pre(t.patch_drop(tokens))
        if t.grad_checkpointing and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            tokens = checkpoint_seq(t.blocks, tokens)
        else:
            tokens = t.blocks(tokens)
        return t.norm(tokens)

    def pool(self, features: Tensor) -> Tensor:
        """timm's pooling of the features (class token or mean, as the model is configured): ``[B, D]``."""
        return self.trunk.forward_head(features, pre_logits=True)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.pool(features) @ self.proj  # [B, E]

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_features(x, keep))

    def patchify(self, x: Tensor) -> Tensor:
        """Input values per patch, in token order: ``[B, L, patch_dim]`` (targets for masked modelling)."""
        (h, w), (p1, p2) = self.grid, self.patch
        if self.audio:  # mel bins and trailing frames beyond the grid are not in any patch
            return rearrange(x[:, : h * p1, : w * p2], "b (h p1) (w p2) -> b (h w) (p1 p2)", p1=p1, p2=p2)
        return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p1, p2=p2)
