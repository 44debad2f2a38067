"""Self-distillation from an EMA teacher, data2vec 2.0 style.

The teacher is a copy of the distilled towers, kept in fp32 without gradients, that follows the
student as an exponential moving average after every optimizer step (:class:`EmaTeacher`). It sees
each input whole; its targets are the outputs of its last ``top_k`` blocks, each instance-normalised
(per channel over the tokens of a sample), averaged. The student's masked pass (the one the masked
objectives and the contrastive loss already share) is regressed onto them at the masked positions
through a light decoder (:class:`DistillObjective`): for patch towers the MAE decoder (a small
transformer that puts the kept tokens back among mask tokens, ``masked_patches.PatchDecoder``), for
text a two-layer head on the corrupted positions (the [MASK] tokens are already in the sequence). One
student pass, one teacher forward under ``no_grad``.

data2vec 2.0 takes each block's FFN output before the last residual; here a block's output (the
residual stream) is taken, which open_clip's block returns as it is. Its conv decoder is a
transformer decoder here, shaped like the MAE one.

The teacher is deliberately not a submodule of the task: DeepSpeed never sees it, so it is not cast
to bf16, not partitioned by ZeRO-3, not stepped by the optimizer and not in the module checkpoint. The
engine (``mmssl/engine.py``) starts it from the student, updates it after each optimizer step and
saves it in every checkpoint's client state.

Axis legend: B batch, L tokens (patches, or text positions), K kept patches / text selection slots,
D tower width, Dd decoder width.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from einops import repeat
from open_clip.transformer import LayerNorm
from torch import Tensor, nn

from mmssl.config import DistillConfig, ModelConfig
from mmssl.encoders.text import PAD_ID
from mmssl.objectives.masked_patches import PatchDecoder


def momentum_at(cfg: DistillConfig, update: int, total: int) -> float:
    """The teacher momentum for EMA update ``update`` (0-based): ``momentum_start`` rising to
    ``momentum_end`` over ``total`` updates (linearly or along half a cosine), then constant."""
    progress = min(1.0, update / max(1, total))
    if cfg.momentum_schedule == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return cfg.momentum_start + (cfg.momentum_end - cfg.momentum_start) * progress


def instance_norm(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[B, L, D]`` normalised per sample and channel over its tokens (only the ``valid`` ``[B, L]`` ones
    count towards the statistics; padding stays out of them)."""
    if valid is None:
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    w = valid[..., None].to(x.dtype)  # [B, L, 1]
    count = w.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1, 1]
    mean = (x * w).sum(dim=1, keepdim=True) / count
    var = ((x - mean).pow(2) * w).sum(dim=1, keepdim=True) / count
    return (x - mean) / (var + 1e-5).sqrt()


def weighted_variance(x: Tensor, weight: Tensor) -> Tensor:
    """Variance per channel over the weighted tokens of ``x`` ``[B, N, D]`` (``weight`` ``[B, N]``),
    averaged over channels: a scalar that falls to 0 when the representations collapse."""
    w = weight[..., None]
    count = w.sum().clamp(min=2)
    mean = (x * w).sum(dim=(0, 1)) / count  # [D]
    return (((x - mean).pow(2) * w).sum(dim=(0, 1)) / (count - 1)).mean()


class EmaTeacher:
    """The teacher towers and their momentum schedule. Not an ``nn.Module`` (see the module docstring).

    ``update`` is one fused ``torch._foreach_lerp_`` over every teacher parameter: teacher <- teacher +
    (1 - m) * (student - teacher), which is m * teacher + (1 - m) * student."""

    def __init__(self, towers: dict[str, nn.Module], cfg: DistillConfig, total_steps: int):
        self.cfg = cfg
        self.towers = nn.ModuleDict({m: copy.deepcopy(t) for m, t in towers.items()})
        self.towers.float().eval().requires_grad_(False)
        self.total = cfg.anneal_steps or total_steps
        self.updates = 0  # EMA updates so far (optimizer steps taken; a skipped step makes none)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.towers)

    def parameters(self) -> list[Tensor]:
        return [p for tower in self.towers.values() for p in tower.parameters()]

    def student_parameters(self, model: nn.Module) -> list[Tensor]:
        """The student's parameters matching :meth:`parameters`, in the same order."""
        return [p for m in self.towers for p in getattr(model, m).parameters()]

    def momentum(self) -> float:
        return momentum_at(self.cfg, self.updates, self.total)

    def to(self, device: torch.device) -> EmaTeacher:
        self.towers.to(device)
        return self

    @torch.no_grad()
    def copy_from(self, student: list[Tensor]) -> None:
        """Set the teacher to the student's values (``student`` as :meth:`student_parameters` gives it)."""
        torch._foreach_copy_(self.parameters(), [p.detach().float() for p in student])

    @torch.no_grad()
    def update(self, student: list[Tensor]) -> float:
        """One EMA step towards the student's current weights; returns the momentum it used."""
        m = self.momentum()
        teacher = self.parameters()
        assert len(teacher) == len(student), (len(teacher), len(student))
        if student and student[0].dtype != torch.float32:  # a bf16 working copy: lerp needs one dtype
            student = [p.float() for p in student]
        torch._foreach_lerp_(teacher, student, 1.0 - m)
        self.updates += 1
        return m

    def state_dict(self) -> dict:
        return {"towers": self.towers.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.towers.load_state_dict(state["towers"])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def targets(self, modality: str, x: Tensor) -> Tensor:
        """The teacher's targets for every token of the whole input ``x``: ``[B, L, D]`` in fp32."""
        tower = self.towers[modality]
        captured: list[Tensor] = []
        hooks = [
            block.register_forward_hook(lambda _m, _i, out: captured.append(out))
            for block in tower.transformer.resblocks[-self.cfg.top_k :]
        ]  # hooked for this call only: a deep copy of the task carries no hook of this teacher
        try:
            tower.forward_features(x if modality == "text" else x.float())
        finally:
            for hook in hooks:
                hook.remove()
        if modality == "text":
            valid, blocks = x != PAD_ID, captured  # [B, L]
        else:
            valid, blocks = None, [out[:, 1:] for out in captured]  # [B, L, D], class token dropped
        assert len(blocks) == self.cfg.top_k, (modality, len(blocks))
        return torch.stack([instance_norm(b.float(), valid) for b in blocks]).mean(dim=0)


def text_head(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), LayerNorm(width), nn.Linear(width, width))


class DistillObjective(nn.Module):
    """The student side: one decoder per distilled tower, and the regression terms."""

    def __init__(self, cfg: DistillConfig, model: ModelConfig, modalities: tuple[str, ...]):
        super().__init__()
        self.cfg = cfg
        self.decoders = nn.ModuleDict()
        for m in modalities:
            tower = getattr(model, m)
            if m == "text":
                self.decoders[m] = text_head(tower.width)
            else:
                patches = tower.num_patches if m == "image" else tower.grid[0] * tower.grid[1]
                self.decoders[m] = PatchDecoder(tower.width, patches, tower.width, cfg)

    def patch_terms(
        self, modality: str, features: Tensor, keep: Tensor, target: Tensor, present: Tensor
    ) -> dict[str, Tensor]:
        """Student features of the kept patches ``[B, 1 + K, D]`` (class token first), their indices
        ``[B, K]``, the teacher's targets ``[B, L, D]`` -> the terms over the masked patches."""
        pred = self.decoders[modality](features[:, 1:], keep)  # [B, L, D]
        masked = torch.ones(target.shape[:2], dtype=torch.bool, device=keep.device).scatter(1, keep, False)
        return self.terms(modality, pred, target, masked & present[:, None])

    def text_terms(
        self, features: Tensor, positions: Tensor, chosen: Tensor, target: Tensor, present: Tensor
    ) -> dict[str, Tensor]:
        """Student features of the corrupted text ``[B, L, D]``, the selection slots ``[B, K]`` and which
        of them were selected ``[B, K]``, the teacher's targets ``[B, L, D]`` -> the terms there."""
        index = repeat(positions, "b k -> b k d", d=features.shape[-1])
        pred = self.decoders["text"](torch.gather(features, 1, index))  # [B, K, D]
        return self.terms("text", pred, torch.gather(target, 1, index), chosen & present[:, None])

    def terms(self, modality: str, pred: Tensor, target: Tensor, weight: Tensor) -> dict[str, Tensor]:
        """Mean squared error over the weighted tokens (``[B, N, D]`` each, ``weight`` ``[B, N]``), and the
        variances the collapse guard watches."""
        pred, w = pred.float(), weight.float()
        per_token = (pred - target).pow(2).mean(dim=-1)  # [B, N]
        name = f"distill_{modality}"
        return {
            f"{name}_loss": (per_token * w).sum() / w.sum().clamp(min=1),
            f"{name}_target_var": weighted_variance(target, w).detach(),
            f"{name}_pred_var": weighted_variance(pred.detach(), w),
        }


def collapse(cfg: DistillConfig, step: int, logged: dict[str, float]) -> str | None:
    """One line saying which variance fell below its bound at ``step``, or None (also before the warm-up)."""
    if step <= cfg.collapse_warmup_steps:
        return None
    for key, value in sorted(logged.items()):
        if not key.startswith("distill_"):
            continue
        for kind, bound in (("target", cfg.min_target_var), ("pred", cfg.min_pred_var)):
            if key.endswith(f"_{kind}_var") and value < bound:
                setting = f"objectives.distill.min_{kind}_var"
                return (
                    f"step {step}: {key}={value:.3g} is below {setting}={bound:g}: the distillation "
                    f"{'targets' if kind == 'target' else 'predictions'} have collapsed; stopping (lower "
                    f"the momentum, raise objectives.distill.top_k, or lower {setting} to go on)"
                )
    return None
