"""Locking towers (LiT): ``model.<tower>.lock=true`` freezes a tower except its last
``unlocked_groups`` layer groups, counted from the head as open_clip's ``lock`` counts them.

A tower's groups, input to output: the embeddings (patch or token embedding, class token, position
embedding, the pre-norm), each transformer block but the last, the last block with the final norm, the
projection. ``unlocked_groups=1`` trains the projection only; ``depth + 2`` trains everything. A timm
or Hugging Face tower has two groups: its whole trunk, then mmssl's projection.

Locked parameters get ``requires_grad=False`` before the engine is built, so they get no gradients and
the optimizer (mmssl/engine.py builds it from trainable parameters only) holds no state for them:
ZeRO partitions only the trainable ones. Our towers normalise with LayerNorm, which keeps no running
statistics, so there are no norm statistics to fix (a BatchNorm tower would need ``eval()`` here: a
locked timm convnet's BatchNorm statistics still move in training).
"""

from __future__ import annotations

from torch import nn

from mmssl.config import ModelConfig

HEADS = ("proj", "text_projection")
FINAL_NORMS = ("ln_post.", "ln_final.")


def layer_groups(tower: nn.Module) -> list[list[nn.Parameter]]:
    """The tower's parameters in open_clip's lock groups, input to output."""
    named = dict(tower.named_parameters())
    head = [p for n, p in named.items() if n in HEADS]
    if tower.kind != "native":  # a timm or Hugging Face trunk is one group (config.py allows 0 or 1 open)
        return [[p for n, p in named.items() if n not in HEADS], head]
    final = [p for n, p in named.items() if n.startswith(FINAL_NORMS)]
    blocks = [list(block.parameters()) for block in tower.transformer.resblocks]
    grouped = {id(p) for p in head + final} | {id(p) for block in blocks for p in block}
    embeddings = [p for p in named.values() if id(p) not in grouped]
    return [embeddings, *blocks[:-1], blocks[-1] + final, head]


def lock_towers(model: nn.Module, cfg: ModelConfig) -> None:
    """Freeze every tower whose config says ``lock``, but for its last ``unlocked_groups`` groups."""
    for name in cfg.modalities:
        tower_cfg = getattr(cfg, name)
        if tower_cfg.lock:
            lock_tower(getattr(model, name), tower_cfg.unlocked_groups)


def lock_tower(tower: nn.Module, unlocked: int = 0) -> None:
    """Freeze ``tower`` but for its last ``unlocked`` groups (0: all of it)."""
    groups = layer_groups(tower)
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= len(groups) - unlocked)


def describe(module: nn.Module) -> str:
    """ "1.23M parameters" or, with locked ones, "1.23M parameters (0.45M train)" for the start-up line."""
    # ZeRO-3 leaves each parameter an empty placeholder: its size is ds_numel
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in module.parameters()]
    total, trainable = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
    return f"{total / 1e6:.2f}M parameters" + (
        f" ({trainable / 1e6:.2f}M train)" if trainable < total else ""
    )
