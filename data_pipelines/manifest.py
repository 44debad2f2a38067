"""Write shards from a folder of files described by a JSONL or CSV manifest.

One manifest row is one sample. Its columns (JSONL keys) name, relative to the folder, an image file
and/or an audio file, and/or give the text; optionally a label (an integer), a key, a group and
extra JSON. A row may carry any non-empty subset of image, text and audio. Files are stored as they
are (png/jpg/webp images; wav/flac/ogg/mp3 audio); other readable formats are converted losslessly
(images to PNG, audio to float WAV). In JSONL, text may also be a list of captions (stored as the
JSON "text" list, which the mmssl and clap layouts read; training picks one at random).

A row is skipped, with its line number, key, kind and reason, when:
    bad_row              the line is not a JSON object, or its key is invalid or repeated, or text is
                         neither a string nor a list of strings
    path_escapes_folder  a path leads outside the folder (absolute, "..", or through a symlink)
    missing_file         a named file does not exist
    bad_image/bad_audio  a named file cannot be decoded
    bad_label            the label is not an integer
    bad_extra            the extra column is not a JSON object
    no_modality          the row names no image, no audio and no (non-empty) text
Each sample's JSON holds {"label"?, "text"? (list), "source": {"row", "image"?, "audio"?}, "extra"?}.
"""

import csv
import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from data_pipelines.shards import check_key, write_shards
from data_pipelines.transforms import probe_audio, probe_image

SKIP_KINDS = (
    "bad_row",
    "path_escapes_folder",
    "missing_file",
    "bad_image",
    "bad_audio",
    "bad_label",
    "bad_extra",
    "no_modality",
)
_IMAGE_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_AUDIO_EXT = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}


class _Skip(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def read_manifest(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None when unparseable, reason) for each row of a .jsonl/.ndjson/.csv/.tsv file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exn:
                    yield line_no, None, f"line {line_no} is not JSON ({exn})"
                    continue
                yield (line_no, row, "") if isinstance(row, dict) else (line_no, None, "not a JSON object")
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}, ""
    else:
        raise ValueError(f"manifest {path} must be a .jsonl, .ndjson, .csv or .tsv file")


def _file(root: str, value: Any, column: str) -> tuple[str, bytes]:
    """(path relative to the folder, bytes) of a file named in a row; raises _Skip."""
    if not isinstance(value, str):
        raise _Skip("bad_row", f"{column} must be a path, got {value!r}")
    real = os.path.realpath(os.path.join(root, value))
    if os.path.commonpath([root, real]) != root:
        raise _Skip("path_escapes_folder", f"{column} {value!r} leads outside the folder (to {real})")
    if not os.path.isfile(real):
        raise _Skip("missing_file", f"{column} {value!r} does not exist")
    with open(real, "rb") as f:
        return os.path.relpath(real, root), f.read()


def _image(data: bytes, rel: str) -> tuple[str, bytes]:
    try:
        fmt = probe_image(data)
        if fmt in _IMAGE_EXT:
            return _IMAGE_EXT[fmt], data
        with Image.open(io.BytesIO(data)) as img:
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    except Exception as exn:  # PIL raises many types for bad bytes
        raise _Skip("bad_image", f"{rel}: {type(exn).__name__}: {exn}") from exn


def _audio(data: bytes, rel: str) -> tuple[str, bytes]:
    try:
        fmt = str(probe_audio(data)["format"])
        if fmt in _AUDIO_EXT:
            return _AUDIO_EXT[fmt], data
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [T, channels]
        buffer = io.BytesIO()
        soundfile.write(buffer, wave, rate, format="WAV", subtype="FLOAT")
        return "wav", buffer.getvalue()
    except Exception as exn:  # libsndfile raises several types for bad bytes
        raise _Skip("bad_audio", f"{rel}: {type(exn).__name__}: {exn}") from exn


def _label(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise _Skip("bad_label", f"label {value!r} is not an integer")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _Rows:
    """Turns manifest rows into samples, recording every skipped row."""

    def __init__(self, root: str, cols: dict[str, str | None]) -> None:
        self.root, self.cols = root, cols
        self.seen: set[str] = set()
        self.skipped: list[dict[str, Any]] = []
        self.modalities: Counter[str] = Counter()
        self.written = 0

    def get(self, row: dict[str, Any], name: str) -> Any:
        column = self.cols[name]
        return None if column is None or _blank(row.get(column)) else row[column]

    def sample(self, line_no: int, key: str, row: dict[str, Any]) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": key}
        meta: dict[str, Any] = {"source": {"row": line_no}}
        if (value := self.get(row, "image")) is not None:
            rel, data = _file(self.root, value, self.cols["image"])
            ext, sample[ext] = _image(data, rel)
            meta["source"]["image"] = rel
        if (value := self.get(row, "audio")) is not None:
            rel, data = _file(self.root, value, self.cols["audio"])
            ext, sample[ext] = _audio(data, rel)
            meta["source"]["audio"] = rel
        if (text := self.get(row, "text")) is not None:
            if isinstance(text, list) and all(isinstance(t, str) for t in text):
                captions = [t.strip() for t in text if t.strip()]
                if captions:
                    meta["text"] = captions
            elif isinstance(text, str):
                sample["txt"] = text.strip()
            else:
                raise _Skip("bad_row", f"text must be a string or a list of strings, got {text!r}"[:200])
        if (label := self.get(row, "label")) is not None:
            meta["label"] = _label(label)
        if (extra := self.get(row, "extra")) is not None:
            if isinstance(extra, str):
                try:
                    extra = json.loads(extra)
                except ValueError as exn:
                    raise _Skip("bad_extra", f"extra is not JSON: {exn}") from exn
            if not isinstance(extra, dict):
                raise _Skip("bad_extra", f"extra must be a JSON object, got {extra!r}"[:200])
            meta["extra"] = extra
        present = [m for m in ("image", "audio") if m in meta["source"]]
        present += ["text"] if "txt" in sample or "text" in meta else []
        if not present:
            raise _Skip("no_modality", "the row names no image, no audio and no text")
        self.modalities.update(present)
        sample["json"] = meta
        return sample

    def samples(self, rows: list[tuple[int, str, dict[str, Any]]], bar: tqdm) -> Iterator[dict[str, Any]]:
        for line_no, key, row in rows:
            bar.update(1)
            try:
                sample = self.sample(line_no, key, row)
            except _Skip as skip:
                self.skipped.append({"row": line_no, "key": key, "kind": skip.kind, "reason": skip.reason})
                continue
            self.written += 1
            yield sample


def _split(units: list[str], test_fraction: float, seed: int) -> set[str]:
    """The units (keys or groups) that go to the test split: round(n * fraction) of them, at least 1."""
    if test_fraction == 0:
        return set()
    n_test = max(1, round(len(units) * test_fraction))
    if n_test >= len(units):
        raise ValueError(
            f"test_fraction={test_fraction} of {len(units)} rows (or groups) leaves no training sample"
        )
    order = np.random.default_rng(seed).permutation(len(units))
    return {units[i] for i in order[:n_test].tolist()}


def write_from_manifest(
    folder: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    image_col: str | None = "image",
    audio_col: str | None = "audio",
    text_col: str | None = "text",
    label_col: str | None = "label",
    extra_col: str | None = "extra",
    key_col: str | None = None,
    group_col: str | None = None,
    max_count: int = 1000,
    max_bytes: int = 2**30,
    test_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write out_dir/train (and out_dir/test when test_fraction > 0) shards + sizes.json from a manifest.

    `manifest` is a path, or a name inside `folder`. A column set to None is not read. Keys come from
    `key_col`, else from the row's position ("00000000", ...). The test split takes round(n *
    test_fraction) rows (at least one), chosen with `seed`; rows sharing a `group_col` value go to
    the same split. Skipped rows are listed in out_dir/skipped.jsonl too.

    Returns {"folder", "manifest", "out_dir", "rows", "written", "splits" {name: write_shards()'s
    summary, or {"total": 0} when nothing was left}, "modalities" {m: samples}, "skipped" {kind: n},
    "skipped_rows" [{"row", "key", "kind", "reason"}], "skipped_file", "seconds"}.
    Raises ValueError/FileNotFoundError for a missing folder or manifest, an empty manifest, one with
    none of the modality columns, or a split that leaves no training row; FileExistsError when
    out_dir/train or out_dir/test already holds shards (nothing is overwritten).
    """
    start = time.perf_counter()
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_count <= 0 or max_bytes <= 0:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count} and {max_bytes}")
    root = os.path.realpath(folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder {folder} does not exist")
    path = Path(manifest)
    if not path.is_file() and (Path(root) / path).is_file():
        path = Path(root) / path
    if not path.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist (nor in {folder})")
    cols = {"image": image_col, "audio": audio_col, "text": text_col, "label": label_col, "extra": extra_col}
    rows_out = _Rows(root, cols)

    rows: list[tuple[int, str, dict[str, Any]]] = []
    columns: set[str] = set()
    n_rows = 0
    for index, (line_no, row, reason) in enumerate(read_manifest(path)):
        n_rows += 1
        key = f"{index:08d}"
        try:
            if row is None:
                raise _Skip("bad_row", reason)
            columns.update(row)
            if key_col is not None:
                key = row.get(key_col)
                key = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
            try:
                check_key(key, rows_out.seen)
            except ValueError as exn:
                raise _Skip("bad_row", str(exn)) from exn
            rows.append((line_no, key, row))
        except _Skip as skip:
            rows_out.skipped.append({"row": line_no, "key": key, "kind": skip.kind, "reason": skip.reason})
    if n_rows == 0:
        raise ValueError(f"manifest {path} has no rows")
    wanted = [c for c in (image_col, audio_col, text_col) if c is not None]
    if rows and not columns & set(wanted):
        raise ValueError(
            f"manifest {path} has none of the columns {wanted}; its columns are {sorted(columns)}"
        )

    def unit(key: str, row: dict[str, Any]) -> str:
        group = row.get(group_col) if group_col else None
        return f"group:{group}" if not _blank(group) else f"key:{key}"

    units = sorted({unit(key, row) for _, key, row in rows})
    test_units = _split(units, test_fraction, seed) if rows else set()
    splits_rows = {"train": [r for r in rows if unit(r[1], r[2]) not in test_units]}
    if test_fraction > 0:
        splits_rows["test"] = [r for r in rows if unit(r[1], r[2]) in test_units]

    out = Path(out_dir)
    splits: dict[str, Any] = {}
    with tqdm(total=len(rows), desc="writing shards", unit="row", disable=not progress) as bar:
        for name, split_rows in splits_rows.items():
            before = rows_out.written
            try:
                splits[name] = write_shards(
                    rows_out.samples(split_rows, bar), out / name, max_count=max_count, max_bytes=max_bytes
                )
            except ValueError:
                if rows_out.written > before:
                    raise
                splits[name] = {"total": 0}  # every row of this split was skipped

    rows_out.skipped.sort(key=lambda s: s["row"])
    skipped_file = None
    if rows_out.skipped:
        out.mkdir(parents=True, exist_ok=True)
        skipped_file = str(out / "skipped.jsonl")
        with open(skipped_file, "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in rows_out.skipped)
    counts = Counter(s["kind"] for s in rows_out.skipped)
    return {
        "folder": str(folder),
        "manifest": str(path),
        "out_dir": str(out),
        "rows": n_rows,
        "written": sum(s["total"] for s in splits.values()),
        "splits": splits,
        "modalities": {
            m: rows_out.modalities[m] for m in ("image", "text", "audio") if rows_out.modalities[m]
        },
        "skipped": {k: counts[k] for k in SKIP_KINDS if counts[k]},
        "skipped_rows": rows_out.skipped,
        "skipped_file": skipped_file,
        "seconds": round(time.perf_counter() - start, 2),
    }
