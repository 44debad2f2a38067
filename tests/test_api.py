"""The Python API embeds files and tensors exactly as the evaluation stream does (`mmssl embed`)."""

import io
import json

import numpy as np
import pytest
import soundfile
import torch
from run_fixture import tiny_run

from data_pipelines import iter_samples
from mmssl.api import load
from mmssl.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def test_files_and_tensors_embed_like_mmssl_embed(trained, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", str(trained["run_dir"]), "--data", trained["test"], "--out", str(out)]) == 0
    assert "embedded 24 samples" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert {m: e["rows"] for m, e in manifest["modalities"].items()} == {"audio": 24, "image": 24, "text": 24}

    samples = {s["__key__"]: s for s in iter_samples(trained["test"])}
    keys = (out / "image_keys.txt").read_text().split()
    assert keys == sorted(samples)
    rows = {m: np.load(out / f"{m}.npy") for m in ("image", "text", "audio")}
    assert np.allclose(np.linalg.norm(rows["image"], axis=1), 1.0, atol=1e-5)
    labels = np.load(out / "image_labels.npy")
    assert labels.tolist() == [json.loads(samples[k]["json"])["label"] for k in keys]

    pick = keys[:5]
    for key in pick:  # the sample's files as a user would have them
        (tmp_path / f"{key}.png").write_bytes(samples[key]["png"])
        (tmp_path / f"{key}.wav").write_bytes(samples[key]["wav"])
    m = load(trained["run_dir"])
    expect = {name: torch.from_numpy(r[: len(pick)]) for name, r in rows.items()}
    images = m.embed_images([tmp_path / f"{k}.png" for k in pick])
    texts = m.embed_texts([samples[k]["txt"].decode() for k in pick])
    audio = m.embed_audio([str(tmp_path / f"{k}.wav") for k in pick])
    for name, got in (("image", images), ("text", texts), ("audio", audio)):
        torch.testing.assert_close(got, expect[name], rtol=0, atol=1e-5)
    assert not torch.allclose(images[0], images[1])  # distinct inputs, distinct embeddings

    # tensors: preprocessed images, and waveforms with their sample rate
    torch.testing.assert_close(m.embed_images(m.preprocess_images([tmp_path / f"{pick[0]}.png"])), images[:1])
    wave, rate = soundfile.read(io.BytesIO(samples[pick[1]]["wav"]), dtype="float32", always_2d=True)
    from_wave = m.embed_audio([torch.from_numpy(wave.mean(axis=1))], sample_rate=rate)
    torch.testing.assert_close(from_wave, audio[1:2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        m.embed_audio([torch.zeros(1000)])
