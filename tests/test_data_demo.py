"""The spoken-digits demo builder, on the first 40 digit images (80 samples, about a second of espeak-ng)."""

import io
import json
import re

import pytest
import soundfile
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

import data_pipelines.demo as demo
from data_pipelines import (
    AudioSpec,
    ImageSpec,
    StreamConfig,
    build_loader,
    build_spoken_digits,
    count_samples,
    iter_samples,
)

LIMIT, CAPTIONS = 40, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = build_spoken_digits(
        out, limit=LIMIT, samples_per_shard=30, captions_per_image=CAPTIONS, progress=False
    )
    return out, summary


@pytest.fixture(scope="module")
def read_back(built):
    out, _ = built
    return {split: list(iter_samples(str(out / split))) for split in ("train", "test")}


def test_summary_matches_shards_and_sizes(built, read_back):
    out, summary = built
    assert not summary["skipped"]
    splits = summary["splits"]
    assert splits["test"]["images"] == 8 and splits["train"]["images"] == 32  # test_fraction 0.2
    assert splits["train"]["samples"] + splits["test"]["samples"] == LIMIT * CAPTIONS
    for split, rows in read_back.items():
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert len(rows) == splits[split]["samples"] == sum(sizes.values()) == count_samples(str(out / split))
        assert sizes == splits[split]["shards"]
        assert len(rows) == len({r["__key__"] for r in rows})
    assert max(splits["train"]["shards"].values()) == 30
    assert json.loads((out / "classes.json").read_text())[7] == "seven"


def test_samples_decode_and_agree_with_their_label(read_back):
    for split, rows in read_back.items():
        for row in rows:
            meta = json.loads(row["json"])
            caption = row["txt"].decode()
            assert meta["split"] == split and row["__key__"].startswith(f"{split}_")
            assert meta["caption"] == caption
            label = meta["label"]
            assert demo.CLASSES[label] in caption.split() or str(label) in caption.replace(",", " ").split()
            image = Image.open(io.BytesIO(row["png"]))
            assert image.size == (32, 32) and image.mode == "L"
            wave, rate = soundfile.read(io.BytesIO(row["wav"]), dtype="float32", always_2d=True)
            assert rate == 22050 and wave.shape[1] == 1 and wave.shape[0] > 0.2 * rate


def test_splits_are_disjoint_by_image_and_captions_differ(read_back):
    images = {
        split: {json.loads(r["json"])["image_index"] for r in rows} for split, rows in read_back.items()
    }
    assert not images["train"] & images["test"]
    assert images["train"] | images["test"] == set(range(LIMIT))
    captions: dict[int, list[str]] = {}
    for rows in read_back.values():
        for r in rows:
            captions.setdefault(json.loads(r["json"])["image_index"], []).append(r["txt"].decode())
    assert all(len(c) == CAPTIONS and len(set(c)) == CAPTIONS for c in captions.values())


def test_rebuild_with_same_parameters_is_skipped(built, monkeypatch):
    out, summary = built
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)  # a finished build needs no espeak-ng
    again = build_spoken_digits(
        out, limit=LIMIT, samples_per_shard=30, captions_per_image=CAPTIONS, progress=False
    )
    assert again["skipped"] and again["splits"] == summary["splits"]


def test_rebuild_when_a_shard_went_missing(tmp_path):
    first = build_spoken_digits(tmp_path, limit=10, progress=False)
    (tmp_path / "test" / "shard-000000.tar").unlink()
    again = build_spoken_digits(tmp_path, limit=10, progress=False)
    assert not again["skipped"] and again["splits"] == first["splits"]
    assert count_samples(str(tmp_path / "test")) == first["splits"]["test"]["samples"]
    (tmp_path / "DONE.json").write_text("{not json")
    assert not build_spoken_digits(tmp_path, limit=10, progress=False)["skipped"]


def test_same_seed_same_data_other_parameters_rebuild(tmp_path):
    a = build_spoken_digits(tmp_path / "a", limit=10, seed=4, progress=False)
    b = build_spoken_digits(tmp_path / "b", limit=10, seed=4, progress=False)
    rows = [[json.loads(r["json"]) for r in iter_samples(str(tmp_path / d / "train"))] for d in "ab"]
    assert rows[0] == rows[1] and a["splits"]["train"]["samples"] == b["splits"]["train"]["samples"]
    rebuilt = build_spoken_digits(tmp_path / "a", limit=10, seed=5, progress=False)
    assert not rebuilt["skipped"]
    assert [json.loads(r["json"]) for r in iter_samples(str(tmp_path / "a" / "train"))] != rows[0]


def test_demo_shards_feed_the_loader(built):
    out, summary = built
    audio = AudioSpec(sample_rate=16000, clip_samples=16000, n_fft=400, hop_length=160, n_mels=32)
    cfg = StreamConfig(
        shards=str(out / "test"),
        batch_size=16,
        train=False,
        num_workers=0,
        image=ImageSpec(size=32),
        audio=audio,
    )
    batches = list(build_loader(cfg, tokenizer=SimpleTokenizer(context_length=16)))
    assert sum(len(b["__key__"]) for b in batches) == summary["splits"]["test"]["samples"]
    assert batches[0]["audio"].shape == (16, 32, 101) and (batches[0]["label"] >= 0).all()


def test_missing_espeak_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    with pytest.raises(
        RuntimeError, match="espeak-ng is not installed: run `sudo apt-get install espeak-ng`"
    ):
        build_spoken_digits(tmp_path)


@pytest.mark.parametrize("voice", ["no-such-voice", "en+nosuch"])  # espeak-ng itself would fall back silently
def test_unknown_voice_is_named(tmp_path, voice):
    with pytest.raises(ValueError, match=re.escape(f"unknown espeak-ng voice '{voice}'")):
        build_spoken_digits(tmp_path, limit=5, voices=("en-us", voice), progress=False)


def test_default_voices_are_all_listed():
    demo.check_voices(demo.DEFAULT_VOICES)
