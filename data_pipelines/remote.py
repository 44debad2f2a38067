"""Bytes of shards that are not local files: `pipe:COMMAND`, http(s):// and any fsspec URL.

`open_stream(url, offset)` gives a forward-only byte stream of one shard from `offset` on; the tar
reader (tario.scan_stream) parses it as it arrives. Nothing is written to disk.

    pipe:COMMAND     the command's stdout (run by the shell); a non-zero exit counts as a fault
    http(s)://       urllib; `offset` > 0 sends a Range request (or skips bytes when the server ignores it);
                     a body shorter than its Content-Length counts as a fault
    s3:// gs:// ...  fsspec.open, when the scheme's backend (s3fs, gcsfs, adlfs, huggingface_hub ...) is
                     installed; none is installed with this package

Faults surface as OSError (`Permanent` when retrying cannot help: 4xx, missing file). Credentials come
from the usual places: a URL's user:password part or ~/.netrc for http(s), the environment and the
backend's config files for fsspec. `mask()` hides a URL's user:password part wherever a URL is shown.
"""

import base64
import netrc
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Any, Protocol

HTTP_TIMEOUT = 60.0  # seconds without a byte before a read counts as a dropped connection
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# scheme://user:password@host: the scheme, the user info, the host (up to the path)
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@([^/\s'\"]*)")


class Permanent(OSError):
    """A fault that retrying cannot fix (the server says the shard is missing or forbidden)."""


class ByteStream(Protocol):
    def read(self, n: int) -> bytes: ...  # 1 to n bytes; b"" at the end; OSError on a fault

    def close(self) -> None: ...


def is_remote(spec: str) -> bool:
    """A `pipe:` command or a URL with a scheme (file:// included: fsspec reads it)."""
    return spec.startswith("pipe:") or _URL.match(spec) is not None


def mask(text: str) -> str:
    """`text` with every URL's user:password part replaced by ***."""
    return _USERINFO.sub(r"\1***@\2", text)


def credentials(text: str) -> dict[str, str]:
    """{masked URL start: the real one} for every URL in `text` with a user:password part: what `mask`
    hides, so that whoever reads a masked text can put the credentials back."""
    return {f"{m[1]}***@{m[2]}": m[0] for m in _USERINFO.finditer(text)}


def check_scheme(url: str) -> None:
    """ValueError (one line, naming the package to install) when no installed backend reads `url`."""
    if url.startswith("pipe:"):
        return
    scheme = _URL.match(url).group(1).lower()
    if scheme in ("http", "https"):
        return
    import fsspec
    from fsspec.registry import known_implementations

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(f"{mask(url)}: no fsspec backend knows the scheme {scheme}://") from None
    except ImportError:
        known = known_implementations.get(scheme, {})
        package = known.get("class", scheme).split(".")[0]
        raise ValueError(
            f"{mask(url)}: reading {scheme}:// needs the fsspec backend {package} (pip install {package})"
        ) from None


def open_stream(url: str, offset: int = 0) -> ByteStream:
    """The shard's bytes from `offset` on."""
    if url.startswith("pipe:"):
        stream: ByteStream = _Pipe(url[len("pipe:") :])
        _skip(stream, offset)
        return stream
    if url.split("://", 1)[0].lower() in ("http", "https"):
        return _open_http(url, offset)
    return _open_fsspec(url, offset)


def read_small(url: str) -> bytes | None:
    """A small remote file whole (sizes.json next to the shards), or None when it cannot be read."""
    if url.startswith("pipe:"):
        return None
    try:
        stream = open_stream(url)
        try:
            chunks = []
            while chunk := stream.read(1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            stream.close()
    except (OSError, ValueError):
        return None


def _skip(stream: ByteStream, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise OSError(f"the stream ended {n} bytes before the offset to resume from")
        n -= len(chunk)


class _Pipe:
    """stdout of a shell command; at its end, a non-zero exit status raises OSError with stderr's tail."""

    def __init__(self, command: str) -> None:
        self.command = command
        # a file, not a pipe: a chatty command never blocks on it (closed by close())
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr
        )

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read1(n)  # what has arrived (at least a byte), not a full n
        if not data and n:
            status = self.proc.wait()
            if status != 0:
                self.stderr.seek(0)
                tail = self.stderr.read()[-300:].decode("utf-8", "replace").strip().replace("\n", " ")
                raise OSError(
                    f"`{mask(self.command)}` exited with status {status}: {mask(tail) or 'no message'}"
                )
        return data

    def close(self) -> None:
        if self.proc.poll() is None:  # stopped early (a retry, a resume, the end of a check)
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


class _Http:
    """A response body; ending before its Content-Length raises OSError (a dropped connection)."""

    def __init__(self, response: Any, url: str, start: int) -> None:
        self.response, self.url, self.pos = response, url, start
        length = response.headers.get("Content-Length")
        self.end = start + int(length) if length is not None and length.isdigit() else None

    def read(self, n: int) -> bytes:
        try:
            data = self.response.read1(n)  # what has arrived (at least a byte), not a full n
        except (HTTPException, ValueError) as exn:  # a broken chunked body, a closed response
            raise OSError(f"connection failed: {type(exn).__name__}: {exn}") from exn
        self.pos += len(data)
        if not data and n and self.end is not None and self.pos < self.end:
            raise OSError(f"connection dropped at byte {self.pos} of {self.end}")
        return data

    def close(self) -> None:
        self.response.close()


def _credentials(parts: urllib.parse.SplitResult) -> str | None:
    """ "user:password" from the URL, else from ~/.netrc (or $NETRC) for the host, else None."""
    if parts.username is not None:
        return f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        found = netrc.netrc(path).authenticators(parts.hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{found[0]}:{found[2]}" if found else None


def _open_http(url: str, offset: int) -> ByteStream:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    netloc = f"[{netloc}]" if ":" in netloc else netloc
    netloc += f":{parts.port}" if parts.port else ""
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if (userpass := _credentials(parts)) is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(userpass.encode()).decode())
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as exn:
        kind = Permanent if 400 <= exn.code < 500 and exn.code not in (408, 429) else OSError
        raise kind(f"HTTP {exn.code} {exn.reason}") from None
    except (OSError, HTTPException) as exn:
        reason = getattr(exn, "reason", exn)
        raise OSError(f"does not answer: {reason}") from None
    if offset and response.status != 206:  # the server sent the whole body: skip to the offset
        stream = _Http(response, url, 0)
        _skip(stream, offset)
        return stream
    return _Http(response, url, offset)


class _Fsspec:
    """An fsspec file; the backend's own errors (botocore's, ...) surface as OSError."""

    def __init__(self, f: Any, url: str) -> None:
        self.f, self.url = f, url

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except OSError:
            raise
        except Exception as exn:  # backends raise their own types for network faults
            raise OSError(f"reading {mask(self.url)}: {type(exn).__name__}: {exn}") from exn

    def close(self) -> None:
        self.f.close()


def _open_fsspec(url: str, offset: int) -> ByteStream:
    import fsspec

    check_scheme(url)
    try:
        f = fsspec.open(url, "rb").open()
        if offset:
            f.seek(offset)
    except FileNotFoundError as exn:
        raise Permanent(f"{mask(url)} does not exist") from exn
    except OSError:
        raise
    except Exception as exn:  # backends raise their own types (credentials, network)
        raise OSError(f"opening {mask(url)}: {type(exn).__name__}: {exn}") from exn
    return _Fsspec(f, url)
