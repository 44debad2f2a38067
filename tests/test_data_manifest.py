"""Writing shards from a folder + JSONL/CSV manifest, and verifying shards."""

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from data_pipelines import (
    AudioSpec,
    ImageSpec,
    StreamConfig,
    build_loader,
    format_verify_report,
    format_write_summary,
    iter_samples,
    verify_exit_code,
    verify_shards,
    write_from_manifest,
    write_shards,
)
from data_pipelines.synthetic import audio_bytes, image_bytes

RNG = np.random.default_rng(0)


def image_file(path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("png", "jpg"):
        path.write_bytes(image_bytes(3, 12, RNG, fmt))
    else:
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), color=(200, 10, 10)).save(buffer, format=fmt.upper())
        path.write_bytes(buffer.getvalue())


def audio_file(path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "aiff":
        buffer = io.BytesIO()
        soundfile.write(buffer, np.zeros((800, 1), dtype=np.float32) + 0.1, 8000, format="AIFF")
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(audio_bytes(2, 16000, 0.2, 2, fmt))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    data = root / "data"
    image_file(data / "images/a.png", "png")
    image_file(data / "images/b.jpg", "jpg")
    image_file(data / "images/c.bmp", "bmp")
    image_file(root / "outside/secret.png", "png")
    (data / "images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    for fmt in ("wav", "flac", "ogg", "mp3", "aiff"):
        audio_file(data / f"audio/a.{fmt}", fmt)
    (data / "audio/bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    os.symlink(root / "outside/secret.png", data / "link.png")
    rows = [
        {"image": "images/a.png", "text": "a red square", "label": 3, "extra": {"photographer": "me"}},
        {"audio": "audio/a.flac", "text": ["one caption", "", "another caption"]},
        {"image": "images/c.bmp"},
        {"audio": "audio/a.aiff", "label": "5"},
        {"text": "just words"},
        {"image": "images/sub/../b.jpg", "audio": "audio/a.ogg", "text": "inside after all"},
        {"audio": "audio/a.mp3", "text": "mp3"},
        {"audio": "audio/a.wav", "image": "images/a.png"},
        {"image": "../outside/secret.png", "text": "up and out"},
        {"image": str(root / "outside/secret.png"), "text": "absolute"},
        {"image": "link.png", "text": "through a symlink"},
        {"image": "images/missing.png", "text": "gone"},
        {"image": "images/bad.png", "text": "broken image"},
        {"audio": "audio/bad.wav", "text": "broken audio"},
        {"text": "   ", "label": 1},
        {"text": "a label that is neither a class id nor a name", "label": [1, 2]},
        {"text": "extra must be an object", "extra": [1, 2]},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(4, "{this is not json")
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture(scope="module")
def written(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return write_from_manifest(folder, "manifest.jsonl", out, progress=False), out


def test_summary_says_what_was_written_and_why_rows_were_skipped(written):
    summary, out = written
    assert summary["rows"] == 18 and summary["written"] == 8
    assert summary["skipped"] == {
        "bad_row": 1,
        "path_escapes_folder": 3,
        "missing_file": 1,
        "bad_image": 1,
        "bad_audio": 1,
        "bad_label": 1,
        "bad_extra": 1,
        "no_modality": 1,
    }
    by_line = {s["row"]: (s["kind"], s["key"]) for s in summary["skipped_rows"]}
    assert by_line[5] == ("bad_row", "00000004")  # line numbers count from 1, keys are row positions
    assert {by_line[n][0] for n in (10, 11, 12)} == {"path_escapes_folder"}
    reasons = " ".join(s["reason"] for s in summary["skipped_rows"])
    assert "images/missing.png" in reasons and "leads outside the folder" in reasons
    assert summary["modalities"] == {"image": 4, "text": 5, "audio": 5}
    skipped_file = [json.loads(line) for line in Path(summary["skipped_file"]).read_text().splitlines()]
    assert skipped_file == summary["skipped_rows"]
    assert json.loads((out / "train/sizes.json").read_text()) == summary["splits"]["train"]["shards"]
    text = format_write_summary(summary, max_rows=3)
    assert text.startswith("8 of 18 manifest rows written") and "train: 8 samples in 1 shards" in text
    assert "line 5 (key 00000004): bad_row" in text and "... 7 more" in text


def test_written_samples_keep_their_files_and_metadata(written):
    summary, out = written
    samples = {s["__key__"]: s for s in iter_samples(str(out / "train"))}
    assert len(samples) == 8
    first = samples["00000000"]
    assert set(first) - {"__key__", "__url__"} == {"png", "txt", "json"}
    meta = json.loads(first["json"])
    assert meta == {
        "source": {"row": 1, "image": "images/a.png"},
        "label": 3,
        "extra": {"photographer": "me"},
    }
    assert json.loads(samples["00000001"]["json"])["text"] == ["one caption", "another caption"]
    assert "png" in samples["00000002"]  # bmp converted losslessly to png
    assert (
        "wav" in samples["00000003"] and json.loads(samples["00000003"]["json"])["label"] == 5
    )  # aiff -> wav
    assert {"jpg", "ogg", "txt"} <= set(samples["00000006"])
    assert json.loads(samples["00000006"]["json"])["source"]["image"] == "images/b.jpg"
    assert "mp3" in samples["00000007"]


def test_written_shards_load_with_presence_masks(written):
    summary, out = written
    audio = AudioSpec(sample_rate=16000, clip_samples=4000, n_fft=256, hop_length=160, n_mels=16)
    cfg = StreamConfig(
        shards=str(out / "train"),
        batch_size=8,
        train=False,
        num_workers=0,
        image=ImageSpec(size=12),
        audio=audio,
    )
    (batch,) = list(build_loader(cfg, tokenizer=SimpleTokenizer(context_length=8)))
    present = {
        m: dict(zip(batch["__key__"], mask.tolist(), strict=True)) for m, mask in batch["present"].items()
    }
    assert present["image"]["00000000"] and not present["audio"]["00000000"]
    assert present["audio"]["00000001"] and not present["image"]["00000001"] and present["text"]["00000001"]
    assert (
        present["text"]["00000005"] and not present["image"]["00000005"] and not present["audio"]["00000005"]
    )
    assert batch["label"].tolist()[:4] == [3, -1, -1, 5]


def test_csv_manifest_with_a_grouped_test_split_and_shard_limits(tmp_path):
    rows = [
        {"key": f"item{i:02d}", "text": f"caption {i} " + "x" * 6000, "group": str(i // 2)} for i in range(20)
    ]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "text", "group"])
        writer.writeheader()
        writer.writerows(rows)
    summary = write_from_manifest(
        tmp_path,
        manifest,
        tmp_path / "out",
        key_col="key",
        group_col="group",
        test_fraction=0.3,
        max_count=4,
        max_bytes=25 * 1024,  # two ~7 kB samples fit (tar pads shards to 10 kB records), three do not
        progress=False,
    )
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    assert (train["total"], test["total"]) == (14, 6)  # 3 of 10 groups
    groups = {
        split: {int(s["__key__"][4:]) // 2 for s in iter_samples(str(tmp_path / "out" / split))}
        for split in ("train", "test")
    }
    assert not groups["train"] & groups["test"] and len(groups["test"]) == 3
    for split in (train, test):
        assert max(split["shards"].values()) == 2 and max(split["bytes"].values()) <= 25 * 1024
        for name, size in split["bytes"].items():
            assert os.path.getsize(os.path.join(os.path.dirname(split["pattern"]), name)) == size
    write_from_manifest(
        tmp_path,
        manifest,
        tmp_path / "again",
        key_col="key",
        group_col="group",
        test_fraction=0.3,
        progress=False,
    )
    assert sorted(s["__key__"] for s in iter_samples(str(tmp_path / "again" / "test"))) == sorted(
        s["__key__"] for s in iter_samples(str(tmp_path / "out" / "test"))
    )  # the split depends on the seed only


def test_manifest_mistakes_are_clear_errors(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption\nx.png,hello\n")
    with pytest.raises(
        ValueError,
        match=r"none of the columns \['image', 'audio', 'text'\]; its columns are \['caption', 'path'\]",
    ):
        write_from_manifest(tmp_path, "m.csv", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="manifest nope.jsonl does not exist"):
        write_from_manifest(tmp_path, "nope.jsonl", tmp_path / "out", progress=False)
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match=r"must be a \.jsonl, \.ndjson, \.csv or \.tsv file"):
        write_from_manifest(tmp_path, "m.txt", tmp_path / "out", progress=False)
    (tmp_path / "few.csv").write_text("text\na\nb\n")
    with pytest.raises(ValueError, match="leaves no training sample"):
        write_from_manifest(tmp_path, "few.csv", tmp_path / "out", test_fraction=0.9, progress=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl has no rows"):
        write_from_manifest(tmp_path, "empty.jsonl", tmp_path / "out", progress=False)
    write_from_manifest(tmp_path, "few.csv", tmp_path / "twice", progress=False)
    with pytest.raises(FileExistsError, match="already holds shards"):  # never written over
        write_from_manifest(tmp_path, "few.csv", tmp_path / "twice", progress=False)


def test_verify_counts_modalities_and_passes_good_shards(written):
    summary, out = written
    report = verify_shards(str(out / "train"))
    assert report["samples"] == report["good"] == 8 and not report["bad"] and not report["unreadable"]
    assert report["modalities"] == summary["modalities"]
    assert report["combinations"]["image+text"] == 1 and report["extensions"]["json"] == 8
    assert verify_exit_code(report) == 0 == verify_exit_code(report, strict=True)


def test_verify_reports_every_bad_sample_and_unreadable_shard(tmp_path):
    from data_pipelines import synthetic_samples

    samples = list(synthetic_samples(6, image_size=8))
    samples[1]["png"] = b"broken"
    written = write_shards(samples, tmp_path, max_count=3)
    with open(tmp_path / "shard-000001.tar", "r+b") as f:
        f.truncate(written["bytes"]["shard-000001.tar"] // 2)
    report = verify_shards(str(tmp_path))
    assert [(b["key"], b["kind"]) for b in report["bad"]] == [("syn_000001", "bad_image")]
    assert report["bad"][0]["shard"] == str(tmp_path / "shard-000000.tar")
    (broken,) = report["unreadable"]
    assert broken["shard"] == str(tmp_path / "shard-000001.tar") and broken["kind"] == "truncated_tar"
    assert report["sizes_mismatch"][0]["sizes_json"] == 3 > report["sizes_mismatch"][0]["read"]
    assert verify_exit_code(report) == 1
    text = format_verify_report(report)
    assert f"{tmp_path / 'shard-000000.tar'} syn_000001: bad_image" in text
    assert f"UNREADABLE {tmp_path / 'shard-000001.tar'}" in text and "truncated_tar" in text
    report_ok = verify_shards(str(tmp_path / "shard-000000.tar"))
    assert verify_exit_code(report_ok) == 0 and verify_exit_code(report_ok, strict=True) == 1


def test_class_name_labels_are_written_as_names(tmp_path):
    """A manifest whose labels are class names (as many public sets give them) writes every row, each
    sample's JSON carrying its name, which the stream reads back as the label name."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [{"text": f"a photo of a {name}", "label": name} for name in ("cat", "dog", " cat ")]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = write_from_manifest(folder, "m.jsonl", tmp_path / "out", progress=False)
    assert summary["written"] == 3 and not summary["skipped"]
    cfg = StreamConfig(shards=str(tmp_path / "out" / "train"), batch_size=3, train=False, num_workers=0)
    batch = next(iter(build_loader(cfg, tokenizer=SimpleTokenizer(context_length=8))))
    assert sorted(batch["label_name"]) == ["cat", "cat", "dog"] and batch["label"].tolist() == [-1] * 3
