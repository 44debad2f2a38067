"""Bad data is skipped, counted by kind and reported with shard and key; the run goes on."""

import itertools
import logging
import os

import pytest
import torch

from data_pipelines import (
    AudioSpec,
    BadDataTally,
    ImageSpec,
    StreamConfig,
    build_loader,
    scan_shard,
    synthetic_samples,
    write_shards,
)
from data_pipelines.tario import TarSink, encode_sample

AUDIO = AudioSpec(sample_rate=8000, clip_samples=1600, n_fft=128, hop_length=80, n_mels=8)
SAMPLE_KINDS = ("bad_image", "bad_audio", "no_modality", "empty_caption", "bad_text", "bad_json", "bad_shape")


def tokenizer(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer whose output is one token longer for captions saying LONG (-> bad_shape)."""
    return torch.ones(1, 9 if "LONG" in captions[0] else 8, dtype=torch.long)  # [1, L]


def config(shards, **overrides) -> StreamConfig:
    base = dict(shards=shards, batch_size=3, num_workers=0, image=ImageSpec(size=8), audio=AUDIO, train=False)
    return StreamConfig(**{**base, **overrides})


def cut(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Shards with one sample of every bad kind and four damaged shards. Returns (dir, good keys, records)."""
    out = tmp_path_factory.mktemp("bad")
    good = list(synthetic_samples(12, seed=2, image_size=8, sample_rates=(8000,)))
    keys = [s["__key__"] for s in good]
    bad = {
        "bad_image": {"png": b"\x89PNG not really"},
        "bad_audio": {"wav": b"RIFF....WAVEfmt "},
        "no_modality": None,
        "empty_caption": {"txt": "  \n"},
        "bad_text": {"txt": b"\xff\xfe\xfa"},
        "bad_json": {"json": b"{not json"},
        "bad_shape": {"txt": "a LONG caption"},
    }
    rows = [good[0]]
    for kind, change in bad.items():
        rows.append(
            {"__key__": kind, "cls": b"1"} if change is None else {**good[1], "__key__": kind, **change}
        )
    # bad_json: the caption must come from the JSON (a JSON holding only the label would just lose it)
    del next(r for r in rows if r["__key__"] == "bad_json")["txt"]
    write_shards([*rows, good[1]], out, prefix="a")

    sink = TarSink(str(out / "b-000000.tar"))  # a file twice in one sample
    members = encode_sample(good[2])
    sink.add([*members, members[0]])
    sink.add(encode_sample(good[3]))
    sink.close()

    c = write_shards(good[4:8], out, prefix="c")["out_dir"] + "/c-000000.tar"
    refs = list(scan_shard(c))
    cut(c, refs[2].files[0][1] + 10)  # inside sample 2's first file: 0 and 1 survive

    d = write_shards(good[8:11], out, prefix="d")["out_dir"] + "/d-000000.tar"
    _, offset, size = list(scan_shard(d))[1].files[-1]
    cut(d, offset + -(-size // 512) * 512)  # at a file boundary, with no end-of-archive block

    (out / "e-000000.tar").write_bytes(b"this is not a tar file\n" * 40)
    write_shards(good[11:], out, prefix="f")
    expected = {
        **{kind: (f"{out}/a-000000.tar", kind) for kind in bad},
        "duplicate_file": (f"{out}/b-000000.tar", keys[2]),
        "truncated_tar": (c, keys[5]),
        "truncated_tar_at_boundary": (d, keys[8]),
        "unreadable_shard": (f"{out}/e-000000.tar", None),
    }
    good_keys = [keys[0], keys[1], keys[3], keys[4], keys[5], keys[8], keys[11]]
    return str(out), good_keys, expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_kind_is_skipped_counted_and_reported_and_good_samples_all_arrive(damaged, num_workers):
    spec, good_keys, expected = damaged
    loader = build_loader(config(spec, num_workers=num_workers), tokenizer=tokenizer)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["__key__"]) == sorted(good_keys)
    counts = {kind: 1 for kind in (*SAMPLE_KINDS, "duplicate_file", "unreadable_shard")}
    assert loader.bad_data.counts == {**counts, "truncated_tar": 2}
    records = {(r["kind"], r["shard"], r["key"]) for rs in loader.bad_data.examples.values() for r in rs}
    for kind, (shard, key) in expected.items():
        assert (kind.removesuffix("_at_boundary"), shard, key) in records, kind
    for b in batches:  # what made it into batches is whole
        assert b["text"].shape == (len(b["__key__"]), 8) and b["present"]["image"].all()


def test_counts_reach_the_trainer_from_workers_in_training(damaged):
    spec, _, _ = damaged
    loader = build_loader(config(spec, train=True, num_workers=2, shuffle_buffer=4), tokenizer=tokenizer)
    batches = list(itertools.islice(loader, 12))
    per_batch: dict[str, int] = {}
    for b in batches:
        for kind, n in b["__skipped__"].items():
            per_batch[kind] = per_batch.get(kind, 0) + n
        assert all(r["shard"] and r["kind"] in b["__skipped__"] for r in b["__bad__"])
    assert per_batch == loader.bad_data.counts and sum(per_batch.values()) >= 5


def test_tally_logs_a_few_lines_per_kind_then_one_summary_line(caplog):
    tally = BadDataTally(lines_per_kind=2)
    records = [{"kind": "bad_image", "shard": "s.tar", "key": f"k{i}", "reason": "nope"} for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        tally.update({"__skipped__": {"bad_image": 5, "empty_caption": 1}, "__bad__": records})
        tally.update({"__skipped__": {"bad_image": 1}, "__bad__": records[:1]})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == [
        "skipped sample 'k0' of s.tar: bad_image: nope",
        "skipped sample 'k1' of s.tar: bad_image: nope",
    ]
    assert lines[2:] == ["further bad_image samples are counted but not logged one by one"]
    assert tally.counts == {"bad_image": 6, "empty_caption": 1}
    assert tally.format() == "bad data skipped: 6 bad_image, 1 empty_caption"
    assert tally.summary()["total"] == 7 and len(tally.summary()["examples"]["bad_image"]) == 2


def test_a_source_with_nothing_usable_stops_with_a_clear_error(tmp_path):
    samples = [{**s, "png": b"broken"} for s in synthetic_samples(12, image_size=8, sample_rates=(8000,))]
    pattern = write_shards(samples, tmp_path, max_count=4)["pattern"]
    cfg = config(pattern, train=True, audio=None, text=False, max_bad_in_a_row=10)
    with pytest.raises(RuntimeError, match=r"10 bad samples in a row .* bad_image"):
        next(iter(build_loader(cfg, tokenizer=None, check=False)))


def test_unreadable_shards_only_stop_with_a_clear_error(tmp_path):
    for i in range(2):
        (tmp_path / f"x-{i}.tar").write_bytes(b"garbage" * 100)
    cfg = config(str(tmp_path), train=True, audio=None, text=False)
    with pytest.raises(ValueError, match="no sample could be read from the first shards"):
        build_loader(cfg, tokenizer=None)
    with pytest.raises(RuntimeError, match="20 rounds in a row found no readable sample"):
        next(iter(build_loader(cfg, tokenizer=None, check=False)))
    assert os.path.getsize(tmp_path / "x-0.tar") == 700  # nothing was written to the shards
