"""The whole slice, as a user runs it: `mmssl train --nproc 2` (DeepSpeed launcher, 2 gloo ranks, ZeRO-2)
on demo shards with every objective (contrastive and masked) and gradient accumulation, a checkpoint, a
resume from it, and `mmssl eval --nproc 2` on the held-out split. One run for all of it: each launch
costs more than its training here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]


def mmssl(*args: str, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mmssl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_rank_train_every_objective_checkpoint_resume_eval(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "--preset", "tiny_masked", "--nproc", "2", "--run-dir", str(run_dir),
        f"data.train_shards={demo_shards}/train", f"data.eval_shards={demo_shards}/test",
        "optim.micro_batch_size=16", "optim.grad_accum_steps=2", "optim.warmup_steps=5",
        "train.log_every=5", "train.ckpt_every=20",
    ]  # fmt: skip
    first = mmssl("train", *common, "train.steps=40", cwd=REPO)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    for pair in ("image_text", "image_audio", "text_audio"):
        assert f"contrastive_{pair}_loss" in rows[-1]
    # every masked objective trains, at its masking ratio
    first_row, last = rows[0], rows[-1]
    assert last["masked_image_ratio"] == 0.75
    assert abs(last["masked_audio_ratio"] - 0.8) < 0.05
    assert 0.05 < last["masked_text_ratio"] < 0.3
    for term in ("masked_image_loss", "masked_audio_loss", "masked_text_loss"):
        assert last[term] < first_row[term], term
    ds = json.loads((run_dir / "ds_config.json").read_text())  # 2 micro-batches of 16 on 2 ranks
    assert ds["train_batch_size"] == 16 * 2 * 2 and ds["zero_optimization"]["stage"] == 2
    # throughput in every row: global and per-rank rates, tokens per modality, data wait, MFU
    for row in rows:
        assert row["samples_per_s"] == pytest.approx(2 * row["samples_per_s_per_rank"])
        assert 0 <= row["data_wait"] <= 1 and 0 < row["mfu"] < 1
        assert row["tokens_per_s_image"] == pytest.approx(16 * row["samples_per_s"])  # 4x4 patches
        # captions are trimmed after the longest in each batch: fewer text tokens than 16 per sample
        assert 2 * row["samples_per_s"] < row["tokens_per_s_text"] < 16 * row["samples_per_s"]
    assert "MFU" in first.stdout and "samples/s" in first.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert (run_dir / "checkpoints" / "step_00000020").is_dir()
    assert (
        "text->image" in first.stdout
        and (run_dir / "eval.json").is_file()
        and (run_dir / "loss.png").is_file()
    )

    mmssl("train", *common, "train.steps=50", "--resume", "latest", cwd=REPO)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-2:] == [45, 50]  # continued from step 40, not from 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000050"

    # on 2 ranks too, started as train's are (mmssl.launch.launch_ranks)
    evaluated = mmssl("eval", str(run_dir), "--nproc", "2", "--out", str(tmp_path / "eval"), cwd=REPO)
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert results["rule"] == "label" and len(results["pairs"]) == 6
    for name, metrics in results["pairs"].items():
        assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1.0, name
        assert f"{name:<18}{metrics['R@1']:>8.3f}" in evaluated.stdout
    # the consolidated checkpoint evaluates exactly as the in-process model did at the end of training
    assert "2 rank(s)" in evaluated.stdout
    assert results["pairs"] == json.loads((run_dir / "eval.json").read_text())["pairs"]
