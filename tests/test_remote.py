"""Shards read as streams: from an HTTP server started here (127.0.0.1 only) and through `pipe:cat`.

Local files are the reference: a stream of the same shards must give the same samples, through faults
(a connection dropped mid-shard, a command exiting non-zero), across a resume, and never show a URL's
credentials.
"""

import base64
import http.server
import itertools
import json
import threading
from pathlib import Path

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from data_pipelines import (
    AudioSpec,
    ImageSpec,
    StreamConfig,
    build_loader,
    check_layout,
    combine_states,
    count_samples,
    iter_samples,
    synthetic_samples,
    tario,
    verify_shards,
    write_shards,
)
from data_pipelines.remote import mask

AUDIO = AudioSpec(sample_rate=8000, clip_samples=1200, n_fft=128, hop_length=64, n_mels=8)
N_SHARDS = 4
PATTERN = "shard-{000000..000003}.tar"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Files of server.root; honours Range (unless server.ranges is False); drops, once, the connection
    halfway through each path in server.drop; answers 401 to requests without server.auth."""

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if srv.auth and self.headers.get("Authorization") != srv.auth:
            self.send_error(401)
            return
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if srv.ranges and (wanted := self.headers.get("Range")):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.drop:
            srv.drop.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True  # the client sees the body end before its Content-Length
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote")
    write_shards(synthetic_samples(24, seed=5, image_size=8, seconds=(0.1, 0.2)), out, max_count=6)
    return out


@pytest.fixture
def server(shards):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.root, srv.requests, srv.drop, srv.ranges, srv.auth = shards, [], set(), True, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(tario, "RETRY_BACKOFF", 0.01)


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer(context_length=8)


def url(server, path: str = PATTERN, userinfo: str = "") -> str:
    return f"http://{userinfo}127.0.0.1:{server.server_address[1]}/{path}"


def config(spec: str, **overrides) -> StreamConfig:
    base = dict(
        shards=spec,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=5,
        shards_per_round=2,
        image=ImageSpec(size=8),
        audio=AUDIO,
        seed=2,
    )
    return StreamConfig(**{**base, **overrides})


def take(loader, n: int | None = None) -> list[dict]:
    return list(loader if n is None else itertools.islice(loader, n))


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert keys(a) == keys(b)
    for x, y in zip(a, b, strict=True):
        for name in ("image", "text", "audio"):
            assert torch.equal(x[name], y[name]), name


def test_training_and_evaluation_read_http_and_pipe_streams_like_local_files(shards, server, tokenizer):
    local = str(shards / PATTERN)
    for spec in (url(server), f"pipe:cat {local}"):
        train = take(build_loader(config(spec), tokenizer=tokenizer), 8)
        same_batches(train, take(build_loader(config(local), tokenizer=tokenizer), 8))
        evaluation = take(build_loader(config(spec, train=False), tokenizer=tokenizer))
        same_batches(evaluation, take(build_loader(config(local, train=False), tokenizer=tokenizer)))
        assert len(keys(evaluation)) == 24
    before = len(server.requests)
    assert count_samples(url(server)) == 24
    assert server.requests[before:] == [("/sizes.json", None)]  # counted from the served sizes.json


@pytest.mark.parametrize("ranges", [True, False])
def test_a_dropped_connection_is_retried_from_the_sample_reached(shards, server, tokenizer, ranges):
    server.ranges = ranges
    server.drop = {"/shard-000001.tar", "/shard-000002.tar"}
    got = take(build_loader(config(url(server), train=False), tokenizer=tokenizer))
    want = take(build_loader(config(str(shards / PATTERN), train=False), tokenizer=tokenizer))
    same_batches(got, want)  # nothing lost, nothing twice
    assert not server.drop and not any(b["__skipped__"] for b in got)
    retries = [r for path, r in server.requests if path == "/shard-000001.tar"][1:]
    assert len(retries) == 1 and retries[0].startswith("bytes=") and int(retries[0][6:-1]) > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_over_http_continues_exactly(shards, server, tokenizer, num_workers):
    cfg = config(url(server), num_workers=num_workers)
    first = build_loader(cfg, tokenizer=tokenizer)
    head = take(first, 3)
    state = json.loads(json.dumps(combine_states([first.state_dict()])))
    server.drop = {f"/shard-00000{i}.tar" for i in range(N_SHARDS)}  # the resumed stream meets faults too
    tail = take(build_loader(cfg, tokenizer=tokenizer, resume=state), 6)
    assert len(server.drop) < N_SHARDS
    same_batches(head + tail, take(build_loader(cfg, tokenizer=tokenizer), 9))


def test_a_failing_pipe_is_retried_then_counted_as_a_damaged_shard(shards, tmp_path, tokenizer):
    tries = tmp_path / "tries"
    good = str(shards / "shard-000000.tar")
    # the second shard's command sends 25000 bytes (its first two samples and a part), then fails
    failing = f"pipe:echo >> {tries}; head -c 25000 {shards}/shard-000001.tar; exit 3"
    loader = build_loader(config(f"pipe:cat {good},{failing}", train=False, retries=2), tokenizer=tokenizer)
    got = keys(take(loader))
    local = [s["__key__"] for s in iter_samples(f"{good},{shards}/shard-000001.tar")]
    assert got == local[:8]  # what arrived, each sample once
    assert len(tries.read_text().splitlines()) == 3  # one try and two retries
    assert loader.bad_data.counts == {"unreadable_shard": 1}
    record = loader.bad_data.examples["unreadable_shard"][0]
    assert record["key"] == got[-1] and "exited with status 3" in record["reason"]
    assert "tried 3 times" in record["reason"] and record["shard"] == failing


def test_a_source_fails_at_start_only_when_none_of_its_shards_answers(server, tokenizer, capsys):
    from mmssl.cli import main

    dead = "http://who:pw@127.0.0.1:9/shard-{000000..000001}.tar"  # port 9 (discard): nothing listens
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", f"data.train_shards={dead}", "data.eval_shards="])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("mmssl: error: data.train_shards: ") and "does not answer" in err
    assert "who:pw" not in err and "http://***@127.0.0.1:9/shard-000001.tar" in err
    # missing first shards, then one that answers: not an error at start-up
    some = url(server, "missing-{0..2}.tar") + "," + url(server, "shard-000000.tar")
    assert check_layout(config(some))[0]["samples"] == 6


def test_credentials_are_sent_and_never_shown(shards, server, tokenizer, tmp_path):
    server.auth = "Basic " + base64.b64encode(b"reader:s3cret").decode()
    spec = url(server, userinfo="reader:s3cret@")
    assert len(keys(take(build_loader(config(spec, train=False), tokenizer=tokenizer)))) == 24
    missing = url(server, "gone.tar", userinfo="reader:s3cret@")
    loader = build_loader(config(f"{missing},{spec}", train=False), tokenizer=tokenizer)
    assert len(keys(take(loader))) == 24 and loader.bad_data.counts == {"unreadable_shard": 1}
    assert "s3cret" not in json.dumps(loader.bad_data.summary())
    report = verify_shards(f"{spec},{missing}")
    assert report["samples"] == 24 and len(report["unreadable"]) == 1
    assert "s3cret" not in json.dumps(report) and "***@127.0.0.1" in report["unreadable"][0]["shard"]
    with pytest.raises(ValueError) as info:
        check_layout(config(missing))
    assert "s3cret" not in str(info.value) and "HTTP 404" in str(info.value)
    assert mask(f"pipe:curl -s {spec}") == f"pipe:curl -s {url(server, userinfo='***@')}"

    from mmssl.config import load_json, save_json, url_credentials
    from mmssl.presets import get_preset

    cfg = get_preset("tiny")
    cfg.data.train_shards = spec
    save_json(cfg, tmp_path / "config.json")
    assert "s3cret" not in (tmp_path / "config.json").read_text()
    # what a launcher hands its ranks (in their environment) restores the URL
    restored = load_json(tmp_path / "config.json", url_credentials(cfg))
    assert restored.data.train_shards == spec


def test_verify_and_sizes_work_on_an_http_brace_spec(shards, server):
    report = verify_shards(url(server))
    assert report["shards"] == N_SHARDS and report["samples"] == report["good"] == 24
    assert not report["unreadable"] and not report["sizes_mismatch"]
    sizes = json.loads((shards / "sizes.json").read_text())
    (shards / "sizes.json").write_text(json.dumps({**sizes, "shard-000002.tar": 7}))
    try:
        report = verify_shards(url(server))
    finally:
        (shards / "sizes.json").write_text(json.dumps(sizes))
    assert report["sizes_mismatch"] == [
        {"shard": url(server, "shard-000002.tar"), "sizes_json": 7, "read": 6}
    ]


def test_remote_specs_that_cannot_be_read_fail_in_one_line():
    with pytest.raises(ValueError, match=r"needs the fsspec backend s3fs \(pip install s3fs\)"):
        check_layout(config("s3://bucket/shard-{0..3}.tar"))
    with pytest.raises(ValueError, match="cannot be globbed"):
        check_layout(config("https://example.org/shards/*.tar"))


def test_fsspec_urls_are_streamed_too(shards):
    import fsspec

    memory = fsspec.filesystem("memory")  # fsspec's built-in in-process store stands in for s3:// and co
    for path in shards.iterdir():
        memory.pipe(f"/remote-test/{path.name}", path.read_bytes())
    spec = f"memory://remote-test/{PATTERN}"
    got = [(s["__key__"], s["wav"]) for s in iter_samples(spec)]
    assert got == [(s["__key__"], s["wav"]) for s in iter_samples(str(shards / PATTERN))]
    memory.rm("/remote-test/shard-000000.tar")
    assert count_samples(spec) == 24  # from its sizes.json: the shards themselves are not read


def test_data_retries_is_checked_and_reaches_the_stream():
    from mmssl import data
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset

    with pytest.raises(ValueError, match="data.retries must be >= 0"):
        apply_overrides(get_preset("tiny"), ["data.retries=-1"]).validate()
    cfg = apply_overrides(get_preset("tiny"), ["data.retries=5"]).validate()
    assert data.stream_config(cfg, train=True).retries == 5
