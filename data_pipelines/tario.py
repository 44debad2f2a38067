"""WebDataset tar shards at the byte level: find them, scan them, read samples back, write them.

A shard is an uncompressed tar whose files are named `<key>.<ext>`; consecutive files sharing a key
form one sample (webdataset's convention: the key is the path up to the first dot of the file name,
the extension is the rest, lower-cased). Reading is split in two so that a loader can skip samples
without reading their bytes: `scan_shard` yields `SampleRef`s (a key and where each file's bytes sit,
from the tar headers alone) and `SampleRef.load()` reads the bytes.

A shard that cannot be opened, is not a tar, or ends early raises `ShardError` naming the shard and
the last sample read; every complete sample before the damage has been yielded by then.

Shards that are not local files (`pipe:`, http(s)://, fsspec URLs; see remote.py) are read front to
back once, scanning while reading: their `SampleRef`s carry the bytes, and a fault mid-shard (a dropped
connection, a command exiting non-zero) is retried from the sample reached (`scan_stream`).
"""

import glob
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import braceexpand

from data_pipelines.remote import Permanent, check_scheme, is_remote, mask, open_stream

logger = logging.getLogger("data_pipelines")
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
    """Resolve a shard spec to an explicit list of existing local .tar paths and remote shards, in order.

    Forms (combinable with commas): "dir/shard-{000000..000003}.tar" (every expansion must exist),
    "dir/*.tar" (sorted glob, must match), "dir" (its *.tar, sorted, must have some), "dir/x.tar";
    remote: "https://host/shard-{000000..000003}.tar", "pipe:aws s3 cp s3://b/s-{0..9}.tar -",
    "s3://b/s-{0..9}.tar" (brace patterns or lists only: a remote spec cannot be globbed, and whether
    it answers is found when it is read).
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
            if is_remote(path):
                if "*" in path and not path.startswith("pipe:"):
                    raise ValueError(
                        f"remote shard {mask(path)!r} cannot be globbed: give a brace pattern or a list"
                    )
                check_scheme(path)
                urls.append(path)
            elif _GLOB_CHARS & set(path):
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
        url, reason = mask(url), mask(reason)  # credentials never reach a message or a record
        super().__init__(f"{kind} in shard {url} ({where}): {reason}")
        self.kind, self.url, self.key, self.reason = kind, url, key, reason


@dataclass(frozen=True, slots=True)
class SampleRef:
    """One sample of a shard: its key and, per extension, (byte offset, size); a local shard's bytes are
    read by load(), a stream's are already in `data` (one bytes per file)."""

    url: str  # as shown in messages (credentials masked)
    key: str
    files: tuple[tuple[str, int, int], ...]
    problem: str | None = None  # set when the tar holds something no loader should guess about
    data: tuple[bytes, ...] | None = None

    def load(self, wanted: frozenset[str] | None = None) -> dict[str, Any]:
        """{"__key__", "__url__", ext: bytes} (raises OSError when the shard cannot be read any more).

        With ``wanted``, only those extensions' bytes are read, and ``"__files__"`` names every file
        the sample has."""
        sample: dict[str, Any] = {"__key__": self.key, "__url__": self.url}
        if wanted is not None:
            sample["__files__"] = tuple(ext for ext, _, _ in self.files)
        if self.data is not None:
            for (ext, _, _), data in zip(self.files, self.data, strict=True):
                if wanted is None or ext in wanted:
                    sample[ext] = data
            return sample
        with open(self.url, "rb") as f:
            for ext, offset, size in self.files:
                if wanted is not None and ext not in wanted:
                    continue
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


def _group(
    url: str, key: str, files: list[tuple[str, int, int]], data: list[bytes] | None = None
) -> SampleRef:
    exts = [ext for ext, _, _ in files]
    twice = sorted({ext for ext in exts if exts.count(ext) > 1})
    problem = f"file {key}.{twice[0]} appears twice in the sample" if twice else None
    return SampleRef(
        url=url, key=key, files=tuple(files), problem=problem, data=None if data is None else tuple(data)
    )


_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = frozenset(b"0\x007")  # regular file, old-style regular file, contiguous file
_NO_DATA = frozenset(b"123456")  # links, devices, directories, fifos: their size field is not data
_GNU_LONG = frozenset(b"LK")  # GNU long name / long link: the data is the next member's name
_PAX = frozenset(b"xg")  # POSIX extended header for the next member (x) or all that follow (g)


class _BadHeader(Exception):
    pass


def _number(field: bytes) -> int:
    """A numeric header field: octal digits ended by NUL or space, or GNU's base-256 (high bit set)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _BadHeader(f"bad number {field!r}") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a POSIX extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _BadHeader("bad pax record length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise _BadHeader("bad pax record")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members(f: BinaryIO, url: str, start: int = 0) -> Iterator[tuple[str, bool, int, int, int]]:
    """(name, is a regular file, data offset, size, offset of its first header) of every tar member
    from `start` on (a header), from the 512-byte headers alone; the first header counts the extended
    ones (long name, pax) before the member's own.

    Reads what Python's ``tarfile`` reads (ustar, GNU long names, POSIX pax headers, base-256 sizes;
    checksums verified) at a fraction of its cost per header. A damaged first header raises
    ``ShardError("unreadable_shard")``; later damage ends the members, and the caller's end-of-archive
    check reports it. Ends after the end-of-archive block, leaving ``f`` just past it.
    """
    pos, long_name, next_pax, global_pax = start, None, {}, {}
    first = start
    while True:
        here = pos
        f.seek(here)
        block = f.read(_BLOCK)
        if len(block) < _BLOCK or block == _ZERO_BLOCK:
            if here == 0:
                reason = "empty file" if not block else "shorter than one tar block"
                raise ShardError("unreadable_shard", url, None, f"not an uncompressed tar file ({reason})")
            f.seek(here)
            return
        try:
            stored = _number(block[148:156])
            if stored != 256 + sum(block) - sum(block[148:156]) and stored != _signed_sum(block):
                raise _BadHeader("bad checksum")
            kind = block[156]
            size = _number(block[124:136])
            pax = {**global_pax, **next_pax}
            if "size" in pax:
                size = int(pax["size"])
            data = pos + _BLOCK
            pos = data + (0 if kind in _NO_DATA else -(-size // _BLOCK) * _BLOCK)
            if kind in _GNU_LONG or kind in _PAX:
                f.seek(data)
                payload = f.read(size)
                if len(payload) < size:
                    raise _BadHeader("extended header cut short")
                if kind == ord("L"):
                    long_name = _text(payload)
                elif kind == ord("x"):
                    next_pax = _pax_records(payload)
                elif kind == ord("g"):
                    global_pax.update(_pax_records(payload))
                continue
        except (_BadHeader, ValueError) as exn:
            if here == 0:
                raise ShardError(
                    "unreadable_shard", url, None, f"not an uncompressed tar file ({exn})"
                ) from None
            f.seek(here)  # not an end-of-archive block: the caller reports the damage
            return
        name = long_name or pax.get("path")
        if name is None:
            name, prefix = _text(block[0:100]), _text(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        long_name, next_pax = None, {}
        yield name, kind in _REGULAR and not name.endswith("/"), data, size, first
        first = pos


def _signed_sum(block: bytes) -> int:
    """The checksum some old tar writers computed over signed bytes."""
    return 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(block) if not 148 <= i < 156)


def scan_shard(url: str, *, retries: int = 3) -> Iterator[SampleRef]:
    """Every sample of one shard, in order: of a local file from the tar headers alone (no file contents
    are read), of a remote shard as its bytes arrive (scan_stream, with `retries`).

    Raises ShardError after the last complete sample when the shard is damaged; a sample whose files
    may be cut off (the one being read when the damage shows) is not yielded.
    """
    if is_remote(url):
        yield from scan_stream(url, retries=retries)
        return
    try:
        f = open(url, "rb")  # noqa: SIM115 (the with below closes it; opening is outside to name the error)
    except OSError as exn:
        raise ShardError("unreadable_shard", url, None, f"{type(exn).__name__}: {exn}") from exn
    with f:
        size = os.fstat(f.fileno()).st_size
        done: str | None = None  # key of the last sample yielded
        key: str | None = None
        files: list[tuple[str, int, int]] = []
        for name, regular, offset, length, _ in _members(f, url):
            parts = split_name(name) if regular else None
            if parts is not None and parts[0] != key:
                if key is not None:  # a new key starts: the previous sample is complete
                    yield _group(url, key, files)
                    done = key
                key, files = parts[0], []
            if offset + length > size:
                raise ShardError(
                    "truncated_tar",
                    url,
                    done,
                    f"file {name} needs bytes up to {offset + length} but the shard ends at {size}",
                )
            if parts is not None:
                files.append((parts[1], offset, length))
        end = f.read(_BLOCK)
        if len(end) < _BLOCK or any(end):
            raise ShardError(
                "truncated_tar", url, done, "no end-of-archive block: the shard was cut between two files"
            )
        if key is not None:
            yield _group(url, key, files)


# ---------------------------------------------------------------------------------------------- streams

RETRY_BACKOFF = 1.0  # seconds before the first retry of a faulty stream; doubled for each further one


class _Forward:
    """A forward-only byte stream seen as the seekable file `_members` reads, through a buffer of the
    stream's chunks: seeking ahead skips bytes, seeking back is allowed within the last read (to re-read
    a header block)."""

    CHUNK = 1 << 16

    def __init__(self, stream: Any, pos: int) -> None:
        self.stream, self.pos = stream, pos  # pos: the stream offset of self._buf[self._i]
        self._buf, self._i = b"", 0

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._i < n:
            parts = [self._buf[self._i :]]
            have = len(parts[0])
            while have < n and (chunk := self.stream.read(max(self.CHUNK, n - have))):
                parts.append(chunk)
                have += len(chunk)
            self._buf, self._i = b"".join(parts), 0
        data = self._buf[self._i : self._i + n]
        self._i += len(data)
        self.pos += len(data)
        return data

    def seek(self, target: int) -> None:
        if target < self.pos:
            assert self.pos - target <= self._i, (target, self.pos)  # _members never goes further back
            self._i -= self.pos - target
            self.pos = target
            return
        ahead = min(target - self.pos, len(self._buf) - self._i)
        self._i += ahead
        self.pos += ahead
        while target > self.pos and (chunk := self.stream.read(min(target - self.pos, 1 << 20))):
            self.pos += len(chunk)


def _stream_samples(f: _Forward, url: str, start: int) -> Iterator[tuple[SampleRef, int]]:
    """(sample with its bytes, offset where the next sample starts) as the stream arrives from `start`."""
    done: str | None = None
    key: str | None = None
    files: list[tuple[str, int, int]] = []
    data: list[bytes] = []
    for name, regular, offset, length, first in _members(f, url, start):  # type: ignore[arg-type]
        parts = split_name(name) if regular else None
        if parts is not None and parts[0] != key:
            if key is not None:
                yield _group(url, key, files, data), first
                done = key
            key, files, data = parts[0], [], []
        if parts is not None:
            f.seek(offset)
            blob = f.read(length)
            if len(blob) < length:
                raise ShardError("truncated_tar", url, done, f"the stream ends inside file {name}")
            files.append((parts[1], offset, length))
            data.append(blob)
    end = f.read(_BLOCK)
    if len(end) < _BLOCK or any(end):
        raise ShardError(
            "truncated_tar", url, done, "no end-of-archive block: the stream was cut between two files"
        )
    if key is not None:
        yield _group(url, key, files, data), f.pos


def scan_stream(url: str, *, retries: int = 3) -> Iterator[SampleRef]:
    """Every sample of a remote shard, read front to back as the bytes arrive (held in the refs).

    A fault (OSError from the stream) is retried up to `retries` times, with backoff, from the first
    byte of the sample it interrupted (an HTTP Range request; other streams skip bytes up to there);
    samples already yielded are not yielded again. After that, or at once for a missing shard, it
    raises ShardError("unreadable_shard") naming the last sample yielded.
    """
    done: str | None = None
    start, attempt = 0, 0
    while True:
        try:
            f = _Forward(open_stream(url, start), start)
            try:
                for ref, next_start in _stream_samples(f, mask(url), start):  # refs name it masked
                    yield ref
                    done, start, attempt = ref.key, next_start, 0
            finally:
                f.stream.close()
            return
        except OSError as exn:
            if attempt >= retries or isinstance(exn, Permanent):
                tried = f" (tried {attempt + 1} times)" if attempt else ""
                raise ShardError("unreadable_shard", url, done, f"{exn}{tried}") from None
            delay = RETRY_BACKOFF * 2**attempt
            attempt += 1
            logger.warning(
                "%s: %s; retry %d of %d in %.1f s", mask(url), mask(str(exn)), attempt, retries, delay
            )
            time.sleep(delay)


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
