"""The objectives' section of a run's config (``objectives.*``): one typed config per objective family,
the tree under :class:`ObjectivesConfig`.

``mmssl.config`` re-exports every name here (``from mmssl.config import ContrastiveConfig`` keeps
working) and builds the run's tree from them; this module imports nothing of mmssl but the leaf
``mmssl.config_checks``. The cross-section checks (a masked objective needs its tower, distillation
rides on the masked pass, ZeRO-3 and view objectives) stay in ``RunConfig.validate``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from mmssl.config_checks import MODALITIES, positive


@dataclass(kw_only=True)
class LossWeight:
    """A loss term's weight, constant or warmed up linearly from 0 over ``warmup_steps``."""

    weight: float = 1.0
    schedule: Literal["constant", "linear_warmup"] = "constant"
    warmup_steps: int = 0

    def validate(self, path: str) -> None:
        if self.weight < 0:
            raise ValueError(f"{path}.weight must be >= 0, got {self.weight}")
        if self.schedule == "linear_warmup" and self.warmup_steps <= 0:
            raise ValueError(f"{path}.warmup_steps must be > 0 for schedule 'linear_warmup'")

    def at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.weight
        return self.weight * min(1.0, (step + 1) / self.warmup_steps)


ContrastiveKind = Literal["infonce", "siglip"]


@dataclass(kw_only=True)
class SigLipConfig:
    """Settings of the pairs trained with the sigmoid loss (``mmssl/objectives/siglip.py``)."""

    init_scale: float = 10.0  # the logit scale t starts here (learned as log t, as SigLIP does)
    # None: log(p / (1 - p)) with p = 1 / global batch (open_clip issue 650), the global batch being
    # micro_batch_size x ranks: the rows scored together (gradient accumulation adds no negatives)
    init_bias: float | None = None
    exchange: Literal["bidir", "gather"] = "bidir"  # how the second side's features reach other ranks
    chunk_size: int = 0  # > 0: score that many local rows at a time, recomputed in backward (less memory)

    def validate(self, path: str) -> None:
        positive(self, path, "init_scale")
        if self.chunk_size < 0:
            raise ValueError(f"{path}.chunk_size must be >= 0 (0: no chunking), got {self.chunk_size}")


@dataclass(kw_only=True)
class ContrastiveConfig:
    """Alignment between every pair of modalities present in a batch, using only the rows where both
    sides are present: InfoNCE (open_clip's ClipLoss) or SigLIP's sigmoid loss, chosen per pair.

    ``kind`` applies to every pair; ``kinds`` overrides it for named pairs, e.g.
    ``objectives.contrastive.kinds.text_audio=siglip`` (JSON: ``"kinds": {"text_audio": "siglip"}``).
    ``local_loss`` and ``gather_with_grad`` are InfoNCE's; ``siglip.*`` are SigLIP's."""

    loss: LossWeight = field(default_factory=LossWeight)
    pairs: tuple[str, ...] = ()  # e.g. ["image_text", "text_audio"]; empty: every pair of the model's towers
    kind: ContrastiveKind = "infonce"
    kinds: dict[str, ContrastiveKind] = field(default_factory=dict)  # pair -> kind, overriding `kind`
    init_temperature: float = 0.07  # InfoNCE pairs' initial temperature (logit scale 1 / it)
    max_logit_scale: float = 100.0  # every pair's logit scale is clamped here
    local_loss: bool = False  # True: each rank scores its own rows against all (less memory, same gradient)
    gather_with_grad: bool = True
    siglip: SigLipConfig = field(default_factory=SigLipConfig)
    # Under gradient accumulation (optim.grad_accum_steps = K): "local" scores each micro-batch against its
    # own negatives only; "cached" scores the whole window of K micro-batches at once (GradCache: a forward
    # without gradients, then one with), giving the gradient of one batch K times as large at the memory
    # of one micro-batch, for about one more forward per micro-batch (mmssl/accumulate.py). With
    # grad_accum_steps=1 the two give the same gradient, "cached" for that extra forward.
    accumulate: Literal["local", "cached"] = "local"

    def validate(self, path: str) -> None:
        self.loss.validate(f"{path}.loss")
        self.siglip.validate(f"{path}.siglip")
        positive(self, path, "init_temperature", "max_logit_scale")
        if 1.0 / self.init_temperature > self.max_logit_scale:
            raise ValueError(f"{path}: 1/init_temperature exceeds max_logit_scale={self.max_logit_scale}")
        if self.siglip.init_scale > self.max_logit_scale:
            raise ValueError(f"{path}.siglip.init_scale exceeds max_logit_scale={self.max_logit_scale}")
        for name, kind in {"": self.kind, **self.kinds}.items():
            if kind not in typing.get_args(ContrastiveKind):
                field_ = f"{path}.kinds.{name}" if name else f"{path}.kind"
                raise ValueError(
                    f"{field_} must be one of {list(typing.get_args(ContrastiveKind))}, got {kind!r}"
                )

    def pair_names(self, modalities: tuple[str, ...]) -> list[tuple[str, str]]:
        every = [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]
        known = {f"{a}_{b}": (a, b) for a, b in every}
        for name in self.pairs:
            if name not in known:
                raise ValueError(f"objectives.contrastive.pairs: {name!r} is not one of {sorted(known)}")
        chosen = [known[name] for name in self.pairs] if self.pairs else every
        names = [f"{a}_{b}" for a, b in chosen]
        for name in self.kinds:
            if name not in names:
                raise ValueError(
                    f"objectives.contrastive.kinds: {name!r} is not a trained pair; pairs are {names}"
                )
        return chosen

    def kind_of(self, pair: str) -> ContrastiveKind:
        return self.kinds.get(pair, self.kind)


@dataclass(kw_only=True)
class MaskedPatchConfig:
    """MAE-style masked patch reconstruction for a patch tower (image or audio spectrogram).

    The encoder sees only the kept patches; a light decoder with mask tokens and positions predicts
    the values of the masked ones; the loss covers masked patches only."""

    enabled: bool = False
    loss: LossWeight = field(default_factory=LossWeight)
    mask_ratio: float = 0.75
    norm_targets: bool = True  # normalise each target patch by its own mean and variance (MAE's norm_pix)
    decoder_width: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 2
    mode: Literal["unstructured", "time", "frequency", "time_frequency"] = "unstructured"  # audio only

    def validate(self, path: str) -> None:
        self.loss.validate(f"{path}.loss")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"{path}.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        positive(self, path, "decoder_width", "decoder_depth", "decoder_heads")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"{path}.decoder_width={self.decoder_width} is not divisible by decoder_heads")


@dataclass(kw_only=True)
class MaskedTextConfig:
    """BERT-style masked language modelling: ``select_prob`` of the non-special tokens are selected; of
    those, ``mask_prob`` become [MASK], ``random_prob`` a random token and the rest stay unchanged."""

    enabled: bool = False
    loss: LossWeight = field(default_factory=lambda: LossWeight(weight=0.1))
    select_prob: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    # the native tower's head predicts with the token embedding as its output layer (BERT's tying: V x D
    # fewer parameters; the head keeps its own output bias). A Hugging Face tower's head is its model's
    # own, tied as that model is: set this to say the same (checked). A run saved before this setting
    # existed loads with false (SAVED_BEFORE in mmssl/config.py)
    tie_head: bool = True

    def validate(self, path: str) -> None:
        self.loss.validate(f"{path}.loss")
        if not 0.0 <= self.select_prob <= 1.0:
            raise ValueError(f"{path}.select_prob must be in [0, 1], got {self.select_prob}")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1.0:
            raise ValueError(f"{path}: mask_prob and random_prob must be >= 0 and sum to at most 1")


@dataclass(kw_only=True)
class ViewConfig:
    """An intra-modal contrastive term between two views of each sample (SimCLR / SLIP for images,
    SimCSE for text, two crops of a clip for audio): a small projection head on the tower's pooled
    features, then NT-Xent with a fixed temperature over both views of every present row of the global
    batch. Images and audio take their second view from the loader (another draw of the training
    augmentation); text takes a second pass with dropout (``model.text.dropout`` > 0)."""

    enabled: bool = False
    loss: LossWeight = field(default_factory=LossWeight)
    temperature: float = 0.1  # SLIP and SimCLR use 0.1, SimCSE 0.05
    head_layers: int = 3  # SLIP's MLP: Linear-LayerNorm-GELU twice, then Linear (1: one Linear)
    head_width: int = 256  # hidden width of the head
    out_dim: int = 64  # what NT-Xent compares

    def validate(self, path: str) -> None:
        self.loss.validate(f"{path}.loss")
        positive(self, path, "temperature", "head_layers", "head_width", "out_dim")


@dataclass(kw_only=True)
class ViewsConfig:
    """One view objective per modality, each off by default."""

    image: ViewConfig = field(default_factory=ViewConfig)
    text: ViewConfig = field(default_factory=lambda: ViewConfig(temperature=0.05))
    audio: ViewConfig = field(default_factory=ViewConfig)

    def validate(self, path: str) -> None:
        for name in MODALITIES:
            getattr(self, name).validate(f"{path}.{name}")

    def enabled(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m).enabled)


@dataclass(kw_only=True)
class DistillConfig:
    """Self-distillation from an EMA teacher, data2vec 2.0 style (``mmssl/objectives/distill.py``): a
    teacher copy of the towers (fp32, no gradients) follows the student as an exponential moving average
    after every optimizer step; it sees each unmasked input, and the average of its last ``top_k``
    blocks' outputs (each instance-normalised over tokens) is regressed by the student at the masked
    positions of the shared masked pass, through a light decoder. A modality distils when its masked
    objective is on (its weight may be 0: the masked pass is what distillation rides on)."""

    enabled: bool = False
    loss: LossWeight = field(default_factory=LossWeight)
    modalities: tuple[str, ...] = ()  # empty: every tower whose masked objective is on
    top_k: int = 2  # teacher blocks averaged into the target (data2vec 2.0: 8-12 of 12)
    # teacher momentum m (teacher <- m * teacher + (1 - m) * student), from start to end over
    # anneal_steps optimizer steps (0: the whole run), then constant
    momentum_start: float = 0.999
    momentum_end: float = 0.9999
    momentum_schedule: Literal["linear", "cosine"] = "linear"
    anneal_steps: int = 0
    decoder_width: int = 64  # the patch towers' light decoder (text: a two-layer head at the tower width)
    decoder_depth: int = 1
    decoder_heads: int = 2
    # collapse guard (checked on logging steps after collapse_warmup_steps): stop when the variance of
    # the targets or of the predictions (over masked tokens, per channel, averaged) falls below these
    min_target_var: float = 0.01
    min_pred_var: float = 0.001
    collapse_warmup_steps: int = 100

    def validate(self, path: str) -> None:
        self.loss.validate(f"{path}.loss")
        positive(self, path, "top_k", "decoder_width", "decoder_depth", "decoder_heads")
        for name in ("momentum_start", "momentum_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{path}.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"{path}.decoder_width={self.decoder_width} is not divisible by decoder_heads")
        for name in ("anneal_steps", "collapse_warmup_steps", "min_target_var", "min_pred_var"):
            if getattr(self, name) < 0:
                raise ValueError(f"{path}.{name} must be >= 0, got {getattr(self, name)}")
        for i, modality in enumerate(self.modalities):
            if modality not in MODALITIES:
                raise ValueError(f"{path}.modalities[{i}]: {modality!r} is not one of {list(MODALITIES)}")


@dataclass(kw_only=True)
class ObjectivesConfig:
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    masked_image: MaskedPatchConfig = field(default_factory=MaskedPatchConfig)
    masked_text: MaskedTextConfig = field(default_factory=MaskedTextConfig)
    masked_audio: MaskedPatchConfig = field(default_factory=lambda: MaskedPatchConfig(mask_ratio=0.8))
    # False: each tower runs once per step on its masked input and that pass also feeds the contrastive
    # loss (FLIP, CAV-MAE). True: a second, unmasked pass feeds the contrastive loss. A list of modalities
    # (e.g. ["audio"]): the second pass for those towers only, the others share their masked pass.
    unmasked_contrastive_pass: bool | tuple[str, ...] = False
    # intra-modal terms between two views of each sample; see ViewConfig
    views: ViewsConfig = field(default_factory=ViewsConfig)
    # FLIP's unmasked tuning: the last N steps of training switch every masked objective off, so the
    # towers see whole inputs (and only the contrastive loss trains them) before they are evaluated
    unmasked_tuning_steps: int = 0
    # self-distillation from an EMA teacher at the masked positions; see DistillConfig
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self, path: str = "objectives") -> None:
        for name in ("contrastive", "masked_image", "masked_text", "masked_audio", "views", "distill"):
            getattr(self, name).validate(f"{path}.{name}")
        if self.unmasked_tuning_steps < 0:
            raise ValueError(f"{path}.unmasked_tuning_steps must be >= 0, got {self.unmasked_tuning_steps}")
        if not isinstance(self.unmasked_contrastive_pass, bool):
            for i, modality in enumerate(self.unmasked_contrastive_pass):
                if modality not in MODALITIES:
                    raise ValueError(
                        f"{path}.unmasked_contrastive_pass[{i}]: {modality!r} is not one of {list(MODALITIES)}"
                    )

    def unmasked_pass(self, modality: str) -> bool:
        """Whether ``modality``'s contrastive embedding comes from a second, unmasked pass (its masked
        objective on): for every tower (``unmasked_contrastive_pass=true``) or the towers listed."""
        chosen = self.unmasked_contrastive_pass
        listed = chosen if isinstance(chosen, bool) else modality in chosen
        return listed and self.masked(modality).enabled

    def any_unmasked_pass(self) -> bool:
        """Whether some tower runs a second, unmasked pass for the contrastive loss."""
        return any(self.unmasked_pass(m) for m in MODALITIES)

    def masked(self, modality: str) -> MaskedPatchConfig | MaskedTextConfig:
        return getattr(self, f"masked_{modality}")
