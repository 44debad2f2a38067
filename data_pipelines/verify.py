"""Read every sample of a set of shards and report what is there and what is broken.

`verify_shards` returns data and prints nothing (except a tqdm bar when asked); the CLI formats it.
Exit-code rule (`verify_exit_code`): 1 when any shard is unreadable (cannot be opened, not a tar, or
ends early), else 0; with strict=True also 1 when any sample or label is bad or a sizes.json count
disagrees.
"""

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from data_pipelines.bad_data import BAD_KINDS, BadSample
from data_pipelines.decode import inspect_sample, read_label
from data_pipelines.layouts import Layout, resolve_layout
from data_pipelines.remote import mask
from data_pipelines.shards import read_sizes
from data_pipelines.tario import ShardError, expand_shards, scan_shard


def verify_shards(spec: str, *, layout: str | Layout = "mmssl", progress: bool = False) -> dict[str, Any]:
    """Decode every sample of the shards in `spec` (images and audio fully, no transforms) under `layout`.

    Remote specs (http, pipe:, fsspec URLs) are streamed; a sizes.json next to remote shards is read
    too. Shards are named with any URL credentials masked.

    Returns:
        shards          number of shard files
        samples         samples read (good + bad)
        good            samples holding at least one readable modality and nothing broken
        modalities      {image/text/audio: good samples holding it}
        combinations    {"image+text": n, ...} over good samples
        extensions      {ext: samples holding a file with it} (to pick a layout)
        bad             [{"shard", "key", "kind", "reason"}] every bad sample, in order
        bad_counts      {kind: n}
        labels          {"integer", "name", "absent", "bad"}: good samples by the kind of their label
        label_names     {name: good samples} for class-name labels
        bad_labels      [{"shard", "key", "kind", "reason"}] every good sample with a bad label (kept
                        by training, without its label)
        unreadable      [{"shard", "kind", "key" (last good sample or None), "reason"}]
        sizes_mismatch  [{"shard", "sizes_json", "read"}] where a sizes.json count disagrees
        per_shard       {shard: {"samples", "bad"}}
    Raises FileNotFoundError/ValueError when the spec matches no file (the run-time errors are reported).
    """
    layout = resolve_layout(layout)
    urls = expand_shards(spec)
    report = _empty_report(len(urls), layout)
    counts = _Counts()
    sizes_cache: dict[str, dict[str, int]] = {}
    bar = tqdm(urls, desc="verifying", unit="shard", disable=not progress)
    for url in bar:
        shown = mask(url)
        read, bad = _verify_shard(url, layout, report, counts)
        listed = _listed_size(url, sizes_cache)
        if listed is not None and int(listed) != read:
            report["sizes_mismatch"].append({"shard": shown, "sizes_json": int(listed), "read": read})
        report["per_shard"][shown] = {"samples": read, "bad": bad}
        report["samples"] += read
        report["good"] += read - bad
        bar.set_postfix(samples=report["samples"], bad=sum(counts.bad.values()))
    report["combinations"] = dict(counts.combos.most_common())
    report["extensions"] = dict(counts.extensions.most_common())
    report["bad_counts"] = {k: counts.bad[k] for k in BAD_KINDS if counts.bad[k]}
    report["label_names"] = dict(sorted(counts.names.items()))
    return report


@dataclass
class _Counts:
    """What is counted over all shards before it goes into the report, most common first."""

    combos: Counter[str] = field(default_factory=Counter)  # good samples by their modalities
    extensions: Counter[str] = field(default_factory=Counter)  # samples by the extensions they hold
    bad: Counter[str] = field(default_factory=Counter)  # bad samples by kind
    names: Counter[str] = field(default_factory=Counter)  # good samples by class-name label


def _empty_report(shards: int, layout: Layout) -> dict[str, Any]:
    return {
        "shards": shards,
        "layout": layout.name,
        "samples": 0,
        "good": 0,
        "modalities": {m: 0 for m in ("image", "text", "audio") if layout.entries(m)},
        "combinations": {},
        "extensions": {},
        "bad": [],
        "bad_counts": {},
        "labels": {"integer": 0, "name": 0, "absent": 0, "bad": 0},
        "label_names": {},
        "bad_labels": [],
        "unreadable": [],
        "sizes_mismatch": [],
        "per_shard": {},
    }


def _verify_shard(url: str, layout: Layout, report: dict[str, Any], counts: _Counts) -> tuple[int, int]:
    """Read one shard's samples into ``report`` and ``counts``: (samples read, bad ones). A shard that
    cannot be read to its end is listed as unreadable; the samples read before count."""
    shown = mask(url)
    read = bad = 0
    try:
        for ref in scan_shard(url):
            read += 1
            counts.extensions.update({ext for ext, _, _ in ref.files})
            try:
                if ref.problem:
                    raise BadSample("duplicate_file", url, ref.key, ref.problem)
                raw = ref.load()
                present = inspect_sample(raw, layout)
            except BadSample as exn:
                bad += 1
                counts.bad[exn.kind] += 1
                report["bad"].append({"shard": shown, "key": ref.key, "kind": exn.kind, "reason": exn.reason})
                continue
            counts.combos["+".join(present)] += 1
            for modality in present:
                report["modalities"][modality] += 1
            _count_label(raw, layout, report, counts.names)
    except ShardError as exn:
        report["unreadable"].append({"shard": shown, "kind": exn.kind, "key": exn.key, "reason": exn.reason})
    except OSError as exn:  # the file went away or cannot be read mid-way
        reason = f"{type(exn).__name__}: {exn}"
        report["unreadable"].append(
            {"shard": shown, "kind": "unreadable_shard", "key": None, "reason": mask(reason)}
        )
    return read, bad


def _listed_size(url: str, cache: dict[str, dict[str, int]]) -> int | None:
    """The sample count a sizes.json beside ``url`` gives it (each directory's file read once), or None."""
    directory = os.path.dirname(url) or "."
    if directory not in cache:
        try:
            cache[directory] = read_sizes(directory)
        except ValueError:
            cache[directory] = {}
    return cache[directory].get(os.path.basename(url))


def _count_label(raw: dict[str, Any], layout: Layout, report: dict[str, Any], names: Counter[str]) -> None:
    try:
        label = read_label(raw, layout)
    except BadSample as exn:  # bad_label, the only kind read_label raises
        report["labels"]["bad"] += 1
        report["bad_labels"].append(
            {"shard": exn.url, "key": exn.key, "kind": exn.kind, "reason": exn.reason}
        )
        return
    kind = "absent" if label is None else "name" if isinstance(label, str) else "integer"
    report["labels"][kind] += 1
    if isinstance(label, str):
        names[label] += 1


def label_census(spec: str, *, layout: str | Layout = "mmssl") -> dict[str, Any]:
    """The labels of every sample of `spec` under `layout`, read without decoding any image or audio:
    {"integer": Counter of class ids, "name": Counter of class names, "absent": n, "bad": n}. A shard
    that cannot be read to its end counts the samples read before; raises FileNotFoundError/ValueError
    when the spec matches no file."""
    layout = resolve_layout(layout)
    wanted = frozenset("json" if e.startswith("json:") else e for e in layout.label)
    census: dict[str, Any] = {"integer": Counter(), "name": Counter(), "absent": 0, "bad": 0}
    for url in expand_shards(spec):
        try:
            for ref in scan_shard(url):
                if ref.problem:
                    continue
                try:
                    label = read_label(ref.load(wanted), layout)  # the label's files only
                except BadSample:
                    census["bad"] += 1
                    continue
                if label is None:
                    census["absent"] += 1
                else:
                    census["name" if isinstance(label, str) else "integer"][label] += 1
        except (ShardError, OSError):  # training counts the rest as bad data; the labels read so far stand
            continue
    return census


def verify_exit_code(report: dict[str, Any], *, strict: bool = False) -> int:
    """1 when a shard is unreadable (or, with strict, anything is bad or miscounted), else 0."""
    if report["unreadable"]:
        return 1
    if strict and (report["bad"] or report["bad_labels"] or report["sizes_mismatch"]):
        return 1
    return 0
