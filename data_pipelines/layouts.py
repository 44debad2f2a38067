"""Which files of a sample feed which modality: the layouts people already have, and explicit ones.

An entry names a file extension ("jpg") or a field of the sample's JSON file ("json:text"); for each
modality the first entry a sample has wins. A JSON text field may hold one caption or a list of
captions (LAION-Audio / CLAP): training picks one at random (seeded per sample), evaluation the first.

Presets (every one reads a label from json "label" or a cls file, when the sample has one):
    mmssl        image png/jpg/jpeg/webp, text txt or json "text", audio flac/wav/ogg/mp3
    img2dataset  image jpg/png/webp/jpeg, text txt or json "caption" (its json also holds key, url,
                 status, sizes, exif, sha256...: fields no layout entry names are never read)
    clap         audio flac/wav/ogg/mp3, text json "text" (a list of captions)

A label is a class id (an integer) or a class name (a string); see decode.read_label.

A layout can also be written as a string, e.g. "image=jpg,png;text=json:caption;audio=flac", which is
what a command line or a JSON config gives.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

JSON_PREFIX = "json:"


@dataclass(kw_only=True, frozen=True)
class Layout:
    """Per modality, the entries ("ext" or "json:field") that may hold it; an empty tuple never loads it."""

    name: str = "custom"
    image: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    audio: tuple[str, ...] = ()
    label: tuple[str, ...] = ("json:label", "cls")

    def __post_init__(self) -> None:
        for modality in ("image", "text", "audio", "label"):
            entries = tuple(str(e).strip().lower() for e in getattr(self, modality))
            for entry in entries:
                if not entry.removeprefix(JSON_PREFIX):
                    raise ValueError(f"layout {self.name!r}: bad {modality} entry {entry!r}")
                if entry.startswith(JSON_PREFIX) and modality not in ("text", "label"):
                    raise ValueError(
                        f"layout {self.name!r}: {modality} entry {entry!r} reads JSON; only text and "
                        "label can come from a JSON field"
                    )
            object.__setattr__(self, modality, entries)
        if not (self.image or self.text or self.audio):
            raise ValueError(f"layout {self.name!r} maps no file to any modality")

    def entries(self, modality: str) -> tuple[str, ...]:
        return getattr(self, modality)

    def describe(self) -> str:
        parts = [f"{m}={','.join(self.entries(m))}" for m in ("image", "text", "audio") if self.entries(m)]
        return f"{self.name!r} ({'; '.join(parts)})"


_AUDIO = ("flac", "wav", "ogg", "mp3")
PRESETS: dict[str, Layout] = {
    "mmssl": Layout(
        name="mmssl", image=("png", "jpg", "jpeg", "webp"), text=("txt", "json:text"), audio=_AUDIO
    ),
    "img2dataset": Layout(
        name="img2dataset", image=("jpg", "png", "webp", "jpeg"), text=("txt", "json:caption")
    ),
    "clap": Layout(name="clap", text=("json:text",), audio=_AUDIO),
}


def parse_layout(spec: str) -> Layout:
    """A preset name, or "modality=entry,entry;..." (modalities image, text, audio, label)."""
    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec]
    if "=" not in spec:
        raise ValueError(
            f"unknown layout {spec!r}: use one of {sorted(PRESETS)} or 'image=jpg;text=txt;audio=flac'"
        )
    known = {f.name for f in fields(Layout)} - {"name"}
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        modality, _, entries = part.partition("=")
        modality = modality.strip()
        if modality not in known:
            raise ValueError(f"layout {spec!r}: unknown modality {modality!r} (use {sorted(known)})")
        kwargs[modality] = tuple(e.strip() for e in entries.split(",") if e.strip())
    return Layout(name=spec, **kwargs)


def resolve_layout(layout: "str | Layout | Mapping[str, Any]") -> Layout:
    """A Layout from a preset name, a "modality=..." string, a Layout, or a mapping of its fields."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str):
        return parse_layout(layout)
    if isinstance(layout, Mapping):
        return Layout(**{k: tuple(v) if k != "name" else v for k, v in layout.items()})
    raise ValueError(f"a layout is a preset name, a 'modality=ext,...' string or a Layout, got {layout!r}")
