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
