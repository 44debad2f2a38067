"""Multimodal self-supervised pretraining: train, evaluate, embed and export image/text/audio models.

``mmssl train | finetune | eval | embed | export | shards | demo-data``; ``mmssl <command> --help`` for each.
Settings are a preset (or a run's config.json) plus dotted overrides such as ``optim.lr=3e-4``. A
mistake in a setting or a path ends the command with one line naming it (exit code 2), before any
training process starts. A run that trained but whose evaluation at the end failed keeps its
checkpoints, says why in one line and exits 3.
"""

# For developers: this is the only module that parses arguments. Each command's body, with every check
# run before a worker starts, is mmssl.commands' cmd_<command>; ranks are started by mmssl.launch.

from __future__ import annotations

import argparse
import sys

from mmssl.commands import (
    cmd_demo_data,
    cmd_embed,
    cmd_eval,
    cmd_export,
    cmd_finetune,
    cmd_shards,
    cmd_train,
)
from mmssl.presets import PRESETS


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
