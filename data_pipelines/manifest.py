"""Write shards from a folder of files described by a JSONL or CSV manifest.

One manifest row is one sample. Its columns (JSONL keys) name, relative to the folder, an image file
and/or an audio file, and/or give the text; optionally a label (a class id or a class name), a key, a group and
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
    bad_label            the label is neither an integer nor a class name (a list, an object, ...)
    bad_extra            the extra column is not a JSON object
    no_modality          the row names no image, no audio and no (non-empty) text
With dedup="exact" or "near", rows that repeat an earlier one are dropped first (data_pipelines/dedup.py).
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

from data_pipelines.dedup import REASONS, Duplicates
from data_pipelines.dedup import check_mode as check_dedup
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


def _label(value: Any) -> int | str:
    """A class id (an integer, or a string or whole float holding one) or a class name (any other
    non-empty string, stripped), as the stream reads labels; anything else skips the row."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise _Skip("bad_label", f"label {value!r} is neither a class id (integer) nor a class name")


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

    def skip(self, line_no: int, key: str, skip: _Skip) -> None:
        self.skipped.append({"row": line_no, "key": key, "kind": skip.kind, "reason": skip.reason})

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
        if not _present(sample | {"json": meta}):
            raise _Skip("no_modality", "the row names no image, no audio and no text")
        sample["json"] = meta
        return sample

    def samples(self, rows: list[tuple[int, str, dict[str, Any]]], bar: tqdm) -> Iterator[dict[str, Any]]:
        for line_no, key, row in rows:
            bar.update(1)
            try:
                sample = self.sample(line_no, key, row)
            except _Skip as skip:
                self.skip(line_no, key, skip)
                continue
            self.modalities.update(_present(sample))
            self.written += 1
            yield sample


def _present(sample: dict[str, Any]) -> list[str]:
    """The modalities a built sample holds."""
    source = sample["json"]["source"]
    present = [m for m in ("image", "audio") if m in source]
    return present + (["text"] if "txt" in sample or "text" in sample["json"] else [])


def _media(sample: dict[str, Any], exts: dict[str, str]) -> bytes | None:
    return next((sample[ext] for ext in exts.values() if ext in sample), None)


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


Row = tuple[int, str, dict[str, Any]]  # (line number, key, manifest row)


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
    dedup: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write out_dir/train (and out_dir/test when test_fraction > 0) shards + sizes.json from a manifest.

    `manifest` is a path, or a name inside `folder`. A column set to None is not read. Keys come from
    `key_col`, else from the row's position ("00000000", ...). The test split takes round(n *
    test_fraction) rows (at least one), chosen with `seed`; rows sharing a `group_col` value go to
    the same split. Skipped rows are listed in out_dir/skipped.jsonl too. `dedup` ("exact" or "near",
    see data_pipelines/dedup.py) first drops every repeat of an earlier row (before the split, so no
    sample is in both splits) and lists them in out_dir/duplicates.jsonl; it reads every file twice.

    Returns {"folder", "manifest", "out_dir", "rows", "written", "splits" {name: write_shards()'s
    summary, or {"total": 0} when nothing was left}, "modalities" {m: samples}, "skipped" {kind: n},
    "skipped_rows" [{"row", "key", "kind", "reason"}], "skipped_file", "seconds"}, and with `dedup`
    "duplicates" {reason: n}, "duplicate_rows" [{"row", "key", "reason", "of"}], "duplicates_file".
    Raises ValueError/FileNotFoundError for a missing folder or manifest, an empty manifest, one with
    none of the modality columns, or a split that leaves no training row; FileExistsError when
    out_dir/train or out_dir/test already holds shards (nothing is overwritten).
    """
    start = time.perf_counter()
    _check_settings(test_fraction, max_count, max_bytes, dedup)
    root, path = _find(folder, manifest)
    cols = {"image": image_col, "audio": audio_col, "text": text_col, "label": label_col, "extra": extra_col}
    rows_out = _Rows(root, cols)
    rows, n_rows = _read_rows(path, rows_out, key_col, modality_cols=[image_col, audio_col, text_col])
    duplicates: list[dict[str, Any]] = []
    if dedup:
        rows = _drop_duplicates(rows, rows_out, Duplicates(dedup), duplicates, progress=progress)
    out = Path(out_dir)
    splits = _write_splits(
        _split_rows(rows, group_col, test_fraction, seed), rows_out, out,
        max_count=max_count, max_bytes=max_bytes, progress=progress,
    )  # fmt: skip
    rows_out.skipped.sort(key=lambda s: s["row"])
    counts = Counter(s["kind"] for s in rows_out.skipped)
    summary = {
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
        "skipped_file": _write_list(out / "skipped.jsonl", rows_out.skipped),
    }
    if dedup:
        reasons = Counter(d["reason"] for d in duplicates)
        summary["duplicates"] = {r: reasons[r] for r in REASONS if reasons[r]}
        summary["duplicate_rows"] = duplicates
        summary["duplicates_file"] = _write_list(out / "duplicates.jsonl", duplicates)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _check_settings(test_fraction: float, max_count: int, max_bytes: int, dedup: str | None) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_count <= 0 or max_bytes <= 0:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count} and {max_bytes}")
    check_dedup(dedup)


def _find(folder: str | Path, manifest: str | Path) -> tuple[str, Path]:
    """(the folder's real path, the manifest's path: as given, or inside the folder)."""
    root = os.path.realpath(folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder {folder} does not exist")
    path = Path(manifest)
    if not path.is_file() and (Path(root) / path).is_file():
        path = Path(root) / path
    if not path.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist (nor in {folder})")
    return root, path


def _read_rows(
    path: Path, rows_out: _Rows, key_col: str | None, *, modality_cols: list[str | None]
) -> tuple[list[Row], int]:
    """The parseable rows with valid, unique keys (the others are recorded as skipped), and how many
    rows the manifest has."""
    rows: list[Row] = []
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
            rows_out.skip(line_no, key, skip)
    if n_rows == 0:
        raise ValueError(f"manifest {path} has no rows")
    wanted = [c for c in modality_cols if c is not None]
    if rows and not columns & set(wanted):
        raise ValueError(
            f"manifest {path} has none of the columns {wanted}; its columns are {sorted(columns)}"
        )
    return rows, n_rows


def _drop_duplicates(
    rows: list[Row], rows_out: _Rows, seen: Duplicates, dropped: list[dict[str, Any]], *, progress: bool
) -> list[Row]:
    """The rows that make a sample and repeat no earlier one, in manifest order. A row that makes no
    sample is recorded as skipped here (so it hides no later row); each repeat goes to ``dropped``."""
    kept = []
    for line_no, key, row in tqdm(rows, desc="finding duplicates", unit="row", disable=not progress):
        try:
            sample = rows_out.sample(line_no, key, row)
        except _Skip as skip:
            rows_out.skip(line_no, key, skip)
            continue
        captions = [sample["txt"]] if "txt" in sample else sample["json"].get("text", [])
        image, audio = _media(sample, _IMAGE_EXT), _media(sample, _AUDIO_EXT)
        if (duplicate := seen.check(key, image=image, audio=audio, captions=captions)) is None:
            kept.append((line_no, key, row))
        else:
            dropped.append({"row": line_no, "key": key, **duplicate})
    return kept


def _split_rows(
    rows: list[Row], group_col: str | None, test_fraction: float, seed: int
) -> dict[str, list[Row]]:
    def unit(key: str, row: dict[str, Any]) -> str:
        group = row.get(group_col) if group_col else None
        return f"group:{group}" if not _blank(group) else f"key:{key}"

    units = sorted({unit(key, row) for _, key, row in rows})
    test_units = _split(units, test_fraction, seed) if rows else set()
    splits = {"train": [r for r in rows if unit(r[1], r[2]) not in test_units]}
    if test_fraction > 0:
        splits["test"] = [r for r in rows if unit(r[1], r[2]) in test_units]
    return splits


def _write_splits(
    splits_rows: dict[str, list[Row]],
    rows_out: _Rows,
    out: Path,
    *,
    max_count: int,
    max_bytes: int,
    progress: bool,
) -> dict[str, Any]:
    """Each split's shards (write_shards()'s summary), built row by row as they are written."""
    splits: dict[str, Any] = {}
    total = sum(len(r) for r in splits_rows.values())
    with tqdm(total=total, desc="writing shards", unit="row", disable=not progress) as bar:
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
    return splits


def _write_list(path: Path, records: list[dict[str, Any]]) -> str | None:
    """``records`` as JSON lines at ``path`` (None, and no file, when there are none)."""
    if not records:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)
