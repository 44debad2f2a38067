"""Write samples into WebDataset shards and read them back.

A sample is a dict with a unique `__key__` and one value per file extension: bytes are stored as is,
str as UTF-8, dicts/lists under `json` as JSON. Next to the shards, `sizes.json` maps each shard's
file name to its sample count (open_clip's convention), so counting needs no pass over the data.
"""

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

from data_pipelines.stream import expand_shards

SIZES_FILE = "sizes.json"


def _check_key(key: Any, seen: set[str]) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in os.path.basename(key):
        # webdataset splits "<key>.<ext>" at the first dot of the file name.
        raise ValueError(f"sample key {key!r} must not contain '.'")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r}")
    seen.add(key)
    return key


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_count: int = 1000,
    max_bytes: int = 2**30,
) -> dict[str, Any]:
    """Write samples to out_dir/{prefix}-000000.tar, ... and out_dir/sizes.json.

    Returns {"out_dir", "pattern" (a brace pattern over the shards), "shards" {name: count}, "total"}.
    Refuses to write over existing shards of the same prefix, so stale shards never mix in.
    """
    if max_count <= 0 or max_bytes <= 0:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count} and {max_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"{prefix}-*.tar"))
    if stale:
        raise FileExistsError(
            f"{out} already holds shards ({stale[0].name}, ...): remove them or pick another dir"
        )
    iterator = iter(samples)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"no samples to write to {out}")

    counts: dict[str, int] = {}
    seen: set[str] = set()
    with wds.ShardWriter(
        str(out / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=max_bytes, verbose=0
    ) as sink:
        for sample in itertools.chain([first], iterator):
            key = _check_key(sample.get("__key__"), seen)
            try:
                sink.write(dict(sample))
            except Exception as exn:
                raise ValueError(f"cannot write sample {key!r}: {type(exn).__name__}: {exn}") from exn
            name = os.path.basename(sink.fname)
            counts[name] = counts.get(name, 0) + 1

    (out / SIZES_FILE).write_text(json.dumps(counts, indent=1) + "\n")
    last = len(counts) - 1
    pattern = f"{prefix}-000000.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"
    return {
        "out_dir": str(out),
        "pattern": str(out / pattern),
        "shards": counts,
        "total": sum(counts.values()),
    }


def iter_samples(shards: str) -> Iterator[dict[str, Any]]:
    """Every sample of the shards, in order, as {"__key__", "__url__", ext: raw bytes}."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), wds.tarfile_to_samples())
    for sample in pipeline:
        if any(not k.startswith("__") for k in sample):  # skip the end-of-shard marker and empty samples
            yield sample


def _sizes(directory: str) -> dict[str, int]:
    path = os.path.join(directory, SIZES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        sizes = json.load(f)
    if not isinstance(sizes, dict):
        raise ValueError(f"{path} must map shard file names to sample counts")
    return sizes


def count_samples(shards: str) -> int:
    """Total samples in the shards: from each directory's sizes.json where it lists the shard, else by reading."""
    total = 0
    for url in expand_shards(shards):
        sizes = _sizes(os.path.dirname(url) or ".")
        name = os.path.basename(url)
        if name in sizes:
            total += int(sizes[name])
        else:
            total += sum(1 for _ in iter_samples(url))
    return total
