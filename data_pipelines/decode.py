"""One raw sample (extension -> bytes) -> tensors per modality, through the sample's layout.

Axis legend: S image size, L tokens, M mel bins, F frames.

Every way a sample can be unusable raises `BadSample` with its kind (see bad_data.BAD_KINDS), the
shard and the key; the stream skips it and carries on. Programming errors are not caught.
"""

import json
import shlex
from collections.abc import Mapping
from typing import Any

import torch

from data_pipelines.bad_data import BadSample
from data_pipelines.collate import MODALITIES
from data_pipelines.config import StreamConfig
from data_pipelines.layouts import JSON_PREFIX, PRESETS, Layout
from data_pipelines.remote import is_remote, mask
from data_pipelines.tario import ShardError, expand_shards, scan_shard
from data_pipelines.transforms import (
    Tokenizer,
    audio_to_logmel,
    decode_audio_clip,
    decode_image,
    probe_audio,
    probe_image,
    tokenize,
)

_MISSING = object()


def _reason(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn}".replace("\n", " ")[:300]


class _Fields:
    """Looks up layout entries in one raw sample, parsing its JSON file at most once."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw, self.key, self.url = raw, raw.get("__key__"), raw.get("__url__")
        self._meta: Any = _MISSING

    def bad(self, kind: str, reason: str) -> BadSample:
        return BadSample(kind, self.url, self.key, reason)

    def meta(self) -> dict[str, Any]:
        if self._meta is _MISSING:
            if "json" not in self.raw:
                self._meta = {}
            else:
                try:
                    self._meta = json.loads(self.raw["json"])
                except (ValueError, UnicodeDecodeError) as exn:
                    raise self.bad("bad_json", f"json does not parse: {_reason(exn)}") from exn
                if not isinstance(self._meta, dict):
                    raise self.bad("bad_json", f"json must be an object, got {type(self._meta).__name__}")
        return self._meta

    def find(self, entries: tuple[str, ...]) -> tuple[str, Any] | None:
        """(entry, value) of the first entry the sample holds; a JSON field set to null counts as absent."""
        for entry in entries:
            if entry.startswith(JSON_PREFIX):
                if "json" in self.raw:
                    value = self.meta().get(entry[len(JSON_PREFIX) :])
                    if value is not None:
                        return entry, value
            elif entry in self.raw:
                return entry, self.raw[entry]
        return None


def read_label(raw: Mapping[str, Any], layout: Layout) -> int | str | None:
    """The sample's label under `layout`: a class id (int >= 0), a class name (str), or None (absent).

    A JSON integer is an id and a JSON string a name; a file (`cls`) or a JSON string holding a decimal
    integer is an id too ("3" -> 3), any other non-empty string is a name (stripped). A negative id or
    an empty string counts as absent. Anything else (a float, a list, an object, true/false, bytes
    that are not UTF-8, a JSON file that does not parse) raises BadSample("bad_label").
    """
    return _label(_Fields(raw), layout)


def _label(fields: _Fields, layout: Layout) -> int | str | None:
    try:
        found = fields.find(layout.label)
    except BadSample as exn:  # JSON that does not parse: only the label is lost, if nothing else needs it
        raise fields.bad("bad_label", exn.reason) from None
    if found is None:
        return None
    entry, value = found
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise fields.bad("bad_label", f"label in {entry} is not UTF-8: {value[:40]!r}") from None
    if isinstance(value, str):
        value = value.strip()
        try:
            value = int(value)
        except ValueError:
            return value or None  # a class name
    if isinstance(value, bool) or not isinstance(value, int):
        what = f"{type(value).__name__} {json.dumps(value)[:60]}"
        raise fields.bad("bad_label", f"label in {entry} is a {what}, not an integer or a class name")
    return value if value >= 0 else None


def _caption(fields: _Fields, entry: str, value: Any, train: bool, generator: torch.Generator | None) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exn:
            raise fields.bad("bad_text", f"{entry} is not UTF-8: {_reason(exn)}") from exn
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise fields.bad("bad_text", f"{entry} must be a caption or a non-empty list of captions")
        pick = int(torch.randint(len(value), (1,), generator=generator)) if train and len(value) > 1 else 0
        value = value[pick]
    if not isinstance(value, str):
        raise fields.bad("bad_text", f"{entry} must be a caption or a list of captions, got {value!r}"[:200])
    caption = value.strip()
    if not caption:
        raise fields.bad("empty_caption", f"{entry} is empty")
    return caption


def decode_sample(
    raw: Mapping[str, Any],
    cfg: StreamConfig,
    *,
    layout: Layout | None = None,
    tokenizer: Tokenizer | None = None,
    generator: torch.Generator | None = None,
    templates: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Raw sample -> {"__key__", "__url__", "label", modality: tensor or None (absent)} for cfg's
    modalities. "label" is a class id, a class name or None (see read_label); a bad label does not make
    the sample bad: its label is None and its record is under "__bad__" (one BadSample record).

    `layout` defaults to cfg.layout. `generator` drives the random choices of training (image crop,
    flip and jitter, audio crop, caption pick). With `templates` (see `templates()`), every tensor's
    shape and dtype is checked.
    Raises BadSample; at least one configured modality is present in what it returns.

    In training, each modality of cfg.views also gets "<modality>_view" (None where the modality is absent):
    its bytes decoded and augmented once more, drawn from `generator` after every other draw, so
    turning views on leaves the first view as it was and a resumed stream repeats both.
    """
    fields = _Fields(raw)
    layout = layout or cfg.layout
    assert isinstance(layout, Layout)
    found = {m: fields.find(layout.entries(m)) for m in cfg.modalities()}
    if all(f is None for f in found.values()):
        have = sorted(raw.get("__files__") or (k for k in raw if not k.startswith("__")))
        wanted = {m: layout.entries(m) for m in found}
        raise fields.bad("no_modality", f"it has {have}; layout {layout.name!r} looks for {wanted}")

    out: dict[str, Any] = {"__key__": fields.key, "__url__": fields.url, "label": None}
    try:
        out["label"] = _label(fields, layout)
    except BadSample as exn:
        if exn.kind != "bad_label":
            raise
        out["__bad__"] = [exn.record()]
    for modality, hit in found.items():
        if hit is None:
            out[modality] = None
            continue
        entry, value = hit
        if modality == "text":
            caption = _caption(fields, entry, value, cfg.train, generator)
            try:
                out["text"] = tokenize(caption, tokenizer)  # [L]
            except Exception as exn:  # the tokenizer is user-supplied: name the caption it failed on
                raise fields.bad("bad_text", f"tokenizer failed on {caption[:60]!r}: {_reason(exn)}") from exn
            continue
        try:
            if modality == "image":
                out["image"] = decode_image(value, cfg.image, cfg.train, generator)  # [3, S, S]
            else:
                wave, sr = decode_audio_clip(value, cfg.audio, cfg.train, generator)  # [<= span]
                out["audio"] = audio_to_logmel(wave, sr, cfg.audio, cfg.train, generator)  # [M, F]
        except Exception as exn:  # PIL and libsndfile raise many types for bad bytes
            raise fields.bad(f"bad_{modality}", f"{entry}: {_reason(exn)}") from exn
    for modality in cfg.views if cfg.train else ():
        hit = found[modality]
        out[f"{modality}_view"] = (
            None if hit is None else _second_view(fields, modality, *hit, cfg, generator)
        )

    for modality, template in (templates or {}).items():
        tensor = out.get(modality)
        if tensor is not None and (tensor.shape != template.shape or tensor.dtype != template.dtype):
            raise fields.bad(
                "bad_shape",
                f"{modality} is {tuple(tensor.shape)} {tensor.dtype} after transforms, "
                f"expected {tuple(template.shape)} {template.dtype}",
            )
    return out


def _second_view(
    fields: _Fields,
    modality: str,
    entry: str,
    value: Any,
    cfg: StreamConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Another draw of the training transforms of an image or clip the first view decoded already."""
    try:
        if modality == "image":
            return decode_image(value, cfg.image, cfg.train, generator)  # [3, S, S]
        wave, sr = decode_audio_clip(value, cfg.audio, cfg.train, generator)  # [<= span]
        return audio_to_logmel(wave, sr, cfg.audio, cfg.train, generator)  # [M, F]
    except Exception as exn:  # as for the first view (a random crop may reach other bytes)
        raise fields.bad(f"bad_{modality}", f"{entry} (second view): {_reason(exn)}") from exn


def wanted_files(layout: Layout, modalities: tuple[str, ...]) -> frozenset[str]:
    """The file extensions `decode_sample` may read for these modalities under `layout` (the rest of a
    sample's files need not be read at all)."""
    entries = [e for m in modalities for e in layout.entries(m)] + list(layout.label)
    return frozenset("json" if e.startswith(JSON_PREFIX) else e for e in entries)


def templates(cfg: StreamConfig, tokenizer: Tokenizer | None) -> dict[str, torch.Tensor]:
    """Per-sample zero tensors of each configured modality's exact shape and dtype.

    collate uses them when a whole batch lacks a modality; decode_sample checks every sample against them.
    """
    out = {}
    if cfg.image is not None:
        out["image"] = torch.zeros(3, cfg.image.size, cfg.image.size)  # [3, S, S]
    if cfg.text and tokenizer is not None:
        out["text"] = torch.zeros_like(tokenize("", tokenizer))  # [L]
    if cfg.audio is not None:
        out["audio"] = torch.zeros(cfg.audio.n_mels, cfg.audio.n_frames)  # [M, F]
    for modality in cfg.views if cfg.train else ():
        out[f"{modality}_view"] = out[modality]
    return out


def _matches(raw: Mapping[str, Any], layout: Layout, modalities: tuple[str, ...]) -> list[str]:
    fields = _Fields(raw)
    found = []
    for modality in modalities:
        try:
            if fields.find(layout.entries(modality)) is not None:
                found.append(modality)
        except BadSample:  # unparseable JSON: this sample proves nothing either way
            pass
    return found


def _reads(raw: Mapping[str, Any], layout: Layout, modalities: tuple[str, ...]) -> int:
    """How many of `modalities` `layout` reads from `raw` (0 when the sample is bad under it)."""
    try:
        present = inspect_sample(raw, layout)
    except BadSample:
        return 0
    return sum(m in present for m in modalities)


def layout_hint(raw: Mapping[str, Any], modalities: tuple[str, ...], layout: Layout, setting: str) -> str:
    """A likely fix, in a few words, for a sample (every file loaded) that is bad under `layout`: the
    presets that read it as `setting=name`, best first (most configured modalities read, then the
    narrowest preset: fewest entries); else how to look closer."""
    held = "/".join(sorted(k for k in raw if not k.startswith("__"))) or "no files"
    reads = {name: _reads(raw, p, modalities) for name, p in PRESETS.items() if p != layout}

    def rank(name: str) -> tuple[int, int]:
        return -reads[name], sum(len(PRESETS[name].entries(m)) for m in MODALITIES)

    fits = sorted((name for name, n in reads.items() if n), key=rank)
    if fits:
        return f"the shards hold {held}: try " + " or ".join(f"{setting}={name}" for name in fits)
    verify = (
        f"mmssl shards --verify {shlex.quote(str(raw.get('__url__')))} --layout {shlex.quote(layout.name)}"
    )
    return f"the shards hold {held}: see what is wrong with `{verify}`"


def check_layout(cfg: StreamConfig, *, samples: int = 16) -> list[dict[str, Any]]:
    """Fail at start-up, with one clear message, when a source's shards or layout match nothing.

    Per source: its shard spec must match files (else FileNotFoundError), and among the first
    `samples` samples of its first readable shard (up to 3 local shards are tried; remote shards until
    one answers, each once) at least one must hold a
    configured modality under the source's layout (else ValueError naming the keys found and a preset
    that would match). Returns, per source, {"shards", "layout", "checked", "samples", "matched"}.
    """
    report = []
    for i, source in enumerate(cfg.source_list()):
        layout = source.layout
        assert isinstance(layout, Layout)
        urls = expand_shards(source.shards)
        raws: list[dict[str, Any]] = []
        errors: list[str] = []
        for url in urls if any(map(is_remote, urls)) else urls[:3]:
            try:
                for ref in scan_shard(url, retries=0):
                    raws.append(ref.load())
                    if len(raws) >= samples:
                        break
            except (ShardError, OSError) as exn:
                errors.append(str(exn))
            if raws:
                break
        shown = mask(source.shards)
        what = f"source {i} ({shown!r})" if len(cfg.source_list()) > 1 else f"shards {shown!r}"
        if not raws:
            more = f" (and {len(errors) - 3} more shards)" if len(errors) > 3 else ""
            raise ValueError(
                f"{what}: no sample could be read from the first shards: {'; '.join(errors[:3])}{more}"
            )
        matched = {m: sum(m in _matches(r, layout, cfg.modalities()) for r in raws) for m in cfg.modalities()}
        if not any(matched.values()):
            keys = sorted({k for r in raws for k in r if not k.startswith("__")})
            fits = [
                name
                for name, preset in PRESETS.items()
                if any(_matches(r, preset, cfg.modalities()) for r in raws)
            ]
            hint = f"; layout {' or '.join(map(repr, fits))} would match" if fits else ""
            raise ValueError(
                f"{what}: layout {layout.describe()} matches none of the configured modalities "
                f"{cfg.modalities()} in the first {len(raws)} samples of {raws[0]['__url__']}, "
                f"whose files are {keys}{hint}"
            )
        report.append(
            {
                "shards": shown,
                "layout": layout.name,
                "checked": raws[0]["__url__"],
                "samples": len(raws),
                "matched": matched,
            }
        )
    return report


def inspect_sample(raw: Mapping[str, Any], layout: Layout) -> tuple[str, ...]:
    """The modalities a raw sample holds under `layout`, each decoded (no transforms) to prove it readable.

    Captions are checked as in evaluation (the first of a list). Raises BadSample like decode_sample;
    the label is not read (see read_label).
    """
    fields = _Fields(raw)
    found = {m: fields.find(layout.entries(m)) for m in MODALITIES if layout.entries(m)}
    present = tuple(m for m, hit in found.items() if hit is not None)
    if not present:
        have = sorted(k for k in raw if not k.startswith("__"))
        raise fields.bad("no_modality", f"it has {have}; layout {layout.describe()} matches none")
    for modality in present:
        entry, value = found[modality]
        if modality == "text":
            _caption(fields, entry, value, False, None)
            continue
        try:
            probe_image(value) if modality == "image" else probe_audio(value)
        except Exception as exn:  # PIL and libsndfile raise many types for bad bytes
            raise fields.bad(f"bad_{modality}", f"{entry}: {_reason(exn)}") from exn
    return present
