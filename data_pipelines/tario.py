"""WebDataset tar shards at the byte level: find them, scan them, read samples back, write them.

A shard is an uncompressed tar whose files are named `<key>.<ext>`; consecutive files sharing a key
form one sample (webdataset's convention: the key is the path up to the first dot of the file name,
the extension is the rest, lower-cased). Reading is split in two so that a loader can skip samples
without reading their bytes: `scan_shard` yields `SampleRef`s (a key and where each file's bytes sit,
from the tar headers alone) and `SampleRef.load()` reads the bytes.

A shard that cannot be opened, is not a tar, or ends early raises `ShardError` naming the shard and
the last sample read; every complete sample before the damage has been yielded by then.
"""

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import braceexpand

_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------------------------------------- shard specs


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside braces, so "a-{0,1}.tar,b/*.tar" gives two parts."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_shards(spec: str) -> list[str]:
    """Resolve a shard spec to an explicit list of existing local .tar paths, in order.

    Forms (combinable with commas): "dir/shard-{000000..000003}.tar" (every expansion must exist),
    "dir/*.tar" (sorted glob, must match), "dir" (its *.tar, sorted, must have some), "dir/x.tar".
    """
    parts = _split_top_level(spec)
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}")
    urls: list[str] = []
    for part in parts:
        try:
            paths = list(braceexpand.braceexpand(os.path.expanduser(part)))
        except braceexpand.UnbalancedBracesError as exn:
            raise ValueError(f"unbalanced braces in shard spec {spec!r}") from exn
        for path in paths:
            if _GLOB_CHARS & set(path):
                matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
                if not matches:
                    raise FileNotFoundError(f"no shard file matches {path!r} (from shard spec {spec!r})")
                urls.extend(matches)
            elif os.path.isdir(path):
                matches = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not matches:
                    raise FileNotFoundError(
                        f"no *.tar shard in directory {path!r} (from shard spec {spec!r})"
                    )
                urls.extend(matches)
            elif os.path.isfile(path):
                urls.append(path)
            else:
                raise FileNotFoundError(f"shard {path!r} does not exist (from shard spec {spec!r})")
    return urls


# ---------------------------------------------------------------------------------------------- reading


class ShardError(ValueError):
    """A shard-level failure: `kind` is "unreadable_shard" (cannot open, not a tar) or "truncated_tar"."""

    def __init__(self, kind: str, url: str, key: str | None, reason: str) -> None:
        where = f"after sample {key!r}" if key else "before any sample"
        super().__init__(f"{kind} in shard {url} ({where}): {reason}")
        self.kind, self.url, self.key, self.reason = kind, url, key, reason


@dataclass(frozen=True, slots=True)
class SampleRef:
    """One sample of a shard, not yet read: its key and, per extension, (byte offset, size)."""

    url: str
    key: str
    files: tuple[tuple[str, int, int], ...]
    problem: str | None = None  # set when the tar holds something no loader should guess about

    def load(self) -> dict[str, Any]:
        """{"__key__", "__url__", ext: bytes} (raises OSError when the shard cannot be read any more)."""
        sample: dict[str, Any] = {"__key__": self.key, "__url__": self.url}
        with open(self.url, "rb") as f:
            for ext, offset, size in self.files:
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise OSError(f"{self.url} shrank: {ext} of {self.key!r} is cut short")
                sample[ext] = data
        return sample


def split_name(name: str) -> tuple[str, str] | None:
    """Tar member name -> (key, ext) by webdataset's rule, or None for names with no extension."""
    directory, _, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0 or dot == len(base) - 1:
        return None
    key = f"{directory}/{base[:dot]}" if directory else base[:dot]
    return key, base[dot + 1 :].lower()


def _group(url: str, key: str, files: list[tuple[str, int, int]]) -> SampleRef:
    exts = [ext for ext, _, _ in files]
    twice = sorted({ext for ext in exts if exts.count(ext) > 1})
    problem = f"file {key}.{twice[0]} appears twice in the sample" if twice else None
    return SampleRef(url=url, key=key, files=tuple(files), problem=problem)


def scan_shard(url: str) -> Iterator[SampleRef]:
    """Every sample of one shard, in order, from the tar headers alone (no file contents are read).

    Raises ShardError after the last complete sample when the shard is damaged; a sample whose files
    may be cut off (the one being read when the damage shows) is not yielded.
    """
    try:
        f = open(url, "rb")  # noqa: SIM115 (the with below closes it; opening is outside to name the error)
    except OSError as exn:
        raise ShardError("unreadable_shard", url, None, f"{type(exn).__name__}: {exn}") from exn
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 (reads through f, closed by the with)
        except tarfile.ReadError as exn:
            raise ShardError("unreadable_shard", url, None, f"not an uncompressed tar file ({exn})") from exn
        done: str | None = None  # key of the last sample yielded
        key: str | None = None
        files: list[tuple[str, int, int]] = []
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as exn:
                raise ShardError("truncated_tar", url, done, f"damaged tar header ({exn})") from exn
            if info is None:
                break
            tar.members.clear()  # tarfile keeps every header otherwise
            parts = split_name(info.name) if info.isreg() else None
            if parts is not None and parts[0] != key:
                if key is not None:  # a new key starts: the previous sample is complete
                    yield _group(url, key, files)
                    done = key
                key, files = parts[0], []
            if info.offset_data + info.size > size:
                raise ShardError(
                    "truncated_tar",
                    url,
                    done,
                    f"file {info.name} needs bytes up to {info.offset_data + info.size} "
                    f"but the shard ends at {size}",
                )
            if parts is not None:
                files.append((parts[1], info.offset_data, info.size))
        f.seek(tar.offset)
        end = f.read(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or any(end):
            raise ShardError(
                "truncated_tar", url, done, "no end-of-archive block: the shard was cut between two files"
            )
        if key is not None:
            yield _group(url, key, files)


# ---------------------------------------------------------------------------------------------- writing


def encode_sample(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """{"__key__", ext: value} -> [(member name, bytes)]: bytes as is, str as UTF-8, json dict/list as JSON."""
    key = sample["__key__"]
    members = []
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
        elif ext == "json" and isinstance(value, dict | list):
            data = json.dumps(value, ensure_ascii=False).encode("utf-8")
        else:
            raise ValueError(
                f"sample {key!r}: {ext} is a {type(value).__name__}; give bytes, str, or a dict/list as json"
            )
        members.append((f"{key}.{ext}", data))
    return members


class TarSink:
    """One shard being written, with its exact size on disk known before each sample is added.

    Written to `<path>.part` and renamed on `close()`, so a crash never leaves a complete-looking shard.
    Member times and owners are fixed, so the same samples give byte-identical shards.
    """

    def __init__(self, path: str) -> None:
        self.path, self.count = path, 0
        # closed by close() or abort(): a shard stays open across many add() calls
        self._tar = tarfile.open(path + ".part", mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        return info

    def size_with(self, members: list[tuple[str, bytes]]) -> int:
        """Bytes the finished shard would take with these members added (end blocks and padding included)."""
        offset = self._tar.offset
        for name, data in members:
            header = self._info(name, len(data)).tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
            offset += len(header) + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        end = offset + 2 * tarfile.BLOCKSIZE
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self._tar.addfile(self._info(name, len(data)), io.BytesIO(data))
        self.count += 1

    def close(self) -> int:
        """Finish the shard; returns its size in bytes."""
        self._tar.close()
        os.replace(self.path + ".part", self.path)
        return os.path.getsize(self.path)

    def abort(self) -> None:
        self._tar.close()
        os.remove(self.path + ".part")
