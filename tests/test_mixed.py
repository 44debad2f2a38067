"""Mixed sources with missing modalities: an image-text source and an audio-text source, trained
together with every objective; each loss sees only the rows it should (per row, by its gradients)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_flops import batch_for

from data_pipelines import iter_samples, write_shards
from mmssl.cli import main
from mmssl.presets import get_preset
from mmssl.task import Task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split_sources(demo_shards, tmp_path_factory) -> Path:
    """The demo's train split rewritten as two sources: images + captions, and speech + captions."""
    out = tmp_path_factory.mktemp("mixed")
    samples = list(iter_samples(str(demo_shards / "train")))
    drop = {"image_text": "wav", "audio_text": "png"}
    for name, missing in drop.items():
        write_shards(
            ({k: v for k, v in s.items() if k != missing and not k.startswith("__url")} for s in samples),
            out / name,
            max_count=40,
        )
    return out


def test_mixed_sources_train_with_every_loss_masked(split_sources, tmp_path):
    sources = json.dumps([
        {"shards": str(split_sources / "image_text"), "weight": 1.0},
        {"shards": str(split_sources / "audio_text"), "weight": 1.0},
    ])  # fmt: skip
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny_masked", "--run-dir", str(run_dir),
            "data.train_shards=", f"data.sources={sources}", "data.eval_shards=", "data.num_workers=0",
            "optim.micro_batch_size=16", "train.steps=6", "train.log_every=1", "train.record_keys=true",
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        # no sample carries both an image and speech: that pair has no row, and contributes nothing
        assert row["contrastive_image_audio_loss"] == 0.0
        pairs = (row["contrastive_image_text_loss"], row["contrastive_text_audio_loss"])
        assert min(pairs) > 0
        # the pairs with rows, weighted by their rows: the absent pair does not pull the loss down
        assert min(pairs) - 1e-6 <= row["contrastive_loss"] <= max(pairs) + 1e-6
        for term in ("masked_image_loss", "masked_audio_loss", "masked_text_loss"):
            assert 0 < row[term] < 20, term
    keys = [
        k
        for line in (run_dir / "keys" / "rank0.jsonl").read_text().splitlines()
        for k in json.loads(line)["keys"]
    ]
    assert len(keys) == 6 * 16


def test_every_loss_sees_exactly_its_rows():
    """Per term and per row: a row's inputs get a gradient from a term exactly when the term should see
    that row (a pair's term: both sides present; a masked term: its modality present). Absent inputs
    hold random values here, so only the presence masks keep them out."""
    torch.manual_seed(0)
    cfg = get_preset("tiny_masked").validate()
    task = Task(cfg)
    rows = {"image": {0, 1, 4, 5, 7}, "text": {0, 1, 2, 3, 4, 5, 6}, "audio": {2, 3, 4, 5, 7}}
    batch = batch_for(cfg, 8)
    batch["present"] = {m: torch.tensor([i in rows[m] for i in range(8)]) for m in rows}
    batch["image"].requires_grad_()
    batch["audio"].requires_grad_()
    seen = {}  # token embeddings [B, L, D] of the (corrupted) text: the text side's inputs
    task.model.text.token_embedding.register_forward_hook(lambda _m, _a, out: seen.update(text=out))
    out = task(batch)
    inputs = {"image": batch["image"], "text": seen["text"], "audio": batch["audio"]}
    terms = {f"masked_{m}_loss": (m,) for m in rows} | {
        f"contrastive_{a}_{b}_loss": (a, b)
        for a, b in (("image", "text"), ("image", "audio"), ("text", "audio"))
    }
    for term, modalities in terms.items():
        grads = torch.autograd.grad(out[term], list(inputs.values()), retain_graph=True, allow_unused=True)
        both = set.intersection(*(rows[m] for m in modalities))
        for modality, grad in zip(inputs, grads, strict=True):
            touched = (
                set() if grad is None else set(torch.nonzero(grad.flatten(1).abs().sum(1)).flatten().tolist())
            )
            assert touched == (both if modality in modalities else set()), (term, modality)


def test_shards_command_writes_and_verifies(tmp_path, demo_shards, capsys):
    folder = tmp_path / "raw"
    folder.mkdir()
    rows = []
    for i, sample in enumerate(iter_samples(str(demo_shards / "test"))):
        if i == 6:
            break
        (folder / f"{i}.png").write_bytes(sample["png"])
        (folder / f"{i}.wav").write_bytes(sample["wav"])
        rows.append(
            {"image": f"{i}.png", "audio": f"{i}.wav", "text": sample["txt"].decode(), "label": i % 3}
        )
    rows.append({"image": "../escape.png", "text": "outside"})  # skipped: leaves the folder
    rows.append({"image": "missing.png"})  # skipped: no such file
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(["shards", str(folder), "manifest.jsonl", "--out", str(tmp_path / "out"), "--max-count", "4"])
        == 0
    )
    written = capsys.readouterr().out
    assert "6" in written and "escape" in written
    sizes = json.loads((tmp_path / "out" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 6 and max(sizes.values()) <= 4
    assert main(["shards", "--verify", str(tmp_path / "out" / "train")]) == 0
    (tmp_path / "out" / "train" / "broken.tar").write_bytes(b"not a tar file at all" * 30)
    assert main(["shards", "--verify", str(tmp_path / "out" / "train")]) == 1
