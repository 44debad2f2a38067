"""`mmssl shards --dedup`: exact duplicates (image bytes, audio bytes, normalised caption with the same
media) and, with "near", resized or recompressed images are dropped before writing; the first is kept."""

import io
import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import format_write_summary, iter_samples, write_from_manifest
from data_pipelines.dedup import Duplicates, normalise_caption
from data_pipelines.synthetic import audio_bytes
from mmssl import cli


def picture(seed: int) -> Image.Image:
    """A 64x64 picture of smooth colour patches (an 8x8 random grid, upscaled)."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((64, 64), Image.BILINEAR)


def save(img: Image.Image, path, fmt: str, **kw) -> None:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    save(picture(0), root / "dog.png", "PNG")
    shutil.copy(root / "dog.png", root / "dog_copy.png")
    save(picture(0).resize((48, 48)), root / "dog_small.jpg", "JPEG", quality=70)  # near only
    save(picture(1), root / "cat.png", "PNG")
    (root / "bark.wav").write_bytes(audio_bytes(0, 16000, 0.2, 1, "wav"))
    shutil.copy(root / "bark.wav", root / "bark_copy.wav")
    rows = [
        {"key": "broken", "image": "dog.png", "audio": "gone.wav"},  # skipped: hides no later row
        {"key": "dog", "image": "dog.png", "text": "A dog on the beach."},
        {"key": "dog_again", "image": "dog_copy.png", "text": "  a DOG on the   beach!"},  # same_caption
        {"key": "dog_other_caption", "image": "dog.png", "text": "a brown dog"},  # same_image
        {"key": "dog_small", "image": "dog_small.jpg", "text": "a small dog"},  # near_image
        {"key": "cat", "image": "cat.png", "text": "A dog on the beach."},  # same caption, other image
        {"key": "words", "text": "Hello,   world"},
        {"key": "words_again", "text": "hello, world..."},  # same_caption, no media
        {"key": "bark", "audio": "bark.wav", "text": "a bark"},
        {"key": "bark_again", "audio": "bark_copy.wav", "text": "a dog barks"},  # same_audio
    ]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def written_keys(summary) -> list[str]:
    return [s["__key__"] for s in iter_samples(summary["splits"]["train"]["pattern"])]


def test_normalised_captions():
    assert normalise_caption("  A Dog,\n running! ") == "a dog, running"
    assert normalise_caption("...") == ""


@pytest.mark.parametrize("mode", ["exact", "near"])
def test_dedup_drops_later_duplicates_and_keeps_the_first(folder, tmp_path, mode):
    summary = write_from_manifest(folder, "m.jsonl", tmp_path, key_col="key", dedup=mode, progress=False)
    expected = {"same_caption": 2, "same_image": 1, "same_audio": 1} | (
        {"near_image": 1} if mode == "near" else {}
    )
    assert summary["duplicates"] == expected
    of = {d["key"]: (d["reason"], d["of"]) for d in summary["duplicate_rows"]}
    assert of["dog_again"] == ("same_caption", "dog") and of["dog_other_caption"] == ("same_image", "dog")
    assert of["words_again"] == ("same_caption", "words") and of["bark_again"] == ("same_audio", "bark")
    kept = {"dog", "cat", "words", "bark"} | ({"dog_small"} if mode == "exact" else set())
    assert sorted(written_keys(summary)) == sorted(kept)
    assert summary["skipped"] == {"missing_file": 1}
    lines = (tmp_path / "duplicates.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == summary["duplicate_rows"]
    text = format_write_summary(summary)
    assert f"dropped {sum(expected.values())} duplicate rows" in text and "1 same_audio" in text


def test_without_dedup_every_row_is_written(folder, tmp_path):
    summary = write_from_manifest(folder, "m.jsonl", tmp_path, key_col="key", progress=False)
    assert summary["written"] == 9 and "duplicates" not in summary


def test_near_needs_imagehash_and_says_which_package(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagehash", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"pip install 'mmssl\[dedup\]'"):
        Duplicates("near")
    with pytest.raises(SystemExit) as e:
        cli.main(["shards", str(folder), "m.jsonl", "--out", str(tmp_path / "o"), "--dedup", "near"])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()  # checked before anything was read or written


def test_cli_dedup_reports_the_drops(folder, tmp_path, capsys):
    code = cli.main(["shards", str(folder), "m.jsonl", "--out", str(tmp_path), "--key-col", "key", "--dedup"])
    assert code == 0
    out = capsys.readouterr().out
    assert "dropped 4 duplicate rows: 2 same_caption, 1 same_image, 1 same_audio" in out
