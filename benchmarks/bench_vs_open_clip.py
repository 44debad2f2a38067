"""mmssl's trainer against open_clip's own (``python -m open_clip_train.main``), side by side.

One run, one machine, the same WebDataset shards (the spoken-digits demo, images and captions), the
same image-text CLIP (ViT and text transformer of the same widths, depths, heads, patch size, context
length, vocabulary and embedding size: the parameter counts are checked equal), the same batch size,
fp32, thread count, world size 1, AdamW settings and gradient clipping. Each trainer runs in a process
of its own for warm-up + measured steps; the two alternate (open_clip, mmssl, open_clip, mmssl, ...)
for several repeats. mmssl runs twice per repeat: at equal work (``EQUAL_WORK``: text batches not trimmed,
no ZeRO; both sides crop alike by default; both read a copy of the shards without their audio) and as a
user runs it (its defaults). Printed: steady-state samples/s of each over the measured steps only (from each
trainer's own log, open_clip's at full precision through ``open_clip_timed.py``; start-up and warm-up
excluded), the ratio mmssl/open_clip per repeat and its median at equal work (target >= 1.3) and as users
run them, the same ratio of samples per CPU second (a busy machine disturbs it less), each side's MFU from
mmssl.flops' FLOP count and peak, and the differences that remain at equal work, each with its cost per
step on each side: attention and the optimizer timed in this process on CPU (``open_clip_differences.py``),
the loader from each trainer's data wait in its runs; their sum is set against the measured gap.

The baseline runs in a virtualenv of its own, created here on first use and reused after: the torch,
torchvision and open_clip_torch pins of pyproject.toml plus webdataset 0.2.86 (open_clip_train breaks
on webdataset 1.x's end-of-shard marker) and pandas (open_clip_train imports it). It gets its fastest
settings on this machine: one process (its multi-process CPU path hands a CPU device to
DistributedDataParallel and fails), ``--precision fp32`` (its default ``amp`` autocasts to bf16, ~100x
slower on a CPU without bf16 hardware), and the loader workers (0, 1 or 2) and ``--torchcompile`` (on
or off) that were fastest in short tries at the start of the run (``--baseline-workers`` and
``--baseline-compile`` fix them instead). mmssl gets the same treatment for its ``engine.compile``
(``--mmssl-compile``).

    .venv/bin/python benchmarks/bench_vs_open_clip.py                  # both models, 3 repeats (~30 min)
    .venv/bin/python benchmarks/bench_vs_open_clip.py --models reference --repeats 1 --warmup 10 \
        --steps 20 --baseline-workers 1 --baseline-compile off          # a quick check

Writes ``results.json``, ``throughput.png`` and every run's log and metrics under ``--out``/<time>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import open_clip_differences as differences  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3
# what open_clip_train needs besides the project's own pins (see ../shared/STACK.md)
BASELINE_EXTRAS = ("webdataset==0.2.86", "pandas")
BASELINE_PINNED = ("torch", "torchvision", "open_clip_torch")
# mmssl at equal work with open_clip_train: its text batches not trimmed to their longest caption (open_clip
# always runs the full context) and no ZeRO (nothing to partition on one rank; open_clip has no such
# layer); the crop (RandomResizedCrop, scale 0.9-1.0) is both sides' default already
EQUAL_WORK = ("data.trim_text=false", "engine.zero_stage=0")
# what still differs at equal work (each timed in one process by open_clip_differences.py; the loader from the runs)
DIFFERENCES = (
    "attention: mmssl calls scaled_dot_product_attention (fused kernels), open_clip's towers call "
    "nn.MultiheadAttention",
    "optimizer: mmssl torch's fused AdamW on CPU (DeepSpeed's FusedAdam on CUDA) inside DeepSpeed's engine; "
    "open_clip torch's AdamW (foreach) with its own clipping",
    "loader: mmssl's data_pipelines stream (decode, crop, tokenize in its workers); open_clip_train's "
    "webdataset pipeline",
    "precision on CUDA: mmssl DeepSpeed bf16 (bf16 weights, fp32 master copy); open_clip amp_bf16 (autocast over "
    "fp32 weights)",
)
VOCAB_SIZE = 49409  # mmssl's text vocabulary: open_clip's 49408 BPE ids + one [MASK] id (unused here)


@dataclass(frozen=True)
class Arch:
    """An image-text CLIP, described once and written out for both trainers."""

    embed_dim: int
    image_size: int
    patch_size: int
    image_width: int
    image_depth: int
    image_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    context_length: int

    def open_clip_config(self) -> dict[str, Any]:
        """An open_clip model config (``local-dir:`` layout): same towers, random init."""
        return {
            "model_cfg": {
                "embed_dim": self.embed_dim,
                "vision_cfg": {
                    "image_size": self.image_size,
                    "patch_size": self.patch_size,
                    "width": self.image_width,
                    "layers": self.image_depth,
                    "head_width": self.image_width // self.image_heads,
                    "mlp_ratio": 4.0,
                },
                "text_cfg": {
                    "context_length": self.context_length,
                    "vocab_size": VOCAB_SIZE,
                    "width": self.text_width,
                    "heads": self.text_heads,
                    "layers": self.text_depth,
                    "mlp_ratio": 4.0,
                },
            },
            "preprocess_cfg": {},
        }

    def mmssl_overrides(self) -> list[str]:
        return [
            "model.audio=null",
            f"model.embed_dim={self.embed_dim}",
            f"model.image.image_size={self.image_size}",
            f"model.image.patch_size={self.patch_size}",
            f"model.image.width={self.image_width}",
            f"model.image.depth={self.image_depth}",
            f"model.image.heads={self.image_heads}",
            "model.image.mlp_ratio=4.0",
            f"model.text.context_length={self.context_length}",
            f"model.text.vocab_size={VOCAB_SIZE}",
            f"model.text.width={self.text_width}",
            f"model.text.depth={self.text_depth}",
            f"model.text.heads={self.text_heads}",
            "model.text.mlp_ratio=4.0",
            "model.text.causal=true",
        ]


def arch(width: int, depth: int, heads: int, patch: int, embed: int, context: int) -> Arch:
    return Arch(
        embed_dim=embed, image_size=32, patch_size=patch, image_width=width, image_depth=depth,
        image_heads=heads, text_width=width, text_depth=depth, text_heads=heads, context_length=context,
    )  # fmt: skip


# reference: the 3.4M-parameter model of ../shared/STACK.md (overhead-bound on this CPU);
# small: the towers of mmssl's `small` preset, where compute dominates;
# base: the image and text towers of mmssl's `base` preset (ViT-B/16 at 224 px; a GPU model, with
# --device cuda --context-length 77)
ARCHS = {
    "reference": lambda context: arch(64, 2, 2, 8, 64, context),
    "small": lambda context: arch(192, 4, 3, 4, 128, context),
    "base": lambda context: Arch(
        embed_dim=512,
        image_size=224,
        patch_size=16,
        image_width=768,
        image_depth=12,
        image_heads=12,
        text_width=512,
        text_depth=12,
        text_heads=8,
        context_length=context,
    ),  # fmt: skip
}


@dataclass
class Window:
    """Steps ``first..last`` (1-based, inclusive) between two log lines of a trainer."""

    first: int
    last: int
    seconds: float
    data_seconds: float
    mfu: float | None = None  # as the trainer logged it (mmssl only)

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


@dataclass
class Run:
    trainer: str
    model: str
    setting: str  # loader workers and compile flag (the baseline's or mmssl's)
    repeat: int | str
    samples_per_s: float  # from the trainer's own log, measured steps only
    measured_steps: int
    data_wait: float  # share of the measured wall time spent waiting for the loader
    samples_per_cpu_s: float | None  # the same steps per CPU second of the whole process group
    watched_samples_per_s: float | None  # the same steps timed from outside (a check)
    wall_seconds: float  # the whole process, start-up included
    load_avg: tuple[float, float]  # 1-minute load average before and after
    log: str
    windows: list[dict] = field(default_factory=list)
    mfu: float | None = None  # model FLOPs utilisation, from mmssl.flops' count and peak (both trainers)


@dataclass(frozen=True)
class Setting:
    """A configuration of a trainer's speed knobs: loader workers, torch.compile."""

    workers: int
    compile: bool = False

    @property
    def label(self) -> str:
        return f"w{self.workers}" + ("-compile" if self.compile else "")


# ------------------------------------------------------------------------------------------ environment


def project_pins() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[=<>!~ \[]", d, maxsplit=1)[0].lower().replace("-", "_"): d for d in deps}
    return [names[n] for n in BASELINE_PINNED]


def baseline_python(venv: Path, *, install: bool = True) -> Path:
    """The baseline's interpreter; the venv is created (about 2 minutes, from the package index) when
    missing or when its pins no longer match pyproject.toml, unless ``install`` is off: then that ends
    the run with one line."""
    wanted = project_pins() + list(BASELINE_EXTRAS)
    stamp = venv / "mmssl-bench.json"
    python = venv / "bin" / "python"
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("requirements") == wanted:
        return python
    if not install:
        raise SystemExit(
            f"bench: no up-to-date open_clip_train environment in {venv} and --no-install: create it once "
            f"(needs the network): python benchmarks/bench_vs_open_clip.py --setup-only --venv {venv}"
        )
    print(
        f"creating open_clip_train's environment in {venv}: {' '.join(wanted)} (once; a few minutes)",
        flush=True,
    )
    log = venv.parent / f"{venv.name}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        for command in (
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "--quiet", *wanted],
        ):
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"bench: installing the baseline failed; see {log}")
    versions = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; import json; print(json.dumps("
         "{p: m.version(p) for p in ('torch', 'torchvision', 'open_clip_torch', 'webdataset', 'pandas')}))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    stamp.write_text(json.dumps({"requirements": wanted, "versions": json.loads(versions)}, indent=2) + "\n")
    return python


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512": " avx512f" in flags,
        "amx": " amx_tile" in flags,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


# ------------------------------------------------------------------------------------------ parameter counts


def parameter_counts(a: Arch, config_dir: Path) -> dict[str, int]:
    """Both models built in this process (open_clip 3.3.0 is the same in both environments)."""
    import open_clip
    import torch

    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset
    from mmssl.task import Task

    torch.set_num_threads(1)
    cfg = apply_overrides(get_preset("tiny"), a.mmssl_overrides()).validate()
    ours = sum(p.numel() for p in Task(cfg).parameters())
    theirs = sum(p.numel() for p in open_clip.create_model(f"local-dir:{config_dir}").parameters())
    return {"mmssl": ours, "open_clip": theirs}


# ------------------------------------------------------------------------------------------ the two trainers


def threads_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (a trainer, its loader
    workers and any compile workers)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime follow at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / tick


@dataclass
class Region:
    """Wall and CPU seconds of the whole process group between two logged steps, as seen from here
    (the logs are polled every 20 ms): a check of the trainers' own timing, and CPU use per sample,
    which a busy machine disturbs much less than wall time."""

    wall: float
    cpu: float


def run_watched(
    command: list[str], env: dict[str, str], log: Path, progress: Path, logged_steps, first: int, last: int
) -> tuple[float, Region | None]:
    """Run a trainer to the end; snapshot wall and CPU time when ``logged_steps(progress text)`` first
    holds ``first`` and then ``last``. Returns the process's wall seconds and that region."""
    start = time.perf_counter()
    marks: dict[int, tuple[float, float]] = {}
    size = -1
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while proc.poll() is None:
                time.sleep(0.02)
                if len(marks) == 2 or not progress.is_file() or progress.stat().st_size == size:
                    continue
                size = progress.stat().st_size
                steps = logged_steps(progress.read_text())
                if not marks and first in steps and last not in steps:  # (both seen at once: no region)
                    marks[first] = (time.perf_counter(), group_cpu_seconds(proc.pid))
                elif marks and last in steps:
                    marks[last] = (time.perf_counter(), group_cpu_seconds(proc.pid))
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            raise
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"bench: {command[0]} ... exited with {proc.returncode}; the end of {log}:\n{tail}")
    region = None
    if len(marks) == 2:
        (w0, c0), (w1, c1) = marks[first], marks[last]
        region = Region(w1 - w0, c1 - c0)
    return time.perf_counter() - start, region


def open_clip_command(
    python: Path, a_dir: Path, args: argparse.Namespace, setting: Setting, steps: int, name: str, logs: Path
) -> list[str]:
    from mmssl.presets import get_preset

    o = get_preset("tiny").optim  # the same optimiser settings as the mmssl side
    return [
        str(python), str(REPO / "benchmarks" / "open_clip_timed.py"),  # open_clip_train.main, exact timing
        "--model", f"local-dir:{a_dir}",
        "--train-data", args.train_data, "--dataset-type", "webdataset",
        "--train-num-samples", str(steps * args.batch), "--epochs", "1",
        "--batch-size", str(args.batch), "--workers", str(setting.workers),
        "--device", args.device, "--precision", "fp32" if args.device == "cpu" else "amp_bf16",
        "--lr", str(o.lr), "--warmup", str(o.warmup_steps), "--wd", str(o.weight_decay),
        "--beta1", str(o.beta1), "--beta2", str(o.beta2), "--eps", str(o.eps),
        "--grad-clip-norm", str(args.grad_clip), "--seed", "0",
        "--log-every-n-steps", str(args.log_every), "--report-to", "",
        "--save-frequency", "0", "--logs", str(logs), "--name", name,
        *(["--torchcompile"] if setting.compile else []),
        *shlex.split(args.baseline_args),
    ]  # fmt: skip


def mmssl_command(
    a: Arch,
    args: argparse.Namespace,
    steps: int,
    run_dir: Path,
    compile_trunks: bool,
    *,
    defaults: bool = False,
) -> list[str]:
    """mmssl's run at equal work (:data:`EQUAL_WORK`), or with ``defaults`` as a user runs it."""
    return [
        str(Path(sys.executable).parent / "mmssl"), "train", "--preset", "tiny", "--nproc", "1",
        "--run-dir", str(run_dir), *a.mmssl_overrides(),
        f"data.train_shards={args.image_text / 'train'}", f"data.num_workers={args.mmssl_workers}",
        f"optim.micro_batch_size={args.batch}", f"train.steps={steps}", f"train.log_every={args.log_every}",
        f"train.ckpt_every={steps}", "train.eval_at_end=false", f"engine.compile={str(compile_trunks).lower()}",
        f"engine.precision={'fp32' if args.device == 'cpu' else 'bf16'}",
        *(() if defaults else EQUAL_WORK), *shlex.split(args.mmssl_args),
    ]  # fmt: skip


_OPEN_CLIP_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),"
)


def open_clip_windows(log_text: str, batch: int) -> list[Window]:
    """open_clip_train logs after step 1 and then every n-th step; each line carries the mean data and
    batch (whole step, data included) seconds over the steps since the previous line."""
    windows, prev = [], 0
    for m in _OPEN_CLIP_LINE.finditer(log_text):
        count = int(m.group(1)) // batch
        n = count - prev
        windows.append(Window(prev + 1, count, n * float(m.group(3)), n * float(m.group(2))))
        prev = count
    return windows


def mmssl_windows(metrics_text: str, batch: int) -> list[Window]:
    """metrics.jsonl rows: samples_per_s and data_wait over the steps since the previous row."""
    windows, prev = [], 0
    for line in metrics_text.splitlines():
        row = json.loads(line)
        if "samples_per_s" not in row:
            continue
        n = row["step"] - prev
        seconds = n * batch / row["samples_per_s"]
        windows.append(
            Window(prev + 1, row["step"], seconds, seconds * row.get("data_wait", 0.0), row.get("mfu"))
        )
        prev = row["step"]
    return windows


def measure(
    trainer: str, model: str, setting: str, repeat: int | str, command: list[str], args: argparse.Namespace,
    log: Path, progress: Path, parse, first: int, last: int, flops_per_sample: float | None = None,
) -> Run:  # fmt: skip
    """Run one trainer; keep the log windows that start after the warm-up (``first`` is the last step
    logged before them, ``last`` the last measured one)."""
    load0 = os.getloadavg()[0]
    wall, region = run_watched(
        command, threads_env(args.threads), log, progress, lambda text: {w.last for w in parse(text, args.batch)},
        first, last,
    )  # fmt: skip
    windows = parse(progress.read_text(), args.batch)
    kept = [w for w in windows if first < w.first and w.last <= last]
    steps, seconds = sum(w.steps for w in kept), sum(w.seconds for w in kept)
    if not kept or kept[-1].last != last:
        raise SystemExit(f"bench: {log}: no complete log windows after step {first} ({windows})")
    samples = args.batch * steps
    if flops_per_sample is not None:  # open_clip: the FLOPs mmssl.flops counts for the same model and batch
        mfu = samples / seconds * flops_per_sample / args.peak if args.peak else None
    else:  # mmssl logs its own, from the same counter (trimmed text counted at its real length)
        logged = [(w.mfu, w.seconds) for w in kept if w.mfu is not None]
        mfu = sum(m * t for m, t in logged) / sum(t for _, t in logged) if logged else None
    return Run(
        trainer=trainer, model=model, setting=setting, repeat=repeat,
        samples_per_s=samples / seconds, measured_steps=steps,
        data_wait=sum(w.data_seconds for w in kept) / seconds,
        samples_per_cpu_s=samples / region.cpu if region and region.cpu > 0 else None,
        watched_samples_per_s=samples / region.wall if region else None,
        wall_seconds=wall, load_avg=(load0, os.getloadavg()[0]), log=str(progress),
        windows=[asdict(w) for w in windows], mfu=mfu,
    )  # fmt: skip


def run_open_clip(
    python: Path, model: str, a_dir: Path, args: argparse.Namespace, setting: Setting, repeat: int | str,
    out: Path, measured: int,
) -> Run:  # fmt: skip
    # open_clip_train logs after step 1, then after steps 11, 21, ...: one extra step makes its last
    # `measured` steps fall into whole windows, after a warm-up of args.warmup + 1 steps. (With several
    # loader workers it rounds the step count up to a multiple of them; steps past `steps` are ignored.)
    steps = args.warmup + 1 + measured
    name = f"{model}-open_clip-{repeat}-{setting.label}"
    command = open_clip_command(python, a_dir, args, setting, steps, name, out / "open_clip")
    progress = out / "open_clip" / name / "out.log"
    return measure("open_clip", model, setting.label, repeat, command, args, out / f"{name}.log", progress,
                   open_clip_windows, args.warmup + 1, steps, args.flops[model])  # fmt: skip


def run_mmssl(
    model: str, a: Arch, args: argparse.Namespace, setting: Setting, repeat: int | str, out: Path,
    measured: int, *, defaults: bool = False,
) -> Run:  # fmt: skip
    """mmssl at equal work (trainer ``mmssl``) or as a user runs it (``mmssl_defaults``)."""
    steps = args.warmup + measured
    trainer = "mmssl_defaults" if defaults else "mmssl"
    name = f"{model}-{trainer}-{repeat}-{setting.label}"
    run_dir = out / "mmssl" / name
    command = mmssl_command(a, args, steps, run_dir, setting.compile, defaults=defaults)
    return measure(trainer, model, setting.label, repeat, command, args, out / f"{name}.log",
                   run_dir / "metrics.jsonl", mmssl_windows, args.warmup, steps)  # fmt: skip


# ------------------------------------------------------------------------------------------ report


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Per repeat and median: samples/s of each, the ratio mmssl/open_clip, and the same ratio of
    samples per CPU second."""
    by = {(r.trainer, r.repeat): r for r in runs if isinstance(r.repeat, int)}
    repeats = sorted({k for _, k in by})
    out: dict[str, Any] = {}
    for trainer in ("open_clip", "mmssl"):
        out[f"{trainer}_samples_per_s"] = [by[trainer, k].samples_per_s for k in repeats]
        out[f"{trainer}_samples_per_cpu_s"] = [by[trainer, k].samples_per_cpu_s for k in repeats]
        out[f"median_{trainer}"] = statistics.median(out[f"{trainer}_samples_per_s"])
    out["ratios"] = [by["mmssl", k].samples_per_s / by["open_clip", k].samples_per_s for k in repeats]
    out["median_ratio"] = statistics.median(out["ratios"])
    cpu = [(by["mmssl", k].samples_per_cpu_s, by["open_clip", k].samples_per_cpu_s) for k in repeats]
    cpu_ratios = [m / o for m, o in cpu if m and o]
    out["cpu_ratios"] = cpu_ratios
    out["median_cpu_ratio"] = statistics.median(cpu_ratios) if cpu_ratios else None
    # as a user runs each: mmssl's defaults (text trimming, ZeRO from ds_config.json) against the same baseline
    out["mmssl_defaults_samples_per_s"] = [by["mmssl_defaults", k].samples_per_s for k in repeats]
    out["median_mmssl_defaults"] = statistics.median(out["mmssl_defaults_samples_per_s"])
    out["default_ratios"] = [
        by["mmssl_defaults", k].samples_per_s / by["open_clip", k].samples_per_s for k in repeats
    ]
    out["median_default_ratio"] = statistics.median(out["default_ratios"])
    for trainer in ("open_clip", "mmssl", "mmssl_defaults"):
        mfus = [by[trainer, k].mfu for k in repeats if by[trainer, k].mfu is not None]
        out[f"median_mfu_{trainer}"] = statistics.median(mfus) if mfus else None
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        s = results["models"][model]["summary"]
        xs = list(range(len(s["ratios"])))
        ax.bar([x - 0.2 for x in xs], s["open_clip_samples_per_s"], 0.4, label="open_clip_train")
        ax.bar([x + 0.2 for x in xs], s["mmssl_samples_per_s"], 0.4, label="mmssl")
        for x, ratio in zip(xs, s["ratios"], strict=True):
            ax.annotate(f"{ratio:.2f}x", (x, max(s["open_clip_samples_per_s"][x], s["mmssl_samples_per_s"][x])),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(xs, [f"repeat {x + 1}" for x in xs])
        ax.set_ylabel("samples/s, steady state")
        ax.set_title(f"{model}: median mmssl/open_clip {s['median_ratio']:.2f}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else "-"


def _peak(settings: dict[str, Any]) -> str:
    peak = settings.get("peak_flops")
    return f"{peak / 1e9:.1f} GFLOP/s, {settings.get('peak_source')}" if peak else "unknown"


def difference_line(row: dict[str, Any]) -> str:
    return (f"    {row['name']:<10} open_clip {row['open_clip_ms']:7.1f}  mmssl {row['mmssl_ms']:7.1f}  "
            f"difference {row['open_clip_ms'] - row['mmssl_ms']:+7.1f}  ({row['what']})")  # fmt: skip


def print_differences(r: dict[str, Any], batch: int) -> None:
    """Each remaining difference's cost per step on each side, and their sum against the measured gap."""
    d = r["summary"]
    gap = 1000 * batch * (1 / d["median_open_clip"] - 1 / d["median_mmssl"])
    wait = {  # the loader's part of a step: each measured run's data-wait share of its step, median
        trainer: statistics.median(x["data_wait"] * 1000 * batch / x["samples_per_s"] for x in r["runs"]
                                   if x["trainer"] == trainer and isinstance(x["repeat"], int))
        for trainer in ("open_clip", "mmssl")
    }  # fmt: skip
    rows = [*r.get("differences", []), {"name": "loader", "open_clip_ms": wait["open_clip"], "mmssl_ms": wait["mmssl"],
                                        "what": "time each trainer waited for data, from its runs above"}]  # fmt: skip
    print(f"  equal-work step: open_clip {1000 * batch / d['median_open_clip']:.1f} ms, mmssl "
          f"{1000 * batch / d['median_mmssl']:.1f} ms; mmssl shorter by {gap:.1f} ms. What differs, ms per step:")  # fmt: skip
    for row in rows:
        print(difference_line(row))
    explained = sum(row["open_clip_ms"] - row["mmssl_ms"] for row in rows)
    print(
        f"    sum {explained:+.1f} ms of the {gap:.1f} ms gap; the rest is everything else in each trainer's step"
    )


def print_differences_only(args: argparse.Namespace) -> None:
    print(
        f"batch {args.batch}, {args.threads} thread(s); ms per step, medians of {differences.REPS} after "
        f"{differences.WARMUP} warm-ups"
    )
    for name in args.models:
        print(f"{name}:")
        for row in differences.measure(ARCHS[name](args.context_length), args.batch, args.threads):
            print(difference_line(row))


def print_report(results: dict[str, Any]) -> None:
    m, s = results["machine"], results["settings"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, AVX-512 {'yes' if m['avx512'] else 'no'}; 1-minute load "
        f"average {m['load_avg_at_start'][0]:.1f} at the start, {m['load_avg_at_end'][0]:.1f} at the end"
        + ("  << busy: wall-clock figures are unreliable" if max(m["load_avg_at_start"][0], m["load_avg_at_end"][0])
           > m["cores"] + 1 else "")
    )  # fmt: skip
    print(
        f"both: {s['precision']}, world size 1, {s['threads']} threads, batch {s['batch']}, {s['warmup']} warm-up + "
        f"{s['steps']} measured steps, AdamW with the tiny preset's settings, gradient clipping at "
        f"{s['grad_clip']}, log every {s['log_every']} steps, shards {s['train_data']}"
    )
    print(f"open_clip_train: {s['open_clip']}")
    print(f"mmssl:           {s['mmssl']}")
    for model, r in results["models"].items():
        a, p, summary = r["arch"], r["parameters"], r["summary"]
        print(
            f"\n{model}: ViT {a['image_width']} wide x {a['image_depth']} layers, {a['image_heads']} heads, patch "
            f"{a['patch_size']} on {a['image_size']}x{a['image_size']}; text {a['text_width']} x "
            f"{a['text_depth']}, {a['text_heads']} heads, context {a['context_length']}; embedding "
            f"{a['embed_dim']}. Parameters: mmssl {p['mmssl']:,}, open_clip {p['open_clip']:,}"
        )
        if r.get("sweep"):
            sweep = ", ".join(f"{label} {rate:.0f}" for label, rate in r["sweep"].items())
            print(f"  open_clip_train settings tried (samples/s): {sweep} -> {r['open_clip_setting']}")
        if r.get("mmssl_sweep"):
            sweep = ", ".join(f"{label} {rate:.0f}" for label, rate in r["mmssl_sweep"].items())
            print(f"  mmssl settings tried (samples/s): {sweep} -> {r['mmssl_setting']}")
        print(
            f"  {'repeat':<7}{'open_clip/s':>12}{'data':>6}{'/CPU-s':>8}{'mmssl/s':>10}{'data':>6}{'/CPU-s':>8}"
            f"{'ratio':>8}{'CPU ratio':>11}{'load':>6}"
        )
        runs = {(x["trainer"], x["repeat"]): x for x in r["runs"] if isinstance(x["repeat"], int)}
        for k, ratio in enumerate(summary["ratios"]):
            oc, mm = runs["open_clip", k], runs["mmssl", k]
            cpu = (mm["samples_per_cpu_s"] / oc["samples_per_cpu_s"]
                   if mm["samples_per_cpu_s"] and oc["samples_per_cpu_s"] else None)  # fmt: skip
            print(
                f"  {k + 1:<7}{oc['samples_per_s']:>12.1f}{oc['data_wait']:>6.0%}{_num(oc['samples_per_cpu_s'], '8.1f')}"
                f"{mm['samples_per_s']:>10.1f}{mm['data_wait']:>6.0%}{_num(mm['samples_per_cpu_s'], '8.1f')}"
                f"{ratio:>8.2f}{_num(cpu, '11.2f')}{max(oc['load_avg'] + mm['load_avg']):>6.1f}"
            )
        verdict = "met" if summary["median_ratio"] >= TARGET else "missed"
        print(
            f"  {'median':<7}{summary['median_open_clip']:>12.1f}{'':>14}{summary['median_mmssl']:>10.1f}{'':>14}"
            f"{summary['median_ratio']:>8.2f}{_num(summary['median_cpu_ratio'], '11.2f')}"
            f"   mmssl/open_clip at equal work, target >= {TARGET}: {verdict}"
        )
        d = summary
        print(
            f"  at equal work ({' '.join(EQUAL_WORK)}, the same crop, image-text shards): "
            f"{d['median_ratio']:.2f}x; MFU open_clip {_num(d['median_mfu_open_clip'], '.1%')}, "
            f"mmssl {_num(d['median_mfu_mmssl'], '.1%')}"
        )
        print(
            f"  as a user runs each (mmssl's defaults: text trimmed to the batch's longest caption, ZeRO from "
            f"ds_config.json): mmssl {d['median_mmssl_defaults']:.1f}/s, {d['median_default_ratio']:.2f}x "
            f"open_clip_train (MFU {_num(d['median_mfu_mmssl_defaults'], '.1%')}, trimmed FLOPs counted); "
            f"the defaults' effect on mmssl: {d['median_mmssl_defaults'] / d['median_mmssl']:.2f}x"
        )
        print_differences(r, s["batch"])
    print(
        f"\nMFU: samples/s x training FLOPs per sample (mmssl.flops; open_clip's model counted as mmssl's at equal "
        f"work) / peak ({_peak(results['settings'])}). Remaining differences at equal work, timed above:"
    )
    for difference in DIFFERENCES:
        print(f"  - {difference}")
    print(
        "\nratio: steady-state samples/s of mmssl over open_clip_train's, same repeat. CPU ratio: the same for "
        "samples per CPU second of each trainer's whole process group (loader workers included), which a busy "
        "machine disturbs much less than wall time (with >1 thread, OpenMP's spinning still counts)."
    )


# ------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(ARCHS), default=["reference", "small"])
    p.add_argument("--repeats", type=int, default=3, help="open_clip, mmssl pairs per model")
    p.add_argument(
        "--warmup", type=int, default=20, help="steps run but not measured (a multiple of --log-every)"
    )
    p.add_argument(
        "--steps", type=int, default=100, help="measured steps per run (a multiple of --log-every)"
    )
    p.add_argument("--log-every", type=int, default=10, help="both trainers' logging interval, in steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both trainers")
    p.add_argument(
        "--context-length", type=int, default=16, help="text context of both (mmssl's presets: 16)"
    )
    p.add_argument(
        "--baseline-workers", default="auto",
        help="open_clip_train --workers; 'auto': try 0, 1 and 2 and keep the fastest",
    )  # fmt: skip
    p.add_argument(
        "--baseline-compile", choices=("auto", "on", "off"), default="auto",
        help="open_clip_train --torchcompile; 'auto': try it with the best worker count, keep it if faster",
    )  # fmt: skip
    p.add_argument(
        "--baseline-args", default="", help="more open_clip_train flags, e.g. '--dataset-resampled'"
    )
    p.add_argument(
        "--sweep-steps", type=int, default=50, help="measured steps of each try of a baseline setting"
    )
    p.add_argument("--mmssl-workers", type=int, default=1, help="data.num_workers (the presets' default: 1)")
    p.add_argument(
        "--mmssl-compile", choices=("auto", "on", "off"), default="auto",
        help="engine.compile (torch.compile of the trunks); 'auto': try both, keep the faster, as for the baseline",
    )  # fmt: skip
    p.add_argument(
        "--mmssl-args", default="",
        help="more mmssl config overrides, for both of its runs (equal work adds: " + " ".join(EQUAL_WORK) + ")",
    )  # fmt: skip
    p.add_argument(
        "--shards", type=Path, default=Path("data/demo"), help="spoken-digits build (made if missing)"
    )
    p.add_argument(
        "--venv", type=Path, default=Path("runs/open_clip_venv"), help="the baseline's environment"
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench_vs_open_clip"))
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu: both in fp32; cuda: open_clip_train --precision amp_bf16, mmssl engine.precision=bf16",
    )  # fmt: skip
    p.add_argument("--no-install", action="store_true", help="never create the baseline's environment")
    p.add_argument("--setup-only", action="store_true", help="create the baseline's environment and stop")
    p.add_argument(
        "--differences-only", action="store_true",
        help="only time the remaining differences in this process (open_clip_differences.py) and stop",
    )  # fmt: skip
    args = p.parse_args()
    for name in ("warmup", "steps", "sweep_steps"):
        value = getattr(args, name)
        if value < args.log_every or value % args.log_every:
            p.error(
                f"--{name.replace('_', '-')} must be a positive multiple of --log-every ({args.log_every})"
            )
    if args.baseline_workers != "auto" and not args.baseline_workers.isdigit():
        p.error("--baseline-workers must be 'auto' or a number")
    return args


def best_setting(
    python: Path, model: str, a_dir: Path, args: argparse.Namespace, out: Path, record
) -> tuple[Setting, dict[str, float]]:
    """The baseline's fastest setting: loader workers first, then torch.compile on top of the best."""
    compile_first = args.baseline_compile == "on"
    workers = [0, 1, 2] if args.baseline_workers == "auto" else [int(args.baseline_workers)]
    tried: dict[Setting, float] = {}
    if len(workers) > 1:
        for w in workers:
            s = Setting(w, compile_first)
            tried[s] = record(
                run_open_clip(python, model, a_dir, args, s, "sweep", out, args.sweep_steps)
            ).samples_per_s
    best = max(tried, key=tried.get) if tried else Setting(workers[0], compile_first)
    if args.baseline_compile == "auto":
        if best not in tried:
            tried[best] = record(
                run_open_clip(python, model, a_dir, args, best, "sweep", out, args.sweep_steps)
            ).samples_per_s
        compiled = Setting(best.workers, True)
        tried[compiled] = record(
            run_open_clip(python, model, a_dir, args, compiled, "sweep", out, args.sweep_steps)
        ).samples_per_s
        best = max(tried, key=tried.get)
    return best, {s.label: rate for s, rate in tried.items()}


def best_mmssl_setting(
    model: str, a: Arch, args: argparse.Namespace, out: Path, record
) -> tuple[Setting, dict[str, float]]:
    """mmssl's faster setting, by the same rule as the baseline's: engine.compile off or on."""
    if args.mmssl_compile != "auto":
        return Setting(args.mmssl_workers, args.mmssl_compile == "on"), {}
    tried = {
        s: record(run_mmssl(model, a, args, s, "sweep", out, args.sweep_steps)).samples_per_s
        for s in (Setting(args.mmssl_workers, False), Setting(args.mmssl_workers, True))
    }
    return max(tried, key=tried.get), {s.label: rate for s, rate in tried.items()}


def sweep_runs(args: argparse.Namespace) -> int:
    """How many runs best_setting and best_mmssl_setting make per model."""
    mmssl = 2 if args.mmssl_compile == "auto" else 0
    if args.baseline_workers == "auto":
        return 3 + (args.baseline_compile == "auto") + mmssl
    return (2 if args.baseline_compile == "auto" else 0) + mmssl


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Shards (built if missing), the baseline's brace pattern and gradient clipping, and this run's
    output folder. Returns the folder and the DeepSpeed config both trainers are matched to."""
    os.chdir(REPO)
    args.shards = args.shards if args.shards.is_absolute() else REPO / args.shards
    if not (args.shards / "DONE.json").is_file():
        from data_pipelines.demo import build_spoken_digits

        print(f"building the demo shards in {args.shards}", flush=True)
        build_spoken_digits(args.shards)
    args.image_text = image_text_shards(
        args.shards / "train", args.shards.with_name(f"{args.shards.name}-image-text")
    )
    n_shards = len(list((args.image_text / "train").glob("shard-*.tar")))
    # open_clip_train takes a brace pattern; the demo's shards are numbered from 0
    args.train_data = str(args.image_text / "train" / f"shard-{{000000..{n_shards - 1:06d}}}.tar")
    ds_config = json.loads((REPO / "ds_config.json").read_text())
    args.grad_clip = ds_config.get("gradient_clipping") or 0.0  # both clip where mmssl's engine does
    out = (args.out if args.out.is_absolute() else REPO / args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out, ds_config


def image_text_shards(train: Path, out: Path) -> Path:
    """A copy of the ``train`` shards without their audio members (made once): neither trainer then reads
    bytes it throws away. Returns ``out`` (shards under ``out/train``)."""
    import shutil
    import tarfile

    done = out / "DONE"
    if done.is_file():
        return out
    (out / "train").mkdir(parents=True, exist_ok=True)
    for shard in sorted(train.glob("shard-*.tar")):
        with tarfile.open(shard) as src, tarfile.open(out / "train" / shard.name, "w") as dst:
            for member in src:
                if not member.name.endswith((".wav", ".flac", ".mp3")):
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    for extra in train.glob("*.json"):  # sizes.json: the sample counts are unchanged
        shutil.copy(extra, out / "train" / extra.name)
    done.write_text("image and text members of " + str(train) + "\n")
    return out


def flops_per_sample(a: Arch, args: argparse.Namespace) -> float:
    """Training FLOPs per sample of the image-text model at equal work (full text context), by mmssl.flops:
    the figure both sides' MFU is computed from."""
    from mmssl import flops
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset

    cfg = apply_overrides(get_preset("tiny"), [*a.mmssl_overrides(), *EQUAL_WORK]).validate()
    return flops.train_flops_per_sample(cfg, args.batch, None)


def describe_models(archs: dict[str, Arch], out: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each model's open_clip config written to disk and both parameter counts, which must agree."""
    per_model: dict[str, dict[str, Any]] = {}
    for name, a in archs.items():
        a_dir = out / "open_clip_models" / name
        a_dir.mkdir(parents=True, exist_ok=True)
        (a_dir / "open_clip_config.json").write_text(json.dumps(a.open_clip_config(), indent=2) + "\n")
        counts = parameter_counts(a, a_dir)
        print(f"{name}: parameters mmssl {counts['mmssl']:,}, open_clip {counts['open_clip']:,}", flush=True)
        if counts["mmssl"] != counts["open_clip"]:
            raise SystemExit(f"bench: the two {name} models differ in size: {counts}")
        per_model[name] = {
            "flops_per_sample": flops_per_sample(a, args),
            "arch": asdict(a),
            "parameters": counts,
            "open_clip_config": str(a_dir),
            "runs": [],
        }
    return per_model


def run_models(
    python: Path,
    archs: dict[str, Arch],
    per_model: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    out: Path,
) -> None:
    """Per model: each trainer's best setting, then ``--repeats`` alternating runs of both; every run is
    recorded in ``per_model`` and the model's summary added."""
    bar = tqdm(
        total=len(archs) * (3 * args.repeats + sweep_runs(args)), desc="runs", unit="run", dynamic_ncols=True
    )
    runs: list[Run] = []

    def record(run: Run) -> Run:
        runs.append(run)
        per_model[run.model]["runs"].append(asdict(run))
        bar.set_postfix_str(f"last: {run.trainer} {run.setting} {run.samples_per_s:.0f}/s")
        bar.update(1)
        return run

    for name, a in archs.items():
        r, a_dir = per_model[name], out / "open_clip_models" / name
        bar.set_description(f"{name}: baseline settings")
        setting, r["sweep"] = best_setting(python, name, a_dir, args, out, record)
        r["open_clip_setting"] = setting.label
        bar.set_description(f"{name}: mmssl settings")
        mine, r["mmssl_sweep"] = best_mmssl_setting(name, a, args, out, record)
        r["mmssl_setting"] = mine.label
        for k in range(args.repeats):
            bar.set_description(f"{name}: repeat {k + 1}/{args.repeats}")
            record(run_open_clip(python, name, a_dir, args, setting, k, out, args.steps))
            record(run_mmssl(name, a, args, mine, k, out, args.steps))
            record(run_mmssl(name, a, args, mine, k, out, args.steps, defaults=True))
        r["summary"] = summarise([x for x in runs if x.model == name])
    bar.close()
    if args.device == "cpu":
        for name, a in archs.items():
            per_model[name]["differences"] = differences.measure(a, args.batch, args.threads)


def describe_settings(
    args: argparse.Namespace, per_model: dict[str, dict[str, Any]], ds_config: dict[str, Any], python: Path
) -> dict[str, Any]:
    """What both trainers ran with, in words and figures, for results.json and the report."""
    versions = json.loads((python.parent.parent / "mmssl-bench.json").read_text())["versions"]
    chosen = ", ".join(f"{name} {r['open_clip_setting']}" for name, r in per_model.items())
    mine = ", ".join(f"{name} {r['mmssl_setting']}" for name, r in per_model.items())
    return {
        "batch": args.batch,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "precision": "fp32 on CPU" if args.device == "cpu" else "bf16 on CUDA",
        "peak_flops": args.peak,
        "peak_source": args.peak_source,
        "equal_work": list(EQUAL_WORK),
        "differences": list(DIFFERENCES),
        "log_every": args.log_every,
        "grad_clip": args.grad_clip,
        "train_data": args.train_data,
        "open_clip": (
            f"python -m open_clip_train.main, 1 process, --device {args.device} --precision "
            f"{'fp32' if args.device == 'cpu' else 'amp_bf16'}, webdataset (not resampled), "
            f"loader workers / torch.compile as chosen: {chosen} {args.baseline_args}".rstrip()
            + f"; {', '.join(f'{k} {v}' for k, v in versions.items())}"
        ),
        "mmssl": (
            "mmssl train --nproc 1: DeepSpeed (ds_config.json's ZeRO stage "
            f"{ds_config.get('zero_optimization', {}).get('stage', 0)} unless overridden below) "
            f"on world size 1, {'fp32' if args.device == 'cpu' else 'bf16'}, data.num_workers={args.mmssl_workers} {args.mmssl_args}; "
            f"workers / engine.compile as chosen: {mine}; at equal work also {' '.join(EQUAL_WORK)}, as a user runs "
            "it without them"
        ),
        "open_clip_versions": versions,
    }


def device_peak(args: argparse.Namespace) -> tuple[float | None, str]:
    """The peak FLOP/s of one trainer's device as mmssl measures it (on CPU: its matmul probe at --threads)."""
    import torch

    from mmssl import flops

    torch.set_num_threads(args.threads)
    return flops.device_peak(torch.device("cuda:0" if args.device == "cuda" else "cpu"))


def main() -> None:
    args = parse_args()
    venv = args.venv if args.venv.is_absolute() else REPO / args.venv
    if args.setup_only:
        print(f"open_clip_train's environment: {baseline_python(venv).parent.parent}")
        return
    if args.differences_only:
        print_differences_only(args)
        return
    out, ds_config = prepare(args)
    python = baseline_python(venv, install=not args.no_install)
    info = machine()
    archs = {name: ARCHS[name](args.context_length) for name in args.models}
    per_model = describe_models(archs, out, args)
    args.flops = {name: r["flops_per_sample"] for name, r in per_model.items()}
    args.peak, args.peak_source = device_peak(args)
    run_models(python, archs, per_model, args, out)
    info["load_avg_at_end"] = os.getloadavg()
    results = {
        "machine": info,
        "target": TARGET,
        "settings": describe_settings(args, per_model, ds_config, python),
        "models": per_model,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "throughput.png")
    print_report(results)
    print(f"\nwritten: {out / 'results.json'}, {out / 'throughput.png'} (every run's log beside them)")


if __name__ == "__main__":
    main()
