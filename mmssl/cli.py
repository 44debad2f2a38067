"""The ONLY command-line parser. ``mmssl train | eval | demo-data``.

Everything a run needs is checked here, in the first process, before any worker starts: preset
names, dotted overrides, config values, shard paths and the DeepSpeed batch identity. A mistake ends
the command with one line naming the value at fault (exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from mmssl.config import RunConfig, apply_overrides, load_json, save_json
from mmssl.presets import PRESETS, get_preset


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a mistake in what the user gave (a config value, a path) into one line and exit code 2.
    Only the checks run inside; errors raised while training keep their traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        print(f"mmssl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def build_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_json(args.config) if args.config else get_preset(args.preset)
    apply_overrides(cfg, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    return cfg.validate()


def launched_by_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def cmd_train(args: argparse.Namespace) -> int:
    from mmssl import data, engine

    if launched_by_launcher():  # a worker: the first process has checked everything already
        from mmssl.train import train

        train(build_config(args), resume=args.resume)
        return 0
    with user_errors():
        cfg = build_config(args)
        data.check_shards(cfg)
        engine.resolve_ds_config(cfg, world_size=args.nproc)
        run_dir = Path(cfg.run_dir)
        if args.resume and not (run_dir / "checkpoints" / "latest").is_file():
            raise ValueError(f"--resume {args.resume}: {run_dir / 'checkpoints'} holds no checkpoint")
    if args.nproc == 1:
        from mmssl.train import train

        train(cfg, resume=args.resume)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg, run_dir / "config.json")
    env = dict(os.environ)
    if not _has_cuda():  # share the cores between the CPU ranks instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(args.nproc),
        "--master_port", str(engine.free_port()),
        "--no_local_rank", "--log_level", "warning",
        "--module", "mmssl.cli", "train", "--config", str(run_dir / "config.json"),
    ]  # fmt: skip
    if args.resume:
        command += ["--resume", args.resume]
    return subprocess.run(command, env=env).returncode


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from mmssl import checkpoint, data, evaluate

    with user_errors():
        model, cfg, run_dir = checkpoint.load_model(args.checkpoint)
        apply_overrides(cfg, args.overrides)
        if args.data:
            cfg.data.eval_shards = args.data
        if not cfg.data.eval_shards:
            raise ValueError("no evaluation data: pass --data SHARDS")
        data.check_shards(cfg)
        cfg.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluate.run_eval(model.to(device), cfg, Path(args.out or run_dir), device=device)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from data_pipelines.demo import build_spoken_digits

    try:
        summary = build_spoken_digits(args.out, limit=args.limit, seed=args.seed)
    except RuntimeError as e:  # espeak-ng missing: the builder says how to install it
        print(f"mmssl: error: {e}", file=sys.stderr)
        return 2
    print(_format_demo_summary(summary, args.out))
    return 0


def _format_demo_summary(summary: dict, out: str) -> str:
    splits = ", ".join(
        f"{name} {s['samples']} samples ({s['pattern']})" for name, s in summary["splits"].items()
    )
    reused = " (already built: reused)" if summary.get("skipped") else ""
    return f"spoken digits in {out}{reused}: {splits}; {summary.get('seconds', 0):.0f} s"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmssl", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (on N local ranks with --nproc)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help=f"named run: {', '.join(PRESETS)} (default tiny)")
    src.add_argument("--config", help="a config.json written by an earlier run")
    t.add_argument("--nproc", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    t.add_argument("--run-dir", help="where config, logs, checkpoints and reports go")
    t.add_argument("--resume", help="'latest' or a checkpoint tag in RUN_DIR/checkpoints")
    t.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=3e-4"
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="retrieval recall for every modality pair on held-out shards")
    e.add_argument("checkpoint", help="a run directory, its checkpoints/ folder or one checkpoint in it")
    e.add_argument("--data", help="evaluation shards (default: the run's data.eval_shards)")
    e.add_argument("--out", help="where eval.json and eval.html go (default: the run directory)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.match=pair")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo-data", help="build the spoken-digits demo shards (images, captions, speech)")
    d.add_argument("--out", default="data/demo")
    d.add_argument("--limit", type=int, default=None, help="use only this many digit images")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "nproc", 1) < 1:
        print("mmssl: error: --nproc must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
