"""Faults the trainer must survive: non-finite losses and a kill -9 in the middle of a checkpoint save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from batches import padded_batch
from gloo_pool import mmssl_rank

REPO = Path(__file__).resolve().parents[1]


def _skip_worker(rank: int, world: int) -> dict:
    from mmssl import engine
    from mmssl.presets import get_preset
    from mmssl.task import Task
    from mmssl.train import train_step

    cfg = get_preset("tiny")
    info = engine.init_distributed()  # the pool's one-rank group
    eng = engine.Engine(Task(cfg), cfg, info)
    batch = padded_batch(cfg, 4, eot=5, vocab=4000)

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
    return {
        "skipped_is_none": skipped is None,
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True)),
        "changed_after_good_step": stepped is not None
        and not all(torch.equal(a, b) for a, b in zip(before, after_step, strict=True)),
    }


def test_nonfinite_step_changes_no_weight_and_no_optimizer_state(gloo):
    (out,) = gloo(1).run(_skip_worker)
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
def test_kill_during_checkpoint_save_resumes_from_a_complete_checkpoint(gloo, demo_shards, tmp_path):
    """2 ranks checkpoint every step. A fault drill (``MMSSL_FAULT_HOLD_SAVE_AT``) holds the save of step
    3 open after every rank wrote its part of it and before ``latest`` moves; once both ranks say so,
    the whole job is killed with SIGKILL. `latest` must still name a complete checkpoint (step 2), and
    resuming from it on 2 ranks must work."""
    from mmssl.ds_checkpoint import HOLD_SAVE_ENV

    run_dir = tmp_path / "kill"
    common = [
        "train", "--preset", "tiny", "--run-dir", str(run_dir),
        f"data.train_shards={demo_shards}/train", "data.eval_shards=", "data.num_workers=0",
        "optim.micro_batch_size=8", "train.ckpt_every=1", "train.keep_last=2", "train.log_every=1",
    ]  # fmt: skip
    job = subprocess.Popen(
        [sys.executable, "-m", "mmssl.cli", *common, "--nproc", "2", "train.steps=500"], cwd=REPO,
        start_new_session=True, env={**os.environ, HOLD_SAVE_ENV: "3"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpt = run_dir / "checkpoints"
    held = [ckpt / "step_00000003" / f"held_rank{rank}" for rank in range(2)]
    deadline = time.time() + 300
    try:
        while not all(marker.is_file() for marker in held):
            if job.poll() is not None or time.time() > deadline:
                pytest.fail(f"the save of step 3 was never held (job exit code {job.poll()})")
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    # the kill landed inside the save: step 3's parts are written, but `latest` never moved to it
    assert len(list((ckpt / "step_00000003").glob("*optim_states.pt"))) == 2  # one part per rank
    assert not (ckpt / "step_00000003" / "mmssl.json").is_file()
    good = (ckpt / "latest").read_text().strip()
    assert good == "step_00000002"
    assert (ckpt / good / "mmssl.json").is_file()  # written after every rank finished its part
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001", "step_00000002", "step_00000003"]
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
    # resumed on 2 ranks as launched ranks run it (the session's gloo ranks: no second launch to pay)
    gloo(2).run(mmssl_rank, [*common, "train.steps=4", "--resume", "latest"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[logged:]] == [3, 4]  # from step 2's checkpoint on, not from 0
    # the resumed run wrote step 3 again, whole, and `latest` names the newest complete checkpoint
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert (ckpt / "step_00000003" / "mmssl.json").is_file()
