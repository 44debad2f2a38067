"""Write samples into WebDataset shards and read them back.

A sample is a dict with a unique `__key__` and one value per file extension: bytes are stored as is,
str as UTF-8, dicts/lists under `json` as JSON. Next to the shards, `sizes.json` maps each shard's
file name to its sample count (open_clip's convention), so counting needs no pass over the data.
"""

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from data_pipelines.remote import is_remote, mask, read_small
from data_pipelines.tario import TarSink, encode_sample, expand_shards, scan_shard

SIZES_FILE = "sizes.json"


def check_key(key: Any, seen: set[str]) -> str:
    """A sample key that webdataset readers split back correctly and that is new; raises ValueError."""
    if not isinstance(key, str) or not key or key != key.strip():
        raise ValueError(f"sample key must be a non-empty string without surrounding spaces, got {key!r}")
    if "." in os.path.basename(key):
        # webdataset splits "<key>.<ext>" at the first dot of the file name.
        raise ValueError(f"sample key {key!r} must not contain '.'")
    if key.startswith("/") or ".." in key.split("/") or key.endswith("/"):
        raise ValueError(f"sample key {key!r} must be a relative name")
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

    A shard holds at most `max_count` samples and `max_bytes` bytes on disk; a single sample larger
    than `max_bytes` gets a shard of its own (listed under "oversize"). Returns {"out_dir",
    "pattern" (a brace pattern over the shards), "shards" {name: count}, "bytes" {name: size},
    "total", "oversize" [keys]}. Refuses to write over existing shards of the same prefix, so stale
    shards never mix in; a failure leaves the finished shards and no sizes.json.
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
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    oversize: list[str] = []
    seen: set[str] = set()
    sink: TarSink | None = None

    def finish() -> None:
        name = os.path.basename(sink.path)
        counts[name], sizes[name] = sink.count, sink.close()

    try:
        for sample in samples:
            key = check_key(sample.get("__key__"), seen)
            members = encode_sample(dict(sample))
            if sink is not None and (sink.count >= max_count or sink.size_with(members) > max_bytes):
                finish()
                sink = None
            if sink is None:
                sink = TarSink(str(out / f"{prefix}-{len(counts):06d}.tar"))
                if sink.size_with(members) > max_bytes:
                    oversize.append(key)
            sink.add(members)
        if sink is None:
            raise ValueError(f"no samples to write to {out}")
        finish()
    except BaseException:
        if sink is not None and os.path.exists(sink.path + ".part"):
            sink.abort()
        raise

    (out / SIZES_FILE).write_text(json.dumps(counts, indent=1) + "\n")
    last = len(counts) - 1
    pattern = f"{prefix}-000000.tar" if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"
    return {
        "out_dir": str(out),
        "pattern": str(out / pattern),
        "shards": counts,
        "bytes": sizes,
        "total": sum(counts.values()),
        "oversize": oversize,
    }


def iter_samples(shards: str) -> Iterator[dict[str, Any]]:
    """Every sample of the shards, in order, as {"__key__", "__url__", ext: raw bytes}.

    A damaged shard raises ShardError (a ValueError naming it) after its last complete sample.
    """
    for url in expand_shards(shards):
        for ref in scan_shard(url):
            yield ref.load()


def read_sizes(directory: str) -> dict[str, int]:
    """The directory's sizes.json ({shard file name: sample count}), or {} when it has none.

    A remote directory (an http or fsspec URL) is asked for its sizes.json too; a `pipe:` has none."""
    path = os.path.join(directory, SIZES_FILE)
    if is_remote(directory):
        text = read_small(f"{directory}/{SIZES_FILE}")
        if text is None:
            return {}
        try:
            sizes = json.loads(text)
        except ValueError:
            sizes = None
    elif not os.path.isfile(path):
        return {}
    else:
        with open(path) as f:
            sizes = json.load(f)
    if not isinstance(sizes, dict):
        raise ValueError(f"{mask(path)} must map shard file names to sample counts")
    return sizes


def count_samples(shards: str) -> int:
    """Total samples in the shards: from each directory's sizes.json where it lists the shard, else by
    reading the tar headers."""
    total, cache = 0, {}
    for url in expand_shards(shards):
        directory = os.path.dirname(url) or "."
        if directory not in cache:
            cache[directory] = read_sizes(directory)
        sizes = cache[directory]
        name = os.path.basename(url)
        if name in sizes:
            total += int(sizes[name])
        else:
            total += sum(1 for _ in scan_shard(url))
    return total
