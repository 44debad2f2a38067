"""The whole run as one typed tree of configs.

Every component owns a ``@dataclass(kw_only=True)`` config. A run is a :class:`RunConfig`, made by a
preset function (``mmssl/presets.py``) and changed with dotted overrides (``optim.lr=3e-4``) that
:func:`apply_overrides` parses against the field types. User mistakes raise ``ValueError`` naming the
field; ``assert`` is kept for programmer invariants.

Four parts live in modules of their own and are re-exported here (import every config from here): the
towers (``model.*``, ``mmssl/model_config.py``), the objectives (``objectives.*``,
``mmssl/objectives_config.py``), fine-tuning (``finetune``, ``mmssl/finetune_config.py``) and the
overrides and JSON form (``mmssl/config_io.py``). None of them imports this module back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_pipelines.specs import AudioAugment, ImageAugment
from mmssl.config_checks import MODALITIES
from mmssl.config_checks import positive as _positive
from mmssl.config_io import (  # noqa: F401 (re-exported: overrides and the JSON form live there)
    SAVED_BEFORE,
    apply_overrides,
    from_dict,
    save_json,
    to_dict,
    url_credentials,
    with_saved_before,
)
from mmssl.finetune_config import FinetuneConfig
from mmssl.model_config import (  # noqa: F401 (re-exported: the towers' configs live there)
    EOT_TOKEN_ID,
    MASK_TOKEN_ID,
    SOT_TOKEN_ID,
    AudioTowerConfig,
    ImageTowerConfig,
    ModelConfig,
    TextKind,
    TextTowerConfig,
    TimmKwargs,
    TowerKind,
)
from mmssl.objectives_config import (  # noqa: F401 (re-exported: the objectives' configs live there)
    ContrastiveConfig,
    ContrastiveKind,
    DistillConfig,
    LossWeight,
    MaskedPatchConfig,
    MaskedTextConfig,
    ObjectivesConfig,
    SigLipConfig,
    ViewConfig,
    ViewsConfig,
)


@dataclass(kw_only=True)
class SourceConfig:
    """One set of shards in a training mix."""

    shards: str
    weight: float = 1.0
    layout: str = "mmssl"  # mmssl | img2dataset | clap | explicit, e.g. "image=jpg;text=json:caption"


@dataclass(kw_only=True)
class DataConfig:
    """Where samples come from and how the loader runs; tensor sizes come from the model config.

    Training reads ``train_shards`` with ``layout``, or a weighted mix of ``sources`` (then
    ``train_shards`` stays empty), e.g. ``data.sources=[{"shards": "laion/", "layout": "img2dataset"},
    {"shards": "clap/", "layout": "clap", "weight": 0.5}]``. Evaluation reads ``eval_shards`` with
    ``eval_layout``, which follows the training layout unless set (see ``eval_layout_name``)."""

    train_shards: str = ""
    layout: str = "mmssl"
    sources: tuple[SourceConfig, ...] = ()
    eval_shards: str = ""
    eval_layout: str = ""  # "": the training layout (the sources' one, when they share it)
    num_workers: int = 1
    shuffle_buffer: int = 1000
    shards_per_round: int = 4
    # cut each text batch after its longest caption: exact (padding is masked, or after the pooled
    # end token of a causal tower) and much less text compute for captions shorter than the context
    trim_text: bool = True
    # training-time image augmentation, see data_pipelines.ImageAugment: open_clip's random resized
    # crop (scale 0.9-1.0) by default, flip and colour jitter off
    image_augment: ImageAugment = field(default_factory=ImageAugment)
    # training-time audio augmentation, off by default: see data_pipelines.AudioAugment
    audio_augment: AudioAugment = field(default_factory=AudioAugment)
    # a remote shard (pipe:, http(s)://, s3:// ...) whose stream fails mid-way is retried this often,
    # with backoff, from the sample it reached; then it counts as bad data like a truncated tar
    retries: int = 3

    def validate(self, path: str = "data") -> None:
        for name, cls in (("image_augment", ImageAugment), ("audio_augment", AudioAugment)):
            try:  # its own checks, again: an override sets fields one by one
                cls(**dataclasses.asdict(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{path}.{name}: {e}") from None
        if bool(self.train_shards) == bool(self.sources):
            raise ValueError(
                f"{path}: name the training data in exactly one of {path}.train_shards (a dir, glob or brace "
                f"pattern) and {path}.sources (a weighted mix)"
            )
        for i, source in enumerate(self.sources):
            if not source.shards or not source.weight > 0:
                raise ValueError(f"{path}.sources[{i}] needs shards and a weight > 0, got {source}")
        for name in ("num_workers", "retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{path}.{name} must be >= 0, got {getattr(self, name)}")
        _positive(self, path, "shuffle_buffer", "shards_per_round")

    def eval_layout_name(self, path: str = "data") -> str:
        """The layout of the evaluation shards: ``eval_layout`` when set, else the training layout:
        ``layout``, or with ``sources`` the layout they all share. Sources of several layouts leave no
        default: asked then (when evaluation data is read), this raises naming ``eval_layout``."""
        if self.eval_layout:
            return self.eval_layout
        if not self.sources:
            return self.layout
        layouts = sorted({s.layout for s in self.sources})
        if len(layouts) > 1:
            raise ValueError(
                f"{path}.eval_layout: the training sources have layouts {layouts}, so the evaluation "
                f"shards' layout cannot follow them: set {path}.eval_layout (e.g. {path}.eval_layout={layouts[0]})"
            )
        return layouts[0]


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay. The batch identity lives here once:
    global batch = micro_batch_size x grad_accum_steps x world size."""

    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6

    def validate(self, path: str = "optim") -> None:
        _positive(self, path, "micro_batch_size", "grad_accum_steps", "lr", "eps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{path}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"{path}.warmup_steps and {path}.weight_decay must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{path}.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class EngineConfig:
    """Distribution and precision. Engine settings live in the DeepSpeed JSON; these override them."""

    ds_config: str = "ds_config.json"
    zero_stage: int | None = None  # None: as the JSON says
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (stage >= 1)
    offload_params: bool = False  # ZeRO-Infinity: parameters on the CPU between uses (stage 3)
    load_universal: bool = False  # resume from a universal checkpoint (set by `--resume` on a new world size)
    # torch.compile every transformer trunk (towers and MAE decoders): fuses norms, activations and
    # residual adds; worth it on GPU, see the README's performance section for this CPU
    compile: bool = False
    # CPU ranks all on one node: ZeRO's gradient all-reduce through DeepSpeed's shared-memory op, not gloo
    shm_all_reduce: bool = True

    def validate(self, path: str = "engine") -> None:
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{path}.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.compile and self.zero_stage == 3:
            raise ValueError(
                f"{path}.compile is not supported with ZeRO-3 (its parameter gathering hooks break the "
                "compiled graphs): use ZeRO-1/2 or compile=false"
            )


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3  # checkpoints kept; older ones are deleted once a newer one is complete
    eval_at_end: bool = True
    max_bad_steps: int = 5  # consecutive non-finite losses (each skipped) that stop the run
    # Fault drills: micro-batch attempts (1-based, counting every forward) whose loss is made NaN
    inject_nonfinite_at: tuple[int, ...] = ()
    record_keys: bool = False  # audit: every rank appends the sample keys it trains on to RUN_DIR/keys/

    def validate(self, path: str = "train") -> None:
        _positive(self, path, "steps", "log_every", "ckpt_every", "keep_last", "max_bad_steps")


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 128
    match: Literal["auto", "pair", "label"] = "auto"
    ks: tuple[int, ...] = (1, 5, 10)

    def validate(self, path: str = "eval") -> None:
        _positive(self, path, "batch_size")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"{path}.ks must be positive integers, got {self.ks}")


@dataclass(kw_only=True)
class RunConfig:
    preset: str = "custom"
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig | None = None  # set: a fine-tuning run (mmssl finetune, mmssl/finetune.py)

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        self.objectives.contrastive.pair_names(self.model.modalities)
        for modality in MODALITIES:
            if self.objectives.masked(modality).enabled and getattr(self.model, modality) is None:
                raise ValueError(f"objectives.masked_{modality}.enabled but model.{modality} is off")
        if self.engine.zero_stage == 3 and self.objectives.any_unmasked_pass():
            raise ValueError(
                "engine.zero_stage=3 runs each tower once per step (the masked pass serves the contrastive loss): "
                "set objectives.unmasked_contrastive_pass=false"
            )
        self._validate_views()
        self._validate_distill()
        if self.finetune is not None and getattr(self.model, self.finetune.tower) is None:
            raise ValueError(f"finetune.tower={self.finetune.tower} but model.{self.finetune.tower} is off")
        if self.engine.offload_params and self.engine.zero_stage not in (None, 3):
            raise ValueError(
                f"engine.offload_params needs ZeRO stage 3, got engine.zero_stage={self.engine.zero_stage}"
            )
        tuning = self.objectives.unmasked_tuning_steps
        if tuning and not any(self.objectives.masked(m).enabled for m in self.model.modalities):
            raise ValueError(
                "objectives.unmasked_tuning_steps tunes masked towers: no masked objective is on"
            )
        if tuning > self.train.steps:
            raise ValueError(
                f"objectives.unmasked_tuning_steps={tuning} is more than train.steps={self.train.steps}"
            )
        if self.objectives.masked_image.mode != "unstructured":
            raise ValueError("objectives.masked_image.mode: images take 'unstructured' masking only")
        if self.engine.compile and any(
            getattr(self.model, m).kind != "native" for m in self.model.modalities
        ):
            raise ValueError(
                "engine.compile compiles mmssl's native towers only: set engine.compile=false for timm/hf towers"
            )
        text = self.model.text
        if self.objectives.masked_text.enabled and text is not None and text.kind == "native":
            if text.causal:
                raise ValueError(
                    "objectives.masked_text needs a bidirectional text tower: set model.text.causal=false"
                )
            if text.vocab_size <= MASK_TOKEN_ID:
                raise ValueError(
                    f"objectives.masked_text needs model.text.vocab_size > {MASK_TOKEN_ID} (one id for [MASK])"
                )
        return self

    def _validate_distill(self) -> None:
        d = self.objectives.distill
        if not d.enabled:
            return
        for modality in d.modalities:
            if getattr(self.model, modality) is None:
                raise ValueError(
                    f"objectives.distill.modalities names {modality!r} but model.{modality} is off"
                )
            if not self.objectives.masked(modality).enabled:
                raise ValueError(
                    f"objectives.distill.modalities names {modality!r}: distillation rides on the masked pass, "
                    f"set objectives.masked_{modality}.enabled=true (its loss.weight may be 0)"
                )
        if not self.distilled_modalities():
            raise ValueError(
                "objectives.distill.enabled but no masked objective is on: distillation rides on the masked "
                "pass (e.g. objectives.masked_image.enabled=true, or the tiny_distill preset)"
            )
        for modality in self.distilled_modalities():
            if getattr(self.model, modality).kind != "native":
                raise ValueError(
                    f"objectives.distill trains model.{modality} but its kind is "
                    f"{getattr(self.model, modality).kind!r}: the EMA teacher reads the blocks of mmssl's native "
                    f"towers; use model.{modality}.kind=native or name other towers in objectives.distill.modalities"
                )
            depth = getattr(self.model, modality).depth
            if d.top_k > depth:
                raise ValueError(
                    f"objectives.distill.top_k={d.top_k} exceeds model.{modality}.depth={depth} blocks"
                )

    def unmasked_tuning(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is one of the last ``objectives.unmasked_tuning_steps``
        (FLIP's unmasked tuning: masked objectives off, whole inputs)."""
        return step >= self.train.steps - self.objectives.unmasked_tuning_steps

    def distilled_modalities(self) -> tuple[str, ...]:
        """The towers distillation trains: its named ones, or every tower whose masked objective is on."""
        d = self.objectives.distill
        if not d.enabled:
            return ()
        named = d.modalities or self.model.modalities
        return tuple(m for m in self.model.modalities if m in named and self.objectives.masked(m).enabled)

    def _validate_views(self) -> None:
        for modality in self.objectives.views.enabled():
            path = f"objectives.views.{modality}"
            if getattr(self.model, modality) is None:
                raise ValueError(f"{path}.enabled but model.{modality} is off")
            if self.engine.zero_stage == 3:
                raise ValueError(
                    f"engine.zero_stage=3 runs each tower once per step and {path} needs a second pass: "
                    "use ZeRO-1/2 or turn the view objective off"
                )
        text = self.model.text
        if (
            self.objectives.views.text.enabled
            and text is not None
            and text.kind == "native"
            and text.dropout <= 0
        ):
            raise ValueError(
                "objectives.views.text compares two dropout passes of each caption: set model.text.dropout > 0 "
                "(SimCSE uses 0.1)"
            )


def load_json(path: str | Path, credentials: dict[str, str] | None = None) -> RunConfig:
    """A config.json written by :func:`save_json`, by this version or an earlier one (see SAVED_BEFORE)."""
    text = Path(path).read_text()
    for masked, real in (credentials or {}).items():
        text = text.replace(masked, real)
    return from_dict(RunConfig, with_saved_before(json.loads(text)))
