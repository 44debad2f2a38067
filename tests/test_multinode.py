"""Multi-node launch as SLURM runs it: one `mmssl train --nnodes 2 --node-rank r` per node, no ssh.

Both "nodes" are this machine (one rank each, rendezvous over TCP on 127.0.0.1): the two launchers
must agree on the world (2 ranks), train together, and write one checkpoint with both ranks' parts.
The ssh fan-out of a hostfile (`--hostfile`) is DeepSpeed's pdsh runner; here its command line is
checked, since this machine runs no ssh server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import synthetic_samples, write_shards
from mmssl import cli, launch, ranks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_two_nodes_one_rank_each_train_as_one_world(tmp_path):
    train = write_shards(synthetic_samples(64, seed=1, image_size=32), tmp_path / "train", max_count=16)
    run_dir, port = tmp_path / "run", ranks.free_port()
    common = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
        "--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
        f"data.train_shards={train['pattern']}", "train.steps=4", "train.log_every=2", "train.ckpt_every=4",
        "optim.micro_batch_size=8", "train.eval_at_end=false", "data.num_workers=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen([*common, "--node-rank", str(r)], cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in (0, 1)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert "2 rank(s)" in outputs[0]  # node 0 holds rank 0, which reports
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # both ranks wrote their partition
    assert (run_dir / "hostfile.2x1").read_text() == "node-0 slots=1\nnode-1 slots=1\n"


def test_launch_commands_for_a_hostfile_and_for_slurm(monkeypatch, tmp_path):
    """What `mmssl train` hands DeepSpeed's runner: a hostfile (ssh fan-out from this node) or, per
    node, a generated hostfile with --no_ssh and the node's rank."""
    from mmssl import data

    commands = []

    def run(command, env):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch.subprocess, "run", run)
    monkeypatch.setattr(data, "check_shards", lambda cfg: None)  # no shards needed to build commands
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    base = ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "data.train_shards=x"]
    assert cli.main([*base, "--hostfile", str(hostfile), "--master-addr", "gpu-a"]) == 0
    assert ["--hostfile", str(hostfile), "--master_addr", "gpu-a"] == commands[0][3:7]
    assert cli.main([*base, "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
                     "--master-addr", "10.0.0.1", "--master-port", "29500"]) == 0  # fmt: skip
    runner = commands[1]
    assert runner[runner.index("--node_rank") + 1] == "1" and "--no_ssh" in runner
    assert runner[runner.index("--master_port") + 1] == "29500"
    assert (tmp_path / "run" / "hostfile.2x8").read_text() == "node-0 slots=8\nnode-1 slots=8\n"
    with pytest.raises(SystemExit):  # several nodes must agree on the rendezvous: named, not guessed
        cli.main([*base, "--nproc", "8", "--nnodes", "2", "--node-rank", "1"])
