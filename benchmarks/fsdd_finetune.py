"""FSDD fine-tuning benchmark: spoken-digit classification on an unseen speaker, from a pretrained
audio tower against the same tower trained from scratch, with all the labels and with a tenth of them.

Labelled shards (audio + digit only) are built from the Free Spoken Digit Dataset
(``../shared/data/fsdd``): every recording of the five training speakers, and a stratified tenth of
them (drawn by the seed); the held-out speaker's 500 recordings are the test split. The held-out
speaker is the pretrained run's own when its data was built by benchmarks/fsdd_benchmark.py (its
DONE.json says which), else ``--holdout``. Then for each label fraction, ``mmssl finetune`` on the
pretrained run's audio tower, three ways and the same number of steps:

  linear    the tower locked, only the head trains (``--linear``): a linear probe of the features
  finetune  the whole tower and the head (``finetune.layer_decay``, label smoothing)
  scratch   the same architecture from random weights (``model.audio.init_from=null``)

and prints top-1 and macro-F1 on the held-out speaker as a table (also written as .md, .json and a
bar chart .png under --out). ``--seeds 0,1,2``: each seed draws
its own tenth of the labels and seeds the fine-tuning (``train.seed``); the table shows mean ± standard
deviation. A run whose summary is already there (same folder: run, variant, fraction, steps, seed) is read,
not trained again.

    .venv/bin/python benchmarks/fsdd_finetune.py runs/fsdd/test_small/augment_s0 --seeds 0,1,2  # ~15 min, 2 cores
    .venv/bin/python benchmarks/fsdd_finetune.py RUN --steps 4 --fractions 0.1 --variants linear   # smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fsdd_benchmark import FSDD
from fsdd_data import recordings

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("linear", "finetune", "scratch")
# per variant: what it adds to the common command (a linear head wants a larger learning rate)
SETTINGS = {
    "linear": ["--linear", "optim.lr=1e-2", "optim.weight_decay=0.0"],
    "finetune": ["optim.lr=1e-3", "finetune.layer_decay=0.75", "finetune.label_smoothing=0.1"],
    "scratch": ["optim.lr=1e-3", "finetune.label_smoothing=0.1", "model.audio.init_from=null"],
}


def holdout_of(run: Path, default: str) -> tuple[str, tuple[str, ...]]:
    """The speaker the pretrained run's FSDD build held out and those it left out of everything (its
    DONE.json: the test speaker while settings are chosen on a validation one), else ``default``."""
    try:
        cfg = json.loads((run / "config.json").read_text())
        marker = Path(cfg["data"]["eval_shards"]).parent / "DONE.json"
        params = json.loads(marker.read_text())["params"]
        return params["holdout"], tuple(params.get("leave_out", ()))
    except (OSError, KeyError, ValueError):
        return default, ()


def build(
    root: Path, out: Path, *, holdout: str, leave_out: tuple[str, ...] = (), fraction: float, seed: int
) -> dict[str, int]:
    """Shards under ``out``: test/ (the held-out speaker), train/ (the others' recordings, or a
    stratified ``fraction`` of them), classes.json by each; reused when built with the same parameters."""
    from data_pipelines import write_shards
    from data_pipelines.demo import CLASSES

    params = {"holdout": holdout, "leave_out": sorted(leave_out), "fraction": fraction, "seed": seed}
    marker = out / "DONE.json"
    if marker.is_file() and json.loads(marker.read_text())["params"] == params:
        return json.loads(marker.read_text())["counts"]
    found = recordings(root)
    if holdout not in {s for _, _, s in found}:
        raise SystemExit(f"--holdout {holdout!r} is not an FSDD speaker")
    rng = np.random.default_rng(seed)
    train = [r for r in found if r[2] != holdout and r[2] not in leave_out]
    if fraction < 1.0:
        kept = []
        for digit in range(10):
            of_digit = [r for r in train if r[1] == digit]
            take = max(1, round(len(of_digit) * fraction))
            kept += [of_digit[i] for i in sorted(rng.permutation(len(of_digit))[:take])]
        train = kept
    counts = {}
    for name, rows in (("train", train), ("test", [r for r in found if r[2] == holdout])):
        order = rng.permutation(len(rows))
        samples = (
            {"__key__": rows[i][0].stem, "wav": rows[i][0].read_bytes(), "json": {"label": rows[i][1]}}
            for i in order
        )
        folder = out / name
        for stale in folder.glob("shard-*.tar"):
            stale.unlink()
        counts[name] = write_shards(samples, folder, max_count=1000)["total"]
        (folder / "classes.json").write_text(json.dumps(list(CLASSES)) + "\n")
    marker.write_text(json.dumps({"params": params, "counts": counts}) + "\n")
    return counts


def finetune(run: Path, data: Path, run_dir: Path, variant: str, seed: int, args: argparse.Namespace) -> dict:
    """One ``mmssl finetune`` (or the summary it left before); its classification scores and its time."""
    done = run_dir / "summary.json"
    if done.is_file() and "eval" in (summary := json.loads(done.read_text())):
        print(f"\n== {variant}, {data.name}: read {done}", flush=True)
        return summary["eval"]["classification"]
    command = [
        sys.executable, "-m", "mmssl.cli", "finetune", str(run), "--tower", "audio",
        "--data", str(data / "train"), "--eval-data", str(data / "test"), "--run-dir", str(run_dir),
        "--nproc", str(args.nproc), *SETTINGS[variant],
        f"train.steps={args.steps}", f"train.ckpt_every={args.steps}", f"train.log_every={max(1, args.steps // 10)}",
        f"optim.warmup_steps={max(1, args.steps // 10)}", f"optim.micro_batch_size={args.batch}",
        "data.eval_layout=mmssl", "train.eval_at_end=true", f"train.seed={seed}",  # fsdd_benchmark's runs skip it
        *args.overrides,
    ]  # fmt: skip
    print(f"\n== {variant}, {data.name}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"fine-tuning ({variant}, {data.name}) failed")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"{variant}, {data.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return summary["eval"]["classification"]


def table(
    results: dict[tuple[str, float], list[dict]], counts: dict[float, dict], args: argparse.Namespace
) -> str:
    fractions = sorted({f for _, f in results}, reverse=True)
    seeds = (
        f"seeds {','.join(map(str, args.seeds))}, mean ± standard deviation"
        if len(args.seeds) > 1
        else f"seed {args.seeds[0]}"
    )
    labelled = {f: f"{f:.0%} labels ({counts[f]['train']})" for f in fractions}
    head = f"{'':<10}" + "".join(f"{labelled[f]:>26}" for f in fractions)
    lines = [
        "",
        f"FSDD digits from speech, held-out speaker {args.holdout!r} ({next(iter(counts.values()))['test']} "
        f"recordings), {args.steps} steps, {seeds}; top-1 / macro-F1",
        head,
    ]
    for v in args.variants:
        cells = "".join(f"{cell(results.get((v, f))):>26}" for f in fractions)
        lines.append(f"{v:<10}{cells}")
    return "\n".join(lines)


def cell(runs: list[dict] | None) -> str:
    """``top-1 / macro-F1`` of one run, or their means ± standard deviations over seeds."""
    if not runs:
        return "-"
    if len(runs) == 1:
        return f"{runs[0]['top1']:.3f} / {runs[0]['macro_f1']:.3f}"
    top1, f1 = (np.array([r[k] for r in runs]) for k in ("top1", "macro_f1"))
    return f"{top1.mean():.3f}±{top1.std():.3f} / {f1.mean():.3f}±{f1.std():.3f}"


def plot(results: dict[tuple[str, float], list[dict]], counts: dict[float, dict], path: Path) -> None:
    """Top-1 per variant and label fraction as grouped bars (mean, with the seeds' standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({f for _, f in results}, reverse=True)
    variants = list(dict.fromkeys(v for v, _ in results))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(fractions), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        top1 = [np.array([r["top1"] for r in results.get((v, f), [])] or [np.nan]) for f in fractions]
        ax.bar(np.arange(len(fractions)) + i * width, [t.mean() for t in top1], width,
               yerr=[t.std() for t in top1], label=v)  # fmt: skip
    ax.set_xticks(np.arange(len(fractions)) + 0.4 - width / 2,
                  [f"{f:.0%} labels ({counts[f]['train']})" for f in fractions])  # fmt: skip
    ax.set_ylabel("top-1, held-out speaker")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the pretrained run (e.g. runs/fsdd/test_small/augment_s0)")
    p.add_argument("--fsdd", type=Path, default=FSDD, help=f"the FSDD copy (default {FSDD})")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "fsdd_finetune", help="shards and runs")
    p.add_argument("--holdout", default="theo", help="held-out speaker when the run does not say")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="optim.micro_batch_size")
    p.add_argument("--fractions", default="1.0,0.1", help="label fractions, comma-separated")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: linear, finetune, scratch"
    )
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--seeds", default="0", help="comma-separated: label subset and fine-tuning seeds")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides for every run")
    args, extra = p.parse_known_args()  # overrides may follow the options
    if any("=" not in e or e.startswith("-") for e in extra):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
    if not (args.fsdd / "recordings").is_dir():
        print(f"FSDD fine-tuning benchmark skipped: no recordings at {args.fsdd / 'recordings'}")
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - set(VARIANTS):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.holdout, leave_out = holdout_of(args.run, args.holdout)
    results: dict[tuple[str, float], list[dict]] = {}
    counts = {}
    for seed in args.seeds:
        for fraction in (float(f) for f in args.fractions.split(",")):
            data = args.out / f"data_{args.holdout}_{fraction:g}_s{seed}"
            counts[fraction] = build(
                args.fsdd, data, holdout=args.holdout, leave_out=leave_out, fraction=fraction, seed=seed
            )
            for v in args.variants:
                run_dir = args.out / f"{args.run.name}_{v}_{fraction:g}_{args.steps}_s{seed}"
                results.setdefault((v, fraction), []).append(finetune(args.run, data, run_dir, v, seed, args))
    text = table(results, counts, args)
    print(text)
    seeds = "-".join(map(str, args.seeds))
    out = args.out / f"results_{args.run.name}_{args.steps}_seeds{seeds}"
    json_, md, png = (out.with_name(f"{out.name}.{ext}") for ext in ("json", "md", "png"))
    json_.write_text(json.dumps({f"{v}@{f:g}": r for (v, f), r in results.items()}, indent=1) + "\n")
    md.write_text(text + "\n")
    plot(results, counts, png)
    print(f"written: {out}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
