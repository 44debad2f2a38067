"""Starting a run from existing weights: ``model.init_from=PATH`` (every tower the source holds) and
``model.<tower>.init_from=PATH`` (that tower only, overriding the former).

A source is one of:

- an mmssl run directory, its checkpoint folder, one checkpoint (any ZeRO stage) or an ``mmssl export``
  folder (read with :func:`mmssl.checkpoint.load`); when the whole model starts from it, the logit
  scales (and SigLIP biases) of the contrastive pairs both have are taken too;
- a weights file: ``.safetensors`` (safetensors) or anything else (``.pt``, ``.bin``: ``torch.load`` with
  ``weights_only=True``, so a file cannot run code). A ``"state_dict"`` wrapper (open_clip_train's
  checkpoints) is unwrapped and DDP's ``module.`` prefix stripped. Keys named like ours (``image.*``,
  ``text.*``, ``audio.*``: an export's ``model.safetensors``) are taken as they are; an open_clip CLIP
  state dict is renamed with :func:`mmssl.export.mmssl_key`, the inverse of what export writes, and its
  ``logit_scale``/``logit_bias`` become the image-text pair's. For a timm tower (``kind=timm``), a
  file of timm's own weights (``timm.create_model(...).state_dict()`` saved) loads into its trunk, the
  classifier left out; its projection into the shared space stays as initialised.

Nothing is downloaded. Each tower is matched on its own: a tower the source does not hold keeps its
fresh initialisation (the report says so). Within a tower the source does hold, a key of ours it lacks
(missing), a key of its we lack (unexpected) or a tensor of another shape would leave weights at
random or drop weights silently: such a source is refused in one line unless ``model.init_strict=false``,
when whatever matches loads and the report lists the rest. Position embeddings of another length are
resized first, as open_clip resizes them: the image tower's patch grid bicubic (antialiased, the class
token kept; ``resize_pos_embed``), the text tower's positions linearly (``resize_text_pos_embed``).
A token embedding with more ids than the source's (our default vocabulary has a [MASK] id above
open_clip's 49408) takes the source's rows and keeps the rest as initialised.

Axis legend: L positions, D width, h/w patch grid.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmssl import checkpoint
from mmssl.config import ModelConfig, RunConfig
from mmssl.export import OPEN_CLIP_SCALARS, mmssl_key
from mmssl.model import MultimodalModel

OURS = ("image.", "text.", "audio.")
TIMM_CLASSIFIERS = ("head.", "head_dist.", "fc.", "classifier.")  # timm's classifier names by family
TOKENS = "text.token_embedding.weight"
SHOWN = 3  # key names shown per kind in an error line


@dataclass
class Source:
    path: str
    state: dict[str, Tensor]  # keys named like our model's state dict
    log_logit_scales: dict[str, float] = field(default_factory=dict)  # pair -> log scale
    logit_biases: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Tensor] = field(default_factory=dict)  # a weights file's keys as they are (not ours)


@dataclass
class TowerMatch:
    """How one tower's weights match one source."""

    tower: str
    setting: str  # the config field that named the source ("model.init_from", "model.image.init_from")
    source: str
    expected: int  # tensors in our tower
    load: dict[str, Tensor] = field(default_factory=dict)  # our key -> tensor to copy (resized if needed)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    other_shape: list[str] = field(default_factory=list)  # "key (source shape -> ours)"
    resized: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return bool(self.load or self.unexpected or self.other_shape)

    @property
    def clean(self) -> bool:
        return self.held and not (self.missing or self.unexpected or self.other_shape)


def sources(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """tower -> (setting, path) for every tower that starts from existing weights."""
    out = {}
    for name in cfg.modalities:
        tower_path = getattr(cfg, name).init_from
        if tower_path:
            out[name] = (f"model.{name}.init_from", tower_path)
        elif cfg.init_from:
            out[name] = ("model.init_from", cfg.init_from)
    return out


def read(path: str, setting: str, *, shapes_only: bool = False) -> Source:
    """The weights at ``path``, renamed to our keys; a path that names nothing usable is a ValueError
    naming ``setting``. ``shapes_only``: meta tensors (names and shapes, no data, no scalars) from the
    headers alone, for the check before ranks start: a safetensors header, a torch file mapped rather
    than read, a run's config.json."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{setting}: {path} does not exist")
    if p.is_dir():
        return read_folder(p, setting, shapes_only=shapes_only)
    state = read_file(p, setting, shapes_only=shapes_only)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip_train's checkpoint: {"epoch", "state_dict", "optimizer", ...}
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{setting}: {path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if shapes_only:
        state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    if any(k.startswith(OURS) for k in state):  # ours: an export's model.safetensors
        ours = {k: v for k, v in state.items() if k.startswith(OURS)}
        if shapes_only:
            return Source(str(p), ours)
        scales = {k.removeprefix(checkpoint.LOGIT_SCALE_PREFIX): float(v) for k, v in state.items()
                  if k.startswith(checkpoint.LOGIT_SCALE_PREFIX)}  # fmt: skip
        biases = {k.removeprefix(checkpoint.LOGIT_BIAS_PREFIX): float(v) for k, v in state.items()
                  if k.startswith(checkpoint.LOGIT_BIAS_PREFIX)}  # fmt: skip
        return Source(str(p), ours, scales, biases)
    renamed = {name: v for k, v in state.items() if (name := mmssl_key(k)) is not None}
    if shapes_only:
        return Source(str(p), renamed)
    scalars = {k: float(state[k]) for k in OPEN_CLIP_SCALARS if k in state}
    scales = {"image_text": scalars["logit_scale"]} if "logit_scale" in scalars else {}
    biases = {"image_text": scalars["logit_bias"]} if "logit_bias" in scalars else {}
    return Source(str(p), renamed, scales, biases, raw=state)


def timm_source(tower: str, source: Source) -> Source:
    """A timm model's own state dict (a file of timm weights) as a timm tower's: keys under
    ``<tower>.trunk.``, its classifier left out (the trunk is built without one: num_classes=0)."""
    state = {f"{tower}.trunk.{k}": v for k, v in source.raw.items() if not k.startswith(TIMM_CLASSIFIERS)}
    return Source(source.path, state)


def read_folder(p: Path, setting: str, *, shapes_only: bool) -> Source:
    """An mmssl run, checkpoint or export folder; ``shapes_only``: the model its config.json builds, on
    the meta device (the checkpoint's existence checked, its shards not read)."""
    try:
        if not shapes_only:
            ckpt = checkpoint.load(p)
            return Source(str(p), ckpt.model.state_dict(), ckpt.log_logit_scales, ckpt.logit_biases)
        cfg, _ = checkpoint.find_config(p)
    except FileNotFoundError as e:
        raise ValueError(f"{setting}: {e}") from None
    with torch.device("meta"):
        return Source(str(p), MultimodalModel(cfg.model).state_dict())


def read_file(p: Path, setting: str, *, shapes_only: bool) -> object:
    """What a weights file holds: safetensors (its header alone when ``shapes_only``) or ``torch.load``
    with ``weights_only=True`` (memory-mapped when ``shapes_only``: no tensor's bytes are read)."""
    try:
        if p.suffix == ".safetensors":
            if not shapes_only:
                from safetensors.torch import load_file

                return load_file(str(p))
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
        if shapes_only:
            with contextlib.suppress(RuntimeError):  # a legacy (non-zip) file cannot be mapped: read it
                return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code in it, not a weights file at all
        raise ValueError(f"{setting}: {p} is not a readable weights file ({type(e).__name__}: {e})") from None


def resize_positions(key: str, value: Tensor, shape: torch.Size) -> Tensor | None:
    """A position embedding resized to ``shape`` as open_clip resizes it, or None when ``key`` is none
    or the widths differ. Image ``[1 + h*w, D]``: the class token kept, the square grid bicubic; text
    ``[L, D]``: linear along positions."""
    if value.ndim != 2 or len(shape) != 2 or value.shape[1] != shape[1]:
        return None
    if key == "image.positional_embedding":
        old, new = math.isqrt(value.shape[0] - 1), math.isqrt(shape[0] - 1)
        if old * old != value.shape[0] - 1 or new * new != shape[0] - 1:
            return None
        grid = rearrange(value[1:], "(h w) d -> 1 d h w", h=old)
        grid = F.interpolate(
            grid.float(), size=(new, new), mode="bicubic", antialias=True, align_corners=False
        )
        return torch.cat([value[:1], rearrange(grid, "1 d h w -> (h w) d").to(value.dtype)])
    if key == "text.positional_embedding":
        line = rearrange(value, "l d -> 1 d l").float()
        line = F.interpolate(line, size=shape[0], mode="linear", align_corners=False)
        return rearrange(line, "1 d l -> l d").to(value.dtype)
    return None


def extra_token_rows(theirs: torch.Size, ours: torch.Size) -> bool:
    """Whether our token embedding has the source's rows and more: open_clip's 49408 ids against ours
    with the [MASK] id of masked language modelling. The source's rows load; ours beyond them keep
    their initialisation (the report says so)."""
    return len(theirs) == 2 and theirs[1] == ours[1] and theirs[0] < ours[0]


def match(tower: str, setting: str, source: Source, ours: dict[str, torch.Size]) -> TowerMatch:
    """Our tower's keys and shapes (``ours``, ``tower.*`` only) against the source's."""
    prefix = f"{tower}."
    theirs = {k: v for k, v in source.state.items() if k.startswith(prefix)}
    result = TowerMatch(tower=tower, setting=setting, source=source.path, expected=len(ours))
    result.missing = sorted(set(ours) - set(theirs))
    result.unexpected = sorted(set(theirs) - set(ours))
    for key in sorted(set(ours) & set(theirs)):
        value = theirs[key]
        if key == TOKENS and extra_token_rows(value.shape, ours[key]):
            result.resized.append(f"{key} {tuple(value.shape)} -> {tuple(ours[key])} (our extra ids kept)")
        elif value.shape != ours[key]:
            resized = resize_positions(key, value, ours[key])
            if resized is None:
                result.other_shape.append(f"{key} {tuple(value.shape)} -> {tuple(ours[key])}")
                continue
            result.resized.append(f"{key} {tuple(value.shape)} -> {tuple(ours[key])}")
            value = resized
        result.load[key] = value
    return result


def plan(
    cfg: ModelConfig, ours: dict[str, torch.Size], *, strict: bool, shapes_only: bool = False
) -> tuple[list[TowerMatch], dict[str, Source]]:
    """Every tower's match against its source (each source read once); refuses (ValueError, one line) a
    source that would leave weights at random when ``strict``."""
    wanted = sources(cfg)
    read_once: dict[str, Source] = {}
    matches = []
    for tower, (setting, path) in wanted.items():
        if path not in read_once:
            read_once[path] = read(path, setting, shapes_only=shapes_only)
        tower_keys = {k: s for k, s in ours.items() if k.startswith(f"{tower}.")}
        source = read_once[path]
        if getattr(cfg, tower).kind == "timm" and source.raw:  # timm's own weights: the trunk's only
            source = timm_source(tower, source)
            tower_keys = {k: s for k, s in tower_keys.items() if k.startswith(f"{tower}.trunk.")}
        matches.append(match(tower, setting, source, tower_keys))
    by_setting = defaultdict(list)
    for m in matches:
        by_setting[(m.setting, m.source)].append(m)
    for (setting, _), group in by_setting.items():
        # a whole-model source needs to hold at least one tower; a tower's own source, that tower
        needed = group if setting != "model.init_from" else [m for m in group if m.held] or group[:1]
        for m in needed:
            if strict and not m.clean:
                raise ValueError(refusal(m))
    return matches, read_once


def refusal(m: TowerMatch) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")

    if not m.held:
        what = "holds no weights for it"
    else:
        parts = [f"{len(keys)} {kind} ({some(keys)})" for kind, keys in
                 (("missing", m.missing), ("unexpected", m.unexpected), ("of another shape", m.other_shape)) if keys]  # fmt: skip
        what = "does not match it: " + "; ".join(parts)
    return (
        f"{m.setting}={m.source}: the {m.tower} tower ({m.expected} tensors) {what}; weights would stay at "
        f"random: make model.{m.tower} match the source or set model.init_strict=false"
    )


def check(cfg: RunConfig) -> None:
    """Before any rank starts: every source exists, reads, and matches (unless ``init_strict=false``),
    from headers alone (every rank reads the weights in :func:`initialize`). Our shapes come from a
    model built on the meta device (no memory, no initialisation)."""
    if not sources(cfg.model):
        return
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MultimodalModel(cfg.model).state_dict().items()}
    plan(cfg.model, shapes, strict=cfg.model.init_strict, shapes_only=True)


@torch.no_grad()
def initialize(task: nn.Module, cfg: RunConfig, *, show: bool = True) -> list[TowerMatch]:
    """Copy the sources' weights into ``task.model`` (and the pairs' scales into ``task.contrastive``)
    before the engine wraps the task; prints the report table when ``show``."""
    model_state = task.model.state_dict()
    shapes = {k: v.shape for k, v in model_state.items()}
    matches, read_once = plan(cfg.model, shapes, strict=cfg.model.init_strict)
    for m in matches:
        for key, value in m.load.items():
            model_state[key][: len(value)].copy_(value)  # all of it but for extra token rows
    scalars = whole_model_scalars(task, cfg, matches, read_once)
    if show and matches:
        print(report(matches, scalars), flush=True)
    return matches


def whole_model_scalars(
    task: nn.Module, cfg: RunConfig, matches: list[TowerMatch], read_once: dict[str, Source]
) -> list[str]:
    """A whole-model source's logit scales/biases for the pairs whose towers both loaded from it."""
    if not cfg.model.init_from:
        return []
    loaded = {m.tower for m in matches if m.setting == "model.init_from" and m.load}
    source = read_once[cfg.model.init_from]
    done = []
    for params, values in ((task.contrastive.logit_scale, source.log_logit_scales),
                           (task.contrastive.logit_bias, source.logit_biases)):  # fmt: skip
        for pair, value in values.items():
            if pair in params and set(pair.split("_")) <= loaded:
                params[pair].fill_(value)
                done.append(pair)
    return done


def report(matches: list[TowerMatch], scalars: list[str]) -> str:
    """One table: per tower, its source and how many tensors loaded, were missing, unexpected, resized or
    of another shape; then the names of those that did not load as they were."""
    header = ("tower", "loaded", "missing", "unexpected", "resized", "other shape", "source")
    rows = [
        (m.tower, f"{len(m.load)}/{m.expected}", len(m.missing), len(m.unexpected), len(m.resized),
         len(m.other_shape), f"{m.setting}={m.source}")
        if m.held else
        (m.tower, f"0/{m.expected}", "-", "-", "-", "-", f"{m.setting}={m.source} (holds no {m.tower} tower: stays as initialised)")
        for m in matches
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = ["init_from: " + line(header)] + ["           " + line(r) for r in rows]
    for m in matches:
        if not m.held:
            continue
        for kind, keys in (("missing", m.missing), ("unexpected", m.unexpected),
                           ("resized", m.resized), ("other shape", m.other_shape)):  # fmt: skip
            if keys:
                lines.append(f"  {m.tower} {kind}: {', '.join(keys)}")
    if scalars:
        lines.append(f"  logit scale/bias of {', '.join(scalars)} from model.init_from")
    return "\n".join(lines)
