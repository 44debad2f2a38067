"""A run as a batch job sees it (stdout and stderr are files, not a terminal): plain log lines, no start-up
noise, and an evaluation after training that fails cleanly on every rank."""

import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipelines import synthetic_samples, write_shards
from mmssl import launch, runlog, train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_batch_run_logs_plain_lines_and_a_failed_final_eval_keeps_the_run(tmp_path):
    """2 ranks, 3 steps; the eval shards hold only undecodable images, so the evaluation after training
    finds no sample. Checked in one launch: plain step lines and the summary (no carriage return, no
    DeepSpeed accelerator or open_clip gather warnings), then one error line with a working retry
    command, exit code 3, no traceback on any rank, summary.json with the training figures, and the
    checkpoint kept."""
    shards = write_shards(synthetic_samples(32, seed=1, image_size=32), tmp_path / "train", max_count=16)
    bad = [{"__key__": f"b{i}", "png": b"not a png", "txt": "x"} for i in range(4)]
    bad_eval = write_shards(bad, tmp_path / "eval{}", max_count=2)  # a brace in the path: quoting
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny", "--nproc", "2", "--run-dir", str(run_dir),
        f"data.train_shards={shards['pattern']}", f"data.eval_shards={bad_eval['pattern']}",
        "train.steps=3", "train.log_every=1", "optim.micro_batch_size=8", "optim.warmup_steps=1",
        "data.num_workers=0",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == launch.EVAL_FAILED, out[-3000:] + err[-3000:]

    # the log of a batch job: one plain line per logged step, the summary, and nothing redrawn
    assert "\r" not in out + err
    steps = [line for line in out.splitlines() if line.startswith("step ") and "/3, loss " in line]
    assert [line.split(",")[0] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(
        "samples/s" in line and "MFU" in line and "data wait" in line and "ETA" in line for line in steps
    )
    assert "done: 3 steps on 2 rank(s)" in out
    assert "WARNING data_pipelines: skipped sample 'b0'" in out  # bad-data reports are plain lines too
    for noise in ("Setting accelerator to CPU", "all_gather is deprecated", "No CUDA runtime is found"):
        assert noise not in out + err

    # the failed evaluation: one line naming the cause, the shards and the retry command; no traceback
    assert "Traceback" not in out + err and "Connection closed" not in err
    errors = [line for line in err.splitlines() if line.startswith("mmssl: error:")]
    assert len(errors) == 1, err
    assert "holds no samples" in errors[0] and bad_eval["pattern"] in errors[0]
    retry = shlex.split(errors[0].split("retry with: ", 1)[1])
    assert retry == ["mmssl", "eval", str(run_dir), "--data", bad_eval["pattern"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] > 0 and "holds no samples" in summary["eval_error"]
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def plain_log(run_dir, *, peak_flops: float) -> runlog.RunLog:
    """A run log of 100 steps writing plain lines (as off a terminal), 8 samples per step on 1 rank."""
    throughput = runlog.Throughput(samples_per_step=8, world_size=1, peak_flops=peak_flops)
    return runlog.RunLog(
        run_dir, enabled=True, total_steps=100, start_step=0, throughput=throughput, interactive=False
    )


def test_plain_log_lines_off_a_terminal(tmp_path, capsys):
    log = plain_log(tmp_path, peak_flops=1e9)
    time.sleep(0.01)
    log.advance()
    log.log(1, {"loss": 2.5, "data_wait_seconds": 0.0, "flops_done": 1e6})
    log.write("step 1: checkpoint x")
    log.close()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("step 1/100, loss 2.5000, ") and "MFU" in lines[0] and "ETA" in lines[0]
    assert lines[1] == "step 1: checkpoint x"
    assert "\r" not in captured.out + captured.err


def test_mfu_above_the_peak_is_flagged_not_shown(tmp_path, capsys):
    """An MFU over 100% means the peak read low (a CPU probe timed under load): the line shows >100%,
    one warning says why and how to probe again, and metrics.jsonl keeps the ratio."""
    log = plain_log(tmp_path, peak_flops=1.0)
    for step in (1, 2):
        time.sleep(0.01)
        log.advance()
        log.log(step, {"loss": 2.5, "data_wait_seconds": 0.0, "flops_done": 1e6})
    log.close()
    out = capsys.readouterr().out
    assert out.count("warning: MFU") == 1 and "read low" in out and "cpu_peak.json" in out
    assert out.count("MFU >100%,") == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(row["mfu"] > 1 for row in rows)


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    bar = io.StringIO()
    monkeypatch.setattr(sys, "stderr", bar)
    log = runlog.RunLog(
        tmp_path,
        enabled=True,
        total_steps=10,
        start_step=0,
        throughput=runlog.Throughput(samples_per_step=8, world_size=1, peak_flops=None),
        interactive=True,
    )
    log.advance()
    log.log(1, {"loss": 2.5, "data_wait_seconds": 0.0})
    log.close()
    assert "\r" in bar.getvalue() and "1/10" in bar.getvalue()


def test_durations():
    assert [runlog.duration(s) for s in (4.4, 185, 7620)] == ["4s", "3m05s", "2h07m"]


def test_eval_exit_code_reads_only_this_runs_summary(tmp_path):
    path = tmp_path / "summary.json"
    assert launch.eval_exit_code(path, since=time.time()) == 0  # no summary (another node)
    path.write_text(json.dumps({"steps": 3, "eval_error": "x"}))
    assert launch.eval_exit_code(path, since=time.time() - 5) == launch.EVAL_FAILED
    assert launch.eval_exit_code(path, since=time.time() + 60) == 0  # an earlier run's summary
    path.write_text(json.dumps({"steps": 3}))
    assert launch.eval_exit_code(path, since=time.time() - 5) == 0


def test_eval_failure_line_quotes_the_retry_command():
    from mmssl.presets import get_preset

    cfg = get_preset("tiny")
    cfg.run_dir, cfg.data.eval_shards = "/runs/my run", "/data/test-{000000..000003}.tar"
    line = train.eval_failure_line("the evaluation data holds no samples", cfg)
    assert "\n" not in line and line.startswith("mmssl: error: ")
    assert shlex.split(line.split("retry with: ")[1]) == [
        "mmssl",
        "eval",
        "/runs/my run",
        "--data",
        cfg.data.eval_shards,
    ]
