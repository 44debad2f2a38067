"""Faults the trainer must survive: non-finite losses and a kill -9 in the middle of a checkpoint save."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID

REPO = Path(__file__).resolve().parents[1]


def _skip_worker(_: int, out: dict) -> None:
    from mmssl import engine
    from mmssl.presets import get_preset
    from mmssl.task import Task
    from mmssl.train import train_step

    cfg = get_preset("tiny")
    info = engine.init_distributed()
    eng = engine.Engine(Task(cfg), cfg, info)
    m = cfg.model
    text = torch.randint(1, 4000, (4, m.text.context_length))
    text[:, 0], text[:, 5], text[:, 6:] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    batch = {
        "image": torch.randn(4, 3, m.image.image_size, m.image.image_size),
        "text": text,
        "audio": torch.randn(4, m.audio.n_mels, m.audio.n_frames),
        "present": {k: torch.ones(4, dtype=torch.bool) for k in ("image", "text", "audio")},
    }

    def snapshot() -> list[torch.Tensor]:
        state = [
            t.clone()
            for s in eng.optimizer.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        ]
        return [p.detach().clone() for p in eng.module.parameters()] + state

    assert train_step(eng, batch, step=0, micro=0) is not None  # a good step: Adam state now exists
    before = snapshot()
    skipped = train_step(eng, batch, step=1, micro=0, poison=True)
    after_skip = snapshot()
    stepped = train_step(eng, batch, step=1, micro=0)
    after_step = snapshot()
    out["skipped_is_none"] = skipped is None
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True))
    out["changed_after_good_step"] = stepped is not None and not all(
        torch.equal(a, b) for a, b in zip(before, after_step, strict=True)
    )
    engine.shutdown()


def test_nonfinite_step_changes_no_weight_and_no_optimizer_state():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_skip_worker, args=(out,), nprocs=1, join=True)
        out = dict(out)
    assert out == {"skipped_is_none": True, "unchanged": True, "changed_after_good_step": True}


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run_when_consecutive(demo_shards, tmp_path):
    run_dir = tmp_path / "nan"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
            f"data.train_shards={demo_shards}/train", "data.eval_shards=", "data.num_workers=0",
            "optim.micro_batch_size=8", "train.steps=8", "train.log_every=1",
            "train.inject_nonfinite_at=[3,6,7]", "train.max_bad_steps=2",
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "2 consecutive non-finite losses at step 5 (train.max_bad_steps=2)" in proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # attempts 1, 2 -> steps 1, 2; attempt 3 skipped; 4, 5 -> steps 3, 4; 6 and 7 skipped -> stop
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reached the weights or the logs


@pytest.mark.distributed
def test_kill_during_checkpoint_save_resumes_from_a_complete_checkpoint(demo_shards, tmp_path):
    """2 ranks checkpoint every step; the moment a new checkpoint folder appears (a save under way), the
    whole job is killed with SIGKILL. `latest` must still name a complete checkpoint, and resuming
    from it must work."""
    run_dir = tmp_path / "kill"
    common = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny", "--nproc", "2", "--run-dir", str(run_dir),
        f"data.train_shards={demo_shards}/train", "data.eval_shards=", "data.num_workers=0",
        "optim.micro_batch_size=8", "train.ckpt_every=1", "train.keep_last=2", "train.log_every=1",
    ]  # fmt: skip
    job = subprocess.Popen(
        [*common, "train.steps=500"], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpt = run_dir / "checkpoints"
    deadline = time.time() + 300
    caught_mid_save = False
    try:
        while time.time() < deadline:
            latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else ""
            tags = sorted(p.name for p in ckpt.glob("step_*")) if ckpt.is_dir() else []
            if latest >= "step_00000003" and tags and tags[-1] > latest:
                caught_mid_save = True  # a newer folder than `latest`: its save is under way
                break
            if latest >= "step_00000012":
                time.sleep(random.random() * 0.2)  # give up aiming: kill at a random moment
                break
            time.sleep(0.005)
        else:
            pytest.fail("training never wrote its checkpoints")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    good = (ckpt / "latest").read_text().strip()
    step = int(good.removeprefix("step_"))
    assert (ckpt / good / "mmssl.json").is_file()  # written after every rank finished its part
    assert len(list(ckpt.glob("step_*"))) <= 3  # keep_last=2, plus at most the one being written
    resumed = subprocess.run(
        [*common, f"train.steps={step + 2}", "--resume", "latest"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step + 2
    print(f"killed {'during a save' if caught_mid_save else 'at a random moment'}; resumed from {good}")
