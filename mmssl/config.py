"""The whole run as one typed tree of configs.

Every component owns a ``@dataclass(kw_only=True)`` config. A run is a :class:`RunConfig`, made by a
preset function (``mmssl/presets.py``) and changed with dotted overrides (``optim.lr=3e-4``) that
:func:`apply_overrides` parses against the field types. User mistakes raise ``ValueError`` naming the
field; ``assert`` is kept for programmer invariants.

Two sections live in their own modules and are re-exported here (import every config from here):
the objectives (``objectives.*``, ``mmssl/objectives_config.py``) and fine-tuning (``finetune``,
``mmssl/finetune_config.py``). Neither imports this module back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipelines.remote import credentials, mask
from data_pipelines.specs import AudioAugment, ImageAugment
from mmssl.config_checks import MODALITIES
from mmssl.config_checks import positive as _positive
from mmssl.finetune_config import FinetuneConfig
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

# open_clip's BPE tokenizer: ids 0 (padding) .. 49407 (end of text); one more id serves as [MASK]
SOT_TOKEN_ID, EOT_TOKEN_ID, MASK_TOKEN_ID = 49406, 49407, 49408


TowerKind = Literal["native", "timm"]
TextKind = Literal["native", "hf"]
# constructor arguments given to timm.create_model as they are (e.g. {"embed_dim": 192, "depth": 4})
TimmKwargs = dict[str, int | float | str | bool]


@dataclass(kw_only=True)
class ImageTowerConfig:
    """A ViT over square patches of an RGB image: mmssl's own (``kind=native``) or any timm model
    (``kind=timm``, the ``towers`` extra), whose own shape then replaces patch_size/width/depth/heads."""

    kind: TowerKind = "native"
    timm_name: str = ""  # kind=timm: a timm model name, built with pretrained=False (weights: init_from)
    timm_kwargs: TimmKwargs = field(default_factory=dict)
    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = (
        False  # recompute block activations in backward (less memory, ~1/3 more compute)
    )

    # start this tower from existing weights (a run, checkpoint, export or open_clip file; see
    # mmssl/pretrained.py), overriding model.init_from for it
    init_from: str | None = None
    lock: bool = False  # LiT: freeze the tower except its last unlocked_groups layer groups
    unlocked_groups: int = 0  # counted from the head: projection, last block + final norm, ...

    def validate(self, path: str) -> None:
        _check_lock(self, path)
        if self.kind == "timm":
            _positive(self, path, "image_size")
            _check_timm(self, path)
            return
        _positive(self, path, "image_size", "patch_size", "width", "depth", "heads")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{path}.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        _heads_divide(self, path)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class TextTowerConfig:
    """A transformer over open_clip BPE tokens, pooled at the end-of-text token (``kind=native``), or a
    local Hugging Face encoder with its own tokenizer (``kind=hf``, the ``towers`` extra), pooled at its
    first token or as the mean of its tokens; then only context_length (the tokenizer's padded length)
    and the settings below hf_path apply of the native ones."""

    kind: TextKind = "native"
    hf_path: str = ""  # kind=hf: a local model directory (config, tokenizer, weights); nothing is downloaded
    pooler: Literal["cls", "mean"] = "cls"  # kind=hf: the first token's features, or the mean over tokens
    context_length: int = 16
    vocab_size: int = 49409  # open_clip's 49408 BPE ids and one [MASK] id for masked language modelling
    width: int = 64
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    causal: bool = True  # CLIP-style causal attention; bidirectional towers serve masked language modelling
    grad_checkpointing: bool = False
    # BERT-style dropout on attention weights and on each block's residual branches (training only);
    # SimCSE's text views (objectives.views.text) are two passes that differ only in it
    dropout: float = 0.0

    # start this tower from existing weights (a run, checkpoint, export or open_clip file; see
    # mmssl/pretrained.py), overriding model.init_from for it
    init_from: str | None = None
    lock: bool = False  # LiT: freeze the tower except its last unlocked_groups layer groups
    unlocked_groups: int = 0  # counted from the head: projection, last block + final norm, ...

    def validate(self, path: str) -> None:
        _check_lock(self, path)
        if self.kind == "hf":
            _positive(self, path, "context_length")
            if not self.hf_path:
                raise ValueError(
                    f"{path}.hf_path must name a local Hugging Face model directory ({path}.kind=hf)"
                )
            return
        _positive(self, path, "context_length", "vocab_size", "width", "depth", "heads")
        _heads_divide(self, path)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{path}.dropout must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class AudioTowerConfig:
    """A transformer over patches of a log-mel spectrogram; the mel settings are its input contract.
    ``kind=timm`` makes it an AST-style timm ViT over the same log-mel (one input channel, patches of
    patch_freq x patch_time), whose own width/depth/heads replace the ones below."""

    kind: TowerKind = "native"
    timm_name: str = ""  # kind=timm: a timm ViT name (e.g. vit_base_patch16_224), built with pretrained=False
    timm_kwargs: TimmKwargs = field(default_factory=dict)
    sample_rate: int = 16000
    clip_seconds: float = 2.0
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 32
    patch_freq: int = 16
    patch_time: int = 16
    width: int = 64
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False

    # start this tower from existing weights (a run, checkpoint, export or open_clip file; see
    # mmssl/pretrained.py), overriding model.init_from for it
    init_from: str | None = None
    lock: bool = False  # LiT: freeze the tower except its last unlocked_groups layer groups
    unlocked_groups: int = 0  # counted from the head: projection, last block + final norm, ...

    def validate(self, path: str) -> None:
        _check_lock(self, path)
        _positive(self, path, "sample_rate", "clip_seconds", "n_fft", "hop_length", "n_mels")
        if self.kind == "timm":
            _positive(self, path, "patch_freq", "patch_time")
            _check_timm(self, path)
        else:
            _positive(self, path, "patch_freq", "patch_time", "width", "depth", "heads")
        if self.n_mels % self.patch_freq:
            raise ValueError(f"{path}.n_mels={self.n_mels} is not a multiple of patch_freq={self.patch_freq}")
        if self.n_frames < self.patch_time:
            raise ValueError(
                f"{path}: {self.n_frames} spectrogram frames are fewer than patch_time={self.patch_time}"
            )
        if self.kind == "native":
            _heads_divide(self, path)

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)

    @property
    def n_frames(self) -> int:
        # torchaudio's MelSpectrogram(center=True) yields clip_samples // hop + 1 frames
        return self.clip_samples // self.hop_length + 1

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (frequency, time); trailing frames that do not fill a patch are dropped."""
        return self.n_mels // self.patch_freq, self.n_frames // self.patch_time


@dataclass(kw_only=True)
class ModelConfig:
    """Towers that map each modality into one shared embedding space; a tower set to None is off."""

    embed_dim: int = 64
    image: ImageTowerConfig | None = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig | None = field(default_factory=TextTowerConfig)
    audio: AudioTowerConfig | None = field(default_factory=AudioTowerConfig)
    # start every tower the source holds from existing weights (mmssl/pretrained.py): a run directory,
    # checkpoint or export of mmssl, or an open_clip checkpoint file (.pt/.bin/.safetensors)
    init_from: str | None = None
    # refuse a source whose keys or shapes do not match (weights that would silently stay random)
    init_strict: bool = True

    def validate(self, path: str = "model") -> None:
        _positive(self, path, "embed_dim")
        towers = self.modalities
        if len(towers) < 2:
            raise ValueError(
                f"{path}: at least two towers are needed for contrastive alignment, got {towers}"
            )
        for name in towers:
            getattr(self, name).validate(f"{path}.{name}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)


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


# ---------------------------------------------------------------------------------------------------
# Validation helpers


def _check_lock(cfg: Any, path: str) -> None:
    if cfg.unlocked_groups < 0:
        raise ValueError(f"{path}.unlocked_groups must be >= 0, got {cfg.unlocked_groups}")
    if cfg.unlocked_groups and not cfg.lock:
        raise ValueError(f"{path}.unlocked_groups={cfg.unlocked_groups} needs {path}.lock=true")
    if cfg.kind != "native":  # a foreign trunk is one group: locked whole (0) or with the projection open (1)
        if cfg.unlocked_groups > 1:
            raise ValueError(
                f"{path}.unlocked_groups={cfg.unlocked_groups}: a {path}.kind={cfg.kind} tower locks as "
                "two groups (its trunk, then the projection): use 0 or 1"
            )
        return
    if cfg.unlocked_groups > cfg.depth + 2:
        raise ValueError(
            f"{path}.unlocked_groups={cfg.unlocked_groups} exceeds the tower's {cfg.depth + 2} groups "
            "(embeddings, one per block, projection)"
        )


def _check_timm(cfg: Any, path: str) -> None:
    """The settings of a timm tower that can be checked without timm (mmssl.encoders.check_towers
    checks the name and builds the model). An audio tower's patches are patch_freq x patch_time."""
    if not cfg.timm_name:
        raise ValueError(
            f"{path}.timm_name must name a timm model ({path}.kind=timm), e.g. vit_small_patch16_224"
        )
    audio = isinstance(cfg, AudioTowerConfig)
    for key in ("pretrained", "num_classes", "img_size", "in_chans") + (("patch_size",) if audio else ()):
        if key in cfg.timm_kwargs:
            raise ValueError(
                f"{path}.timm_kwargs.{key} is set by mmssl (see the tower's docstring), not here"
            )


def _heads_divide(cfg: Any, path: str) -> None:
    if cfg.width % cfg.heads:
        raise ValueError(f"{path}.width={cfg.width} is not divisible by heads={cfg.heads}")


# ---------------------------------------------------------------------------------------------------
# Dotted overrides and (de)serialisation


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``a.b.c=value`` strings in order. Values parse as JSON where they can (numbers, true/false,
    null, lists), else as plain strings; each is checked against the field's declared type."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (for example optim.lr=3e-4)")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node: Any = cfg
        walked = []
        one_key = bool(parents) and _is_mapping_field(cfg, parents)
        if one_key:  # mapping.key=value sets one key of a mapping field (mapping={...} replaces it)
            *parents, leaf, key = dotted.strip().split(".")
            dotted, raw = ".".join([*parents, leaf]), json.dumps({key: _parse_value(raw)})
        for part in parents:
            walked.append(part)
            if not dataclasses.is_dataclass(node) or part not in _field_names(node):
                raise ValueError(f"unknown config field {'.'.join(walked)!r} in override {item!r}")
            child = getattr(node, part)
            if child is None:  # switch a tower that is off back on, with its defaults
                child = _dataclass_type(_field_types(node)[part])()
                setattr(node, part, child)
            node = child
        if not dataclasses.is_dataclass(node) or leaf not in _field_names(node):
            raise ValueError(f"unknown config field {dotted!r} in override {item!r}")
        tp = _field_types(node)[leaf]
        try:
            value = _coerce(tp, _parse_value(raw), dotted)
        except ValueError as first:
            try:
                value = _coerce(tp, raw, dotted)  # a string field given something that looks like JSON
            except ValueError:
                raise first from None
        if one_key:
            value = {**getattr(node, leaf), **value}
        setattr(node, leaf, value)
    return cfg


def _is_mapping_field(cfg: Any, parts: list[str]) -> bool:
    """Whether the dotted path ``parts`` names a field of mapping type (``dict[str, ...]``)."""
    node: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node) or part not in _field_names(node):
            return False
        node = getattr(node, part)
    if node is None or not dataclasses.is_dataclass(node) or parts[-1] not in _field_names(node):
        return False
    return typing.get_origin(_field_types(node)[parts[-1]]) is dict


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build a config dataclass from plain data (the inverse of :func:`to_dict`), type-checking leaves."""
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ValueError(f"unknown config field {(path + '.' if path else '') + sorted(unknown)[0]!r}")
    kwargs = {
        name: _coerce(types_[name], value, f"{path}.{name}" if path else name) for name, value in data.items()
    }
    return cls(**kwargs)


def save_json(cfg: RunConfig, path: str | Path) -> None:
    """Written to a temporary file and renamed: a rank reading it (another node's launcher may be
    writing the same file) never sees half of one. A URL's user:password part is written as ***."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(mask(json.dumps(to_dict(cfg), indent=2)) + "\n")
    os.replace(tmp, path)


def url_credentials(cfg: RunConfig) -> dict[str, str]:
    """{masked URL start: the real one} for each URL in the config with a user:password part, so that
    ranks reading a saved (masked) config.json get them back from their launcher's environment."""
    return credentials(json.dumps(to_dict(cfg)))


# Settings added after runs were saved without them, with the value those runs trained with (a new run's
# default may differ): a saved config.json that lacks one rebuilds the model it was trained as.
SAVED_BEFORE: dict[str, Any] = {"objectives.masked_text.tie_head": False}


def with_saved_before(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config's plain data with each :data:`SAVED_BEFORE` setting it lacks filled in (in place)
    wherever its parent section is present."""
    for dotted, value in SAVED_BEFORE.items():
        *parents, name = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(name, value)
    return data


def load_json(path: str | Path, credentials: dict[str, str] | None = None) -> RunConfig:
    """A config.json written by :func:`save_json`, by this version or an earlier one (see SAVED_BEFORE)."""
    text = Path(path).read_text()
    for masked, real in (credentials or {}).items():
        text = text.replace(masked, real)
    return from_dict(RunConfig, with_saved_before(json.loads(text)))


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _field_types(cls_or_obj: Any) -> dict[str, Any]:
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type:
    for arg in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(arg):
            return arg
    raise AssertionError(f"{tp} holds no dataclass")


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and convert where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{path} cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f'{path} must be a mapping, e.g. {{"key": value}}, got {value!r}')
        key_tp, value_tp = args
        return {_coerce(key_tp, k, path): _coerce(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping of fields, got {value!r}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} at {path}")
