"""Multimodal self-supervised pretraining: train, evaluate, embed and export image/text/audio models.

``mmssl train | finetune | eval | embed | export | shards | demo-data``; ``mmssl <command> --help`` for each.
Settings are a preset (or a run's config.json) plus dotted overrides such as ``optim.lr=3e-4``. A
mistake in a setting or a path ends the command with one line naming it (exit code 2), before any
training process starts. A run that trained but whose evaluation at the end failed keeps its
checkpoints, says why in one line and exits 3.
"""

# For developers: this is the only module that parses arguments. Everything a run needs is checked
# here, in the first process, before any worker starts: preset names, dotted overrides, config values,
# shard paths and the DeepSpeed batch identity.

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from data_pipelines.remote import mask
from mmssl.config import RunConfig, apply_overrides, load_json, save_json, url_credentials
from mmssl.presets import PRESETS, get_preset

CREDENTIALS_ENV = "MMSSL_URL_CREDENTIALS"  # launcher -> ranks: what config.json masks (see url_credentials)


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


def launched_by_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


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
    """A resumed run must build the parameters its checkpoint holds: a run saved untied (before
    ``objectives.masked_text.tie_head`` existed, or with it false) cannot resume tied, nor the reverse."""
    if not saved.is_file():
        return
    before, now = load_json(saved).objectives.masked_text, cfg.objectives.masked_text
    if before.enabled and now.enabled and before.tie_head != now.tie_head:
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
    t.add_argument("--hostfile", help="DeepSpeed hostfile: train on its nodes, started from here over ssh")
    t.add_argument("--nnodes", type=int, default=1, help="nodes, each running this command (SLURM)")
    t.add_argument("--node-rank", type=int, default=0, help="this node's index among --nnodes")
    t.add_argument("--master-addr", help="address of the first node (multi-node)")
    t.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")
    t.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=3e-4"
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval",
        help="retrieval for every modality pair, zero-shot classification and a linear probe; of a fine-tuned "
        "run (mmssl finetune): its classifier's top-1/top-5, macro-F1, per-class recall and confusion matrix",
    )
    e.add_argument(
        "checkpoint", help="a run directory, its checkpoints/ folder, one checkpoint, or an export"
    )
    e.add_argument("--data", help="evaluation shards (default: the run's data.eval_shards)")
    e.add_argument("--out", help="where eval.json, eval.html and the PNGs go (default: the run directory)")
    e.add_argument(
        "--nproc", type=int, default=1, help="ranks that share the embedding work (a fine-tuned run: one)"
    )
    e.add_argument(
        "--classes",
        help="zero-shot class names, a JSON list or one per line (default: classes.json by the shards)",
    )
    e.add_argument(
        "--templates", help="zero-shot prompt templates with {} for the class name, JSON list or lines"
    )
    e.add_argument(
        "--probe-data", help="train split for the linear probe (default: the run's data.train_shards)"
    )
    e.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    e.add_argument("--no-zeroshot", action="store_true", help="skip zero-shot classification")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.match=pair")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("embed", help="embeddings of every sample of some shards, per modality (.npy + keys)")
    b.add_argument(
        "checkpoint", help="a run directory, its checkpoints/ folder, one checkpoint, or an export"
    )
    b.add_argument("--data", required=True, help="the shards to embed")
    b.add_argument(
        "--out", required=True, help="folder for <modality>.npy, <modality>_keys.txt, manifest.json"
    )
    b.add_argument(
        "--batch-size", type=int, default=None, help="samples per forward (default: eval.batch_size)"
    )
    b.set_defaults(func=cmd_embed)

    x = sub.add_parser("export", help="consolidated fp32 safetensors + config, and an open_clip checkpoint")
    x.add_argument(
        "checkpoint", help="a run directory, its checkpoints/ folder or one checkpoint (any ZeRO stage)"
    )
    x.add_argument("--out", required=True, help="the export folder")
    x.add_argument(
        "--teacher",
        action="store_true",
        help="export the EMA teacher's towers (objectives.distill) in place of the student's distilled ones",
    )
    x.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "shards", help="write shards from a folder and a JSONL/CSV manifest, or --verify shards"
    )
    s.add_argument("folder", nargs="?", help="the folder the manifest's paths are relative to")
    s.add_argument("manifest", nargs="?", help="a .jsonl or .csv file, one sample per row")
    s.add_argument("--out", help="output folder (train/ and, with --test-fraction, test/)")
    s.add_argument("--verify", metavar="SHARDS", help="read every sample of SHARDS and report what is bad")
    s.add_argument("--layout", default="mmssl", help="with --verify: mmssl, img2dataset, clap or explicit")
    s.add_argument("--strict", action="store_true", help="with --verify: also fail on bad samples")
    for column, default in (("image", "image"), ("audio", "audio"), ("text", "text"), ("label", "label")):
        s.add_argument(f"--{column}-col", default=default, help=f"manifest column of the {column}")
    s.add_argument("--key-col", help="manifest column of a unique sample key (default: the row number)")
    s.add_argument("--group-col", help="rows sharing this column's value stay in one split")
    s.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    s.add_argument("--max-bytes", type=int, default=2**30, help="bytes per shard at most")
    s.add_argument("--test-fraction", type=float, default=0.0, help="share of rows (or groups) for test/")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--dedup", nargs="?", const="exact", choices=("exact", "near"),
        help="drop repeated rows before writing, keeping the first: the same image or audio bytes, or the "
        "same caption with the same media; 'near' also resized or recompressed images (needs imagehash)",
    )  # fmt: skip
    s.set_defaults(func=cmd_shards)

    f = sub.add_parser(
        "finetune", help="a classification head on a pretrained tower, fine-tuned on labelled shards"
    )
    f.add_argument("run", help="the pretrained run directory, one of its checkpoints, or an export")
    f.add_argument(
        "--data", required=True, help="labelled training shards (json 'label' or cls: ids or names)"
    )
    f.add_argument(
        "--tower", required=True, choices=("audio", "image", "text"), help="the tower to fine-tune"
    )
    f.add_argument("--eval-data", help="held-out labelled shards, scored at the end")
    f.add_argument(
        "--linear", action="store_true", help="lock the tower: only the head trains (linear probe)"
    )
    f.add_argument("--run-dir", help="where the fine-tuning run goes (default: RUN-finetune-TOWER)")
    f.add_argument("--nproc", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    f.add_argument("--resume", help="'latest' or a checkpoint tag in RUN_DIR/checkpoints")
    f.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="e.g. train.steps=200 optim.lr=1e-3 finetune.layer_decay=0.75 finetune.label_smoothing=0.1",
    )  # fmt: skip
    f.set_defaults(func=cmd_finetune)

    d = sub.add_parser("demo-data", help="build the spoken-digits demo shards (images, captions, speech)")
    d.add_argument("--out", default="data/demo")
    d.add_argument("--limit", type=int, default=None, help="use only this many digit images")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo_data)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    # argparse stops filling a positional list once options follow it (`eval RUN --data X key=value`):
    # KEY=VALUE words it leaves over are overrides wherever they stand
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        print(
            f"mmssl: error: unrecognized arguments: {' '.join(stray)} (see mmssl {argv[0]} --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv  # to start the same command on several ranks
    if getattr(args, "nproc", 1) < 1:
        print("mmssl: error: --nproc must be >= 1", file=sys.stderr)
        return 2
    from data_pipelines import BadDataError

    try:
        return args.func(args)
    except BadDataError as e:  # the data ran out of usable samples: one line (it names a sample and a fix)
        print(f"mmssl: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
