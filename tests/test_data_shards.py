"""Writing shards, reading them back, counting them, and resolving shard specs."""

import json
import os

import pytest

from data_pipelines import count_samples, expand_shards, iter_samples, synthetic_samples, write_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    summary = write_shards(synthetic_samples(7, seed=1), out, max_count=3)
    return out, summary


def test_write_shards_splits_by_count_and_writes_sizes(shard_dir):
    out, summary = shard_dir
    expected = {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    assert summary["shards"] == expected and summary["total"] == 7
    assert json.loads((out / "sizes.json").read_text()) == expected
    assert summary["pattern"] == str(out / "shard-{000000..000002}.tar")
    assert expand_shards(summary["pattern"]) == [str(out / name) for name in expected]


def test_iter_samples_reads_back_every_sample_in_order(shard_dir):
    out, summary = shard_dir
    written = list(synthetic_samples(7, seed=1))
    read = list(iter_samples(summary["pattern"]))
    assert [s["__key__"] for s in read] == [s["__key__"] for s in written]
    for w, r in zip(written, read, strict=True):
        assert r["png"] == w["png"] and r["wav"] == w["wav"] and r["txt"].decode() == w["txt"]
        assert json.loads(r["json"]) == w["json"]
        assert r["__url__"].startswith(str(out))


def test_count_samples_with_and_without_sizes(shard_dir, tmp_path):
    out, _ = shard_dir
    assert count_samples(str(out)) == 7
    bare = tmp_path / "bare"
    write_shards(synthetic_samples(5), bare, max_count=2)
    os.remove(bare / "sizes.json")
    assert count_samples(str(bare)) == 5


def test_write_shards_refuses_bad_input(tmp_path, shard_dir):
    out, _ = shard_dir
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(synthetic_samples(1), out)
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path / "empty")
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        write_shards([{"__key__": "k", "txt": "a"}, {"__key__": "k", "txt": "b"}], tmp_path / "dup")
    with pytest.raises(ValueError, match=r"'a\.b' must not contain"):
        write_shards([{"__key__": "a.b", "txt": "a"}], tmp_path / "dot")


def test_expand_shards_forms(shard_dir, tmp_path):
    out, _ = shard_dir
    names = [str(out / f"shard-00000{i}.tar") for i in range(3)]
    assert expand_shards(str(out / "shard-{000000..000002}.tar")) == names
    assert expand_shards(str(out / "shard-{000000,000002}.tar")) == [
        names[0],
        names[2],
    ]  # comma inside braces
    assert expand_shards(str(out / "*.tar")) == names
    assert expand_shards(str(out)) == names
    assert expand_shards(f"{names[2]}, {out / 'shard-00000[01].tar'}") == [names[2], names[0], names[1]]
    assert expand_shards(f"{out},{names[0]}") == [*names, names[0]]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("shard-{000000..000003}.tar", "shard-000003.tar"),  # one expansion missing
        ("nothing-*.tar", "nothing-*.tar"),
        ("no/such/dir", "no/such/dir"),
        ("emptydir", "emptydir"),
    ],
)
def test_expand_shards_names_what_is_missing(shard_dir, tmp_path, spec, message):
    out, _ = shard_dir
    (tmp_path / "emptydir").mkdir()
    base = out if spec.startswith("shard") or spec.startswith("nothing") else tmp_path
    with pytest.raises(FileNotFoundError, match=message.replace("*", r"\*").replace(".", r"\.")):
        expand_shards(str(base / spec))


def test_expand_shards_rejects_empty_and_unbalanced_specs():
    with pytest.raises(ValueError, match="empty shard spec"):
        expand_shards(" , ")
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_shards("a-{000..001.tar")


def test_shards_interoperate_with_webdataset(tmp_path):
    import webdataset as wds

    ours = write_shards(synthetic_samples(5), tmp_path / "ours", max_count=3)["pattern"]
    theirs = [s for s in wds.DataPipeline(wds.SimpleShardList(expand_shards(ours)), wds.tarfile_to_samples())]
    theirs = [s for s in theirs if "png" in s]
    assert [s["__key__"] for s in theirs] == [s["__key__"] for s in iter_samples(ours)]
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "w-%06d.tar"), maxcount=2, verbose=0) as sink:
        for sample in synthetic_samples(5):
            sink.write(sample)
    read = list(iter_samples(str(tmp_path / "wds")))
    assert [s["__key__"] for s in read] == [f"syn_{i:06d}" for i in range(5)]
    assert read[3]["png"] == list(synthetic_samples(5))[3]["png"]


def test_same_samples_give_byte_identical_shards(tmp_path):
    a = write_shards(synthetic_samples(4), tmp_path / "a")
    b = write_shards(synthetic_samples(4), tmp_path / "b")
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()
    assert a["bytes"] == b["bytes"]


def test_max_bytes_is_a_hard_limit_except_for_a_lone_oversize_sample(tmp_path):
    samples = [{"__key__": f"k{i}", "txt": "x" * (4000 if i != 3 else 30000)} for i in range(6)]
    summary = write_shards(samples, tmp_path, max_bytes=20480)
    for name, size in summary["bytes"].items():
        assert size == os.path.getsize(tmp_path / name)
        assert size <= 20480 or summary["shards"][name] == 1
    assert summary["oversize"] == ["k3"] and summary["total"] == 6
    assert [s["__key__"] for s in iter_samples(summary["pattern"])] == [f"k{i}" for i in range(6)]


def test_a_failed_write_leaves_finished_shards_and_no_partial_file(tmp_path):
    samples = [{"__key__": "a", "txt": "fine"}, {"__key__": "b", "txt": "fine"}, {"__key__": "c", "cls": 3}]
    with pytest.raises(ValueError, match="sample 'c': cls is a int"):
        write_shards(samples, tmp_path, max_count=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # no .part, no sizes.json


@pytest.mark.parametrize(
    "damage, kind, last_key",
    [
        (lambda raw, offsets: raw[: offsets[2] + 100], "truncated_tar", "syn_000001"),  # inside a file
        # at a file boundary: sample 1 might have had more files, so it is not trusted
        (lambda raw, offsets: raw[: offsets[2] - 512], "truncated_tar", "syn_000000"),
        (lambda raw, offsets: raw[:100], "unreadable_shard", None),  # not even one header
        (lambda raw, offsets: b"", "unreadable_shard", None),
    ],
)
def test_damaged_shards_raise_after_their_complete_samples(tmp_path, damage, kind, last_key):
    from data_pipelines import ShardError, scan_shard

    path = tmp_path / "shard-000000.tar"
    write_shards(synthetic_samples(4), tmp_path)
    offsets = [ref.files[0][1] for ref in scan_shard(str(path))]  # where each sample's first file starts
    path.write_bytes(damage(path.read_bytes(), offsets))
    keys = []
    with pytest.raises(ShardError, match=kind) as info:
        keys.extend(ref.key for ref in scan_shard(str(path)))
    assert info.value.kind == kind and info.value.key == last_key and str(path) in str(info.value)
    assert keys == ([] if last_key is None else [f"syn_{i:06d}" for i in range(int(last_key[-1]) + 1)])


def _tar_with(path, fmt, members):
    """A tar in tarfile's `fmt` holding (name, bytes) files and (name, ("type", tarfile type)) others."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size, info.mtime = len(data), 1234.5  # a float mtime makes pax write a header
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = data[1]
                if info.type == tarfile.SYMTYPE:
                    info.linkname = "elsewhere"
                tar.addfile(info)


@pytest.mark.parametrize("fmt", ["GNU_FORMAT", "USTAR_FORMAT", "PAX_FORMAT"])
def test_scan_reads_every_tar_flavour_as_tarfile_does(tmp_path, fmt):
    """The header scanner finds the same files, offsets and sizes as Python's tarfile: long names
    (GNU long-name members, ustar prefixes, pax paths), non-ASCII names, directories and links."""
    import tarfile

    from data_pipelines import scan_shard

    long_dir = "d" * 60 + "/" + "e" * 70
    members = [
        ("plain.txt", b"hello"),
        ("plain.cls", b"3"),
        ("sub/", ("type", tarfile.DIRTYPE)),
        ("sub/link.txt", ("type", tarfile.SYMTYPE)),
        (f"{long_dir}/k1.txt", b"x" * 700),  # name > 100 bytes: GNU long name, ustar prefix or pax path
        (f"{long_dir}/k1.png", bytes(range(256)) * 3),
        ("k2.txt", b""),
    ]
    if fmt != "USTAR_FORMAT":  # ustar cannot hold these
        members += [("caf\u00e9.txt", "\u00e9".encode()), ("f" * 120 + ".txt", b"long")]
    path = tmp_path / "shard.tar"
    _tar_with(path, getattr(tarfile, fmt), members)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    found = [
        (f"{ref.key}.{ext}", offset, size) for ref in scan_shard(str(path)) for ext, offset, size in ref.files
    ]
    assert found == expected
    assert len(found) == len([m for m in members if isinstance(m[1], bytes)])


def test_a_damaged_header_mid_shard_ends_it_after_the_complete_samples(tmp_path):
    from data_pipelines import ShardError, scan_shard

    path = tmp_path / "shard-000000.tar"
    write_shards(synthetic_samples(4), tmp_path)
    refs = list(scan_shard(str(path)))
    raw = bytearray(path.read_bytes())
    header = refs[2].files[0][1] - 512  # the header of sample 2's first file
    raw[header : header + 8] = b"garbage!"  # its checksum no longer matches
    path.write_bytes(bytes(raw))
    keys = []
    with pytest.raises(ShardError, match="truncated_tar") as info:
        keys.extend(ref.key for ref in scan_shard(str(path)))
    assert keys == ["syn_000000"] and info.value.key == "syn_000000"  # sample 1 may have lost files


def test_load_reads_only_the_wanted_files(tmp_path):
    from data_pipelines import scan_shard

    write_shards(synthetic_samples(2), tmp_path)
    ref = next(scan_shard(str(tmp_path / "shard-000000.tar")))
    full, part = ref.load(), ref.load(frozenset({"txt", "json"}))
    assert set(part) == {"__key__", "__url__", "__files__", "txt", "json"}
    assert part["txt"] == full["txt"] and part["json"] == full["json"]
    assert sorted(part["__files__"]) == sorted(k for k in full if not k.startswith("__"))
