"""Starting a run's ranks, and what the first process settles before it does: the one place where any
command starts ranks (:func:`launch_ranks`: DeepSpeed's runner, on this machine or on other nodes), the
checkpoint a ``--resume`` continues from (converted when the number of ranks changed), and the exit
code of a run whose final evaluation failed. Plain values in: parsing the command line is ``mmssl.cli``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mmssl.config import RunConfig, load_json, save_json, url_credentials

CREDENTIALS_ENV = "MMSSL_URL_CREDENTIALS"  # launcher -> ranks: what config.json masks (see url_credentials)


def launched_by_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def run_training(cfg: RunConfig, *, resume: str | None) -> dict:
    """Train ``cfg`` in this process (one rank, or a launched one): pretraining, or fine-tuning when the
    config has a finetune section. Returns the summary."""
    if cfg.finetune is not None:
        from mmssl.finetune_run import finetune

        return finetune(cfg, resume=resume)
    from mmssl.train import train

    return train(cfg, resume=resume)


def launch_run(
    cfg: RunConfig, *, nproc: int, resume: str | None, where: list[str] | None = None, port: int | None = None
) -> int:
    """Write the run's config.json and start its ranks (``mmssl train --config`` on each); the exit code."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "config.json")  # every node's launcher writes the same one, atomically
    env = {CREDENTIALS_ENV: json.dumps(credentials)} if (credentials := url_credentials(cfg)) else {}
    command = ["train", "--config", str(run_dir / "config.json")] + (["--resume", resume] if resume else [])
    started = time.time()
    code = launch_ranks(command, nproc=nproc, where=where, port=port, env=env)
    return code or eval_exit_code(run_dir / "summary.json", since=started)


# The exit code of a run that trained (checkpoints and summary.json written) but whose evaluation at
# the end failed; rank 0 has said why in one line. 2 stays for mistakes found before anything ran.
EVAL_FAILED = 3


def eval_exit_code(summary_path: Path, *, since: float) -> int:
    """EVAL_FAILED when this run's summary (written after ``since``) records a failed evaluation. The
    ranks themselves exit 0 then: a rank exiting non-zero makes the launcher kill the others and log
    its own error line."""
    try:
        fresh = summary_path.stat().st_mtime >= since - 1.0  # file clocks are coarser than time.time()
        if fresh and "eval_error" in json.loads(summary_path.read_text()):
            return EVAL_FAILED
    except (OSError, ValueError):  # no summary on this node (multi-node without a shared run dir)
        pass
    return 0


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resume_tag(resume: str, ckpt_dir: Path, world: int | None, cfg: RunConfig) -> str:
    """The checkpoint tag to resume from. A checkpoint written by another number of ranks is converted
    to DeepSpeed's universal format first, and the run loads it as such (the step count is kept; the
    data stream cannot continue exactly and reseeds, with a warning)."""
    from mmssl import ds_checkpoint

    if not (ckpt_dir / "latest").is_file():
        raise ValueError(f"--resume {resume}: {ckpt_dir} holds no checkpoint")
    tag = ds_checkpoint.latest_tag(ckpt_dir) if resume == "latest" else resume
    if not (ckpt_dir / tag).is_dir():
        raise ValueError(f"--resume {resume}: there is no checkpoint {ckpt_dir / tag}")
    check_same_head(cfg, ckpt_dir.parent / "config.json")
    saved = ds_checkpoint.saved_world_size(ckpt_dir, tag)
    if tag.endswith("_universal"):
        cfg.engine.load_universal = True
    elif world and saved and saved != world:
        print(f"mmssl: {tag} was written by {saved} ranks and this run has {world}: converting it to a "
              "universal checkpoint", file=sys.stderr)  # fmt: skip
        tag = ds_checkpoint.to_universal(ckpt_dir, tag)
        cfg.engine.load_universal = True
    return tag


def check_same_head(cfg: RunConfig, saved: Path) -> None:
    """A resumed run must build the parameters its checkpoint holds: a native text tower saved untied
    (before ``objectives.masked_text.tie_head`` existed, or with it false) cannot resume tied, nor the
    reverse. A Hugging Face tower's head is its model's, tied as the model is: there tie_head changes no
    parameter (and a run saved before it had to agree with the model may say otherwise)."""
    if not saved.is_file():
        return
    before, now = load_json(saved).objectives.masked_text, cfg.objectives.masked_text
    native = cfg.model.text is not None and cfg.model.text.kind == "native"
    if native and before.enabled and now.enabled and before.tie_head != now.tie_head:
        raise ValueError(
            f"--resume: {saved} trained with objectives.masked_text.tie_head={str(before.tie_head).lower()}: "
            f"set it so (or resume with --config {saved})"
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_ranks(
    command: list[str],
    *,
    nproc: int,
    where: list[str] | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``mmssl <command>`` on ranks: the one place where any command starts them. DeepSpeed's runner
    starts them, as it also reaches other nodes (``where``: its hostfile, node rank and master address;
    default ``nproc`` ranks on this machine). Each rank learns its rank, the world size and its master
    from the environment (``launched_by_launcher``); ``env`` adds to it. Returns the exit code of the
    first rank that failed, else 0."""
    from mmssl import ranks
    from mmssl.ds_config import name_cpu_accelerator

    env = {**os.environ, **(env or {})}
    name_cpu_accelerator(env)  # for the runner and the ranks it starts
    if not _has_cuda():  # share the cores between the CPU ranks instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    port = port or ranks.free_port()
    argv = [
        sys.executable, "-m", "deepspeed.launcher.runner", *(where or ["--num_gpus", str(nproc)]),
        "--master_port", str(port),
        "--no_local_rank", "--log_level", "warning",
        "--module", "mmssl.cli", *command,
    ]  # fmt: skip
    try:
        return subprocess.run(argv, env=env).returncode
    finally:
        ranks.remove_shm_buffers(port)


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N``: a launched rank is one of them already."""
    out, skip = [], False
    for arg in argv:
        if not skip and arg != "--nproc" and not arg.startswith("--nproc="):
            out.append(arg)
        skip = arg == "--nproc"
    return out
