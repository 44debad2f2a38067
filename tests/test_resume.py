"""Exact resume through the trainer: a run killed (SIGKILL, one rank) and resumed from its latest
checkpoint trains on exactly the samples, and reaches exactly the losses, of an uninterrupted run; with
self-distillation on, its EMA teacher too (restored from the checkpoint, then updated alike); under
cached accumulation too (the 1-rank case)."""

import contextlib
import functools
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 10


def command(run_dir: Path, shards: Path | str, nproc: int, workers: int, *extra: str) -> list[str]:
    train = shards if isinstance(shards, str) else f"{shards}/train"
    return [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny_masked", "--nproc", str(nproc),
        "--run-dir", str(run_dir), f"data.train_shards={train}", "data.eval_shards=",
        f"data.num_workers={workers}", "data.shuffle_buffer=50", "optim.micro_batch_size=8",
        "train.log_every=1", "train.ckpt_every=2", "train.record_keys=true", f"train.steps={STEPS}", *extra,
    ]  # fmt: skip


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs again the steps it redoes)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def consumed(run_dir: Path, rank: int) -> list[str]:
    """Keys a rank trained on, in order, dropping what a killed run did after its last checkpoint."""
    keys: list[tuple[int, list[str]]] = []
    for line in (run_dir / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "resumed_at" in row:
            keys = [(step, k) for step, k in keys if step <= row["resumed_at"]]
        else:
            keys.append((row["step"], row["keys"]))
    return [key for _, k in keys for key in k]


def rank_pid(run_dir: Path, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"{run_dir}/config.json" in cmdline
            and f"RANK={rank}".encode() in environ
            and "-m mmssl.cli" in cmdline
        ):
            return int(pid)
    return None


@contextlib.contextmanager
def http_shards(folder: Path) -> Iterator[str]:
    """``folder``'s shards served by a plain HTTP server on 127.0.0.1 for the duration: their spec, a brace
    list of URLs (a remote spec cannot be globbed)."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    names = sorted(p.name for p in folder.glob("*.tar"))
    listed = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{listed}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# One rank reads its shards over HTTP (the streamed reader's resume: reopen the shard, skip what was
# taken) and trains in cached accumulation windows of 2 micro-batches of 4, with an image view
# objective (each step is one window: both passes of it, its view loss over the window); two ranks with
# two loader workers read local files (the indexed reader's). The 2-rank runs are made once (a fixture)
# as the universal-checkpoint test starts from their last checkpoint.
CACHED = (
    "optim.micro_batch_size=4", "optim.grad_accum_steps=2", "objectives.contrastive.accumulate=cached",
    "objectives.views.image.enabled=true",
)  # fmt: skip


@pytest.mark.parametrize(
    "nproc, workers, where", [(1, 0, "http"), pytest.param(2, 2, "local", marks=pytest.mark.distributed)]
)
def test_kill_one_rank_and_resume_exactly(demo_shards, tmp_path, request, nproc, workers, where):
    if where == "local":
        runs = request.getfixturevalue("two_rank_kill")
    else:
        with http_shards(demo_shards / "train") as shards:
            runs = kill_and_resume(shards, tmp_path, nproc, workers, CACHED)
    check_exact(**runs, nproc=nproc)


DISTILL = ("objectives.distill.enabled=true",)  # the masked objectives' pass carries it: no extra pass


@pytest.fixture(scope="module")
def two_rank_kill(demo_shards, tmp_path_factory) -> dict:
    return kill_and_resume(demo_shards, tmp_path_factory.mktemp("kill2"), 2, 2)


def kill_and_resume(
    demo_shards: Path | str, tmp_path: Path, nproc: int, workers: int, extra: tuple[str, ...] = ()
) -> dict:
    """An uninterrupted run, and a run killed (one rank) at a random step and resumed from its latest
    checkpoint; their folders, whether the kill came before the end, and the step resumed from."""
    reference = tmp_path / "reference"
    run(command(reference, demo_shards, nproc, workers, *DISTILL, *extra))

    faulty = tmp_path / "faulty"
    job = subprocess.Popen(
        command(faulty, demo_shards, nproc, workers, *DISTILL, *extra), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    kill_after = random.randint(3, STEPS - 3)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if (faulty / "metrics.jsonl").is_file() and len(losses(faulty)) >= kill_after:
            # one rank trains inside the `mmssl train` process itself; more go through DeepSpeed's launcher
            pid = rank_pid(faulty, nproc - 1) if nproc > 1 else job.pid
            if pid:
                os.kill(pid, signal.SIGKILL)  # one rank dies; the launcher takes the others down
                break
        time.sleep(0.02)
    try:
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    killed = job.returncode != 0
    resumed_from = int((faulty / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    if killed and 0 < resumed_from < STEPS:
        run([*command(faulty, demo_shards, nproc, workers, *DISTILL, *extra), "--resume", "latest"])
    return {"reference": reference, "faulty": faulty, "killed": killed, "resumed_from": resumed_from}


def check_exact(*, reference: Path, faulty: Path, killed: bool, resumed_from: int, nproc: int) -> None:
    assert killed, "the job finished before it could be killed"
    assert 0 < resumed_from < STEPS
    want, got = losses(reference), losses(faulty)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, resumed_from)
    from mmssl.ds_checkpoint import saved_teacher

    ours, theirs = (saved_teacher(r / "checkpoints") for r in (faulty, reference))
    assert sorted(ours) == sorted(theirs) and any(k.startswith("image.") for k in ours)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-7, msg=name)
    for rank in range(nproc):
        ours, theirs = consumed(faulty, rank), consumed(reference, rank)
        assert ours == theirs, f"rank {rank}: resumed from step {resumed_from}"
        assert len(ours) == STEPS * 8 and all(k.startswith("train_") for k in ours)


@pytest.mark.distributed
def test_resume_on_fewer_ranks_through_a_universal_checkpoint(two_rank_kill, demo_shards, tmp_path):
    """2 ranks -> 1 rank: the checkpoint is converted to DeepSpeed's universal format and training
    continues from its step with the weights and optimizer state it had. It starts from a copy of the
    2-rank run above, finished at step STEPS."""
    run_dir, done = tmp_path / "shrink", two_rank_kill["faulty"]
    latest = (done / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:08d}"
    shutil.copytree(done / "checkpoints" / latest, run_dir / "checkpoints" / latest)
    shutil.copy(done / "checkpoints" / "latest", run_dir / "checkpoints" / "latest")
    shutil.copy(done / "metrics.jsonl", run_dir / "metrics.jsonl")
    before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    more = f"train.steps={STEPS + 2}"
    proc = subprocess.run(
        [*command(run_dir, demo_shards, 1, 0, more, "train.record_keys=false", *DISTILL), "--resume", "latest"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 2 ranks and this run has 1: converting it to a universal checkpoint" in proc.stderr
    assert (run_dir / "checkpoints" / f"{latest}_universal").is_dir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[before:]] == [STEPS + 1, STEPS + 2]  # from step STEPS on, not from 0
    last = run_dir / "checkpoints" / f"step_{STEPS + 2:08d}" / "mmssl.json"
    assert json.loads(last.read_text())["world_size"] == 1
