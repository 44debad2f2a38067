"""The towers' configs (``model.*``): mmssl's own ViT, text and audio transformers or timm / Hugging Face
trunks, each with its pretrained start and LiT lock, and the token ids the text side reserves. A leaf
beside :mod:`mmssl.objectives_config`; re-exported by :mod:`mmssl.config` (import configs from there)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmssl.config_checks import MODALITIES
from mmssl.config_checks import positive as _positive

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
