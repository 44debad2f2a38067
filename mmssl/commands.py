"""The bodies of the ``mmssl`` commands: ``cmd_<command>``, each given the arguments ``mmssl.cli`` (the
one argument parser) parsed. Everything a run needs is checked here, in the first process, before any
worker starts: preset names, dotted overrides, config values, shard paths and the DeepSpeed batch
identity; a mistake ends the command with one line naming it (:func:`user_errors`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipelines.remote import mask
from mmssl.config import RunConfig, apply_overrides, load_json
from mmssl.launch import (
    CREDENTIALS_ENV,
    EVAL_FAILED,
    launch_ranks,
    launch_run,
    launched_by_launcher,
    resume_tag,
    run_training,
    without_nproc,
    write_atomically,
)
from mmssl.presets import get_preset

if TYPE_CHECKING:
    import argparse


@contextlib.contextmanager
def user_errors(*, show: bool = True) -> Iterator[None]:
    """Turn a mistake in what the user gave (a config value, a path) into one line (``show``: on this
    rank) and exit code 2. Only the checks run inside; errors raised while training keep their traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if show:
            print(f"mmssl: error: {mask(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None


def build_config(args: argparse.Namespace) -> RunConfig:
    # a launched rank gets the shard URLs' credentials, masked in config.json, from its launcher
    credentials = json.loads(os.environ.get(CREDENTIALS_ENV, "{}"))
    cfg = load_json(args.config, credentials) if args.config else get_preset(args.preset)
    apply_overrides(cfg, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from mmssl import data, ds_config, pretrained
    from mmssl.encoders import check_towers

    if launched_by_launcher():  # a worker: the first process has checked everything already
        run_training(build_config(args), resume=args.resume)
        return 0
    world = None if args.hostfile else args.nproc * args.nnodes  # with a hostfile its slots decide
    with user_errors():
        if args.nnodes > 1 and not (args.master_addr and args.master_port):
            raise ValueError(
                "--nnodes > 1 needs --master-addr and --master-port: the first node's address and a port "
                "every node agrees on"
            )
        if not 0 <= args.node_rank < args.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes={args.nnodes}), got {args.node_rank}")
        cfg = build_config(args)
        check_towers(cfg)  # timm / Hugging Face towers: installed, named right, buildable
        data.check_shards(cfg)
        if world:
            ds_config.resolve_ds_config(cfg, world_size=world)
        run_dir = Path(cfg.run_dir)
        resume = args.resume and resume_tag(args.resume, run_dir / "checkpoints", world, cfg)
        if not resume:  # a resumed run's checkpoint holds every weight
            pretrained.check(cfg)
    if world == 1:
        return EVAL_FAILED if "eval_error" in run_training(cfg, resume=resume) else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.hostfile:  # several nodes, started from this one over ssh
        where = ["--hostfile", args.hostfile] + (
            ["--master_addr", args.master_addr] if args.master_addr else []
        )
    elif args.nnodes > 1:  # one launcher per node (SLURM's srun), no ssh: DeepSpeed still wants a
        # hostfile to know every node's slots; its names are never contacted
        hostfile = run_dir / f"hostfile.{args.nnodes}x{args.nproc}"
        write_atomically(hostfile, "".join(f"node-{i} slots={args.nproc}\n" for i in range(args.nnodes)))
        where = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(args.node_rank),
                 "--master_addr", args.master_addr]  # fmt: skip
    else:
        where = None
    return launch_run(cfg, nproc=args.nproc, resume=resume, where=where, port=args.master_port)


def cmd_finetune(args: argparse.Namespace) -> int:
    from mmssl import data, ds_config, pretrained
    from mmssl.finetune_run import finetune_config

    with user_errors():
        _check_shards(args.data, "--data")
        if args.eval_data:
            _check_shards(args.eval_data, "--eval-data")
        cfg = finetune_config(
            args.run, shards=args.data, tower=args.tower, eval_shards=args.eval_data or "",
            linear=args.linear, run_dir=args.run_dir, overrides=args.overrides,
        )  # fmt: skip
        data.check_shards(cfg)
        ds_config.resolve_ds_config(cfg, world_size=args.nproc)
        run_dir = Path(cfg.run_dir)
        resume = args.resume and resume_tag(args.resume, run_dir / "checkpoints", args.nproc, cfg)
        if not resume:  # a resumed run's checkpoint holds every weight
            pretrained.check(cfg)
    if args.nproc == 1:
        return EVAL_FAILED if "eval_error" in run_training(cfg, resume=resume) else 0
    return launch_run(cfg, nproc=args.nproc, resume=resume)


def _check_shards(spec: str, what: str) -> None:
    """Raise naming ``what`` when ``spec`` names no shard."""
    from data_pipelines import expand_shards

    try:
        expand_shards(spec)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None


def eval_setup(args: argparse.Namespace):
    """Everything ``eval`` needs that can be wrong, checked before any weight is read or rank started."""
    from mmssl import checkpoint, data
    from mmssl.eval import run, zeroshot

    cfg, run_dir = checkpoint.find_config(args.checkpoint)
    apply_overrides(cfg, args.overrides)
    cfg.eval.validate()
    cfg.data.eval_shards = args.data or cfg.data.eval_shards
    if not cfg.data.eval_shards:
        raise ValueError("no evaluation data: pass --data SHARDS")
    what = "--data" if args.data else "data.eval_shards"
    _check_shards(cfg.data.eval_shards, what)
    layout = cfg.data.eval_layout_name()  # data.eval_layout, else the run's training layout
    try:
        data.check_layout(data.stream_config(cfg, train=False))
    except ValueError as e:
        raise ValueError(f"{what} (layout {layout}): {e}") from None
    probe, probe_layout = None, None
    if args.probe_data and not args.no_probe:
        _check_shards(args.probe_data, "--probe-data")
        probe = args.probe_data
    elif not args.no_probe and cfg.data.train_shards:
        with contextlib.suppress(ValueError):  # the run's train split, when it is still there
            _check_shards(cfg.data.train_shards, "data.train_shards")
            probe, probe_layout = cfg.data.train_shards, cfg.data.layout
    templates = zeroshot.DEFAULT_TEMPLATES
    if args.templates:
        templates = zeroshot.check_templates(tuple(zeroshot.read_list(args.templates)))
    plan = run.EvalPlan(
        probe_shards=probe,
        probe_layout=probe_layout,
        classes=zeroshot.read_list(args.classes) if args.classes else None,
        templates=templates,
        zeroshot=not args.no_zeroshot,
        metrics=run_dir / "metrics.jsonl",
    )
    return cfg, plan, Path(args.out or run_dir)


def cmd_eval(args: argparse.Namespace) -> int:
    worker = launched_by_launcher()
    with user_errors():
        finetuned = checkpoint_is_finetuned(args.checkpoint)
    if finetuned:
        if args.nproc > 1 and not worker:  # a classifier's forward over the held-out split: one process
            print(f"mmssl eval: a fine-tuned run evaluates in one process (--nproc {args.nproc} is not used)",
                  file=sys.stderr, flush=True)  # fmt: skip
        return eval_finetuned(args)
    with user_errors():
        cfg, plan, out = eval_setup(args)
    if args.nproc > 1 and not worker:
        return launch_ranks(without_nproc(args.argv), nproc=args.nproc)

    from mmssl import checkpoint, engine, ranks
    from mmssl.eval.run import run_eval
    from mmssl.runlog import on_terminal

    rank, world_size = 0, 1
    if worker:
        info = engine.init_distributed()
        rank, world_size, device = info.rank, info.world_size, info.device
    else:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with user_errors():
        model = checkpoint.load(args.checkpoint).model
    if rank == 0:
        where = f"{mask(cfg.data.eval_shards)} (layout {cfg.data.eval_layout_name()}, {world_size} rank(s))"
        print(f"evaluating {args.checkpoint} on {where}", flush=True)
    with user_errors(show=rank == 0):  # data that holds no sample, a label rule it cannot meet: one line
        run_eval(
            model.to(device), cfg, out, device=device, plan=plan, rank=rank, world_size=world_size,
            progress=on_terminal(),
        )  # fmt: skip
    if worker:
        ranks.shutdown()
    if rank == 0:
        print(f"wrote {out / 'eval.json'}, {out / 'eval.html'} (tables, similarity.png, loss.png)")
    return 0


def checkpoint_is_finetuned(path: str) -> bool:
    from mmssl import checkpoint

    return checkpoint.find_config(path)[0].finetune is not None


def eval_finetuned(args: argparse.Namespace) -> int:
    """``mmssl eval`` of a fine-tuned run: its classifier on ``--data`` (default: the run's eval shards),
    in this process."""
    import torch

    from mmssl import checkpoint
    from mmssl.finetune_run import evaluate_checkpoint
    from mmssl.runlog import on_terminal

    with user_errors():
        cfg, run_dir = checkpoint.find_config(args.checkpoint)
        shards = args.data or cfg.data.eval_shards
        if not shards:
            raise ValueError("no evaluation data: pass --data SHARDS")
        _check_shards(shards, "--data" if args.data else "data.eval_shards")
        apply_overrides(cfg, args.overrides)
    out = Path(args.out or run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with user_errors():
        evaluate_checkpoint(args.checkpoint, shards, out, device=device, progress=on_terminal())
    print(f"wrote {out / 'eval.json'}, {out / 'eval.html'} (confusion.png, loss.png)")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from mmssl import checkpoint
    from mmssl.embed import embed_shards, format_embed_summary

    with user_errors():
        _check_shards(args.data, "--data")
        ckpt = checkpoint.load(args.checkpoint)
    if args.batch_size:
        ckpt.cfg.eval.batch_size = args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with user_errors():  # the data's own mistakes (no sample, labels of two kinds)
        manifest = embed_shards(
            ckpt.model.to(device), ckpt.cfg, args.data, args.out, device=device, source=ckpt.source
        )
    print(format_embed_summary(manifest, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmssl.export import export, format_export_summary

    with user_errors():
        summary = export(args.checkpoint, args.out, teacher=args.teacher)
    print(format_export_summary(summary))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    import data_pipelines as dp

    with user_errors():
        if args.verify:
            report = dp.verify_shards(args.verify, layout=args.layout, progress=True)
        else:
            if not (args.folder and args.manifest and args.out):
                raise ValueError("mmssl shards FOLDER MANIFEST --out OUT (or --verify SHARDS)")
            summary = dp.write_from_manifest(
                args.folder, args.manifest, args.out,
                image_col=args.image_col, audio_col=args.audio_col, text_col=args.text_col,
                label_col=args.label_col, key_col=args.key_col, group_col=args.group_col,
                max_count=args.max_count, max_bytes=args.max_bytes, test_fraction=args.test_fraction,
                seed=args.seed, dedup=args.dedup, progress=True,
            )  # fmt: skip
    if args.verify:
        print(dp.format_verify_report(report))
        return dp.verify_exit_code(report, strict=args.strict)
    print(dp.format_write_summary(summary))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from data_pipelines.demo import build_spoken_digits

    try:
        summary = build_spoken_digits(args.out, limit=args.limit, seed=args.seed)
    except RuntimeError as e:  # espeak-ng missing: the builder says how to install it
        print(f"mmssl: error: {mask(str(e))}", file=sys.stderr)
        return 2
    print(_format_demo_summary(summary, args.out))
    return 0


def _format_demo_summary(summary: dict, out: str) -> str:
    splits = ", ".join(
        f"{name} {s['samples']} samples ({s['pattern']})" for name, s in summary["splits"].items()
    )
    reused = " (already built: reused)" if summary.get("skipped") else ""
    return f"spoken digits in {out}{reused}: {splits}; {summary.get('seconds', 0):.0f} s"
