"""What ``torch.compile`` buys mmssl's step on this machine: eager, the trunks compiled (what
``engine.compile=true`` does) and the whole task compiled (towers, losses and objectives in one graph).

Each variant builds the preset's task from the same seed and times forward + backward + fused AdamW on
one random batch already in memory, in one process (no DeepSpeed, no loader): the compute the
compilers can fuse, nothing else. ``Task.forward`` takes the step as a Python int, which dynamo guards
on, so a compiled task recompiles every step (and falls back to eager after 8); the ``task`` variant
holds the step at 0 to time what one graph computes. Variants alternate, in a rotating order; medians.

    .venv/bin/python benchmarks/bench_compile.py                      # small, 2 threads, ~3 min
    .venv/bin/python benchmarks/bench_compile.py --preset tiny --rounds 1 --steps 3  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import random_batch  # noqa: E402

from mmssl import engine  # noqa: E402
from mmssl.config import RunConfig, apply_overrides  # noqa: E402
from mmssl.presets import get_preset  # noqa: E402
from mmssl.task import Task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "trunks", "task")


def step_ms(cfg: RunConfig, variant: str, batch: dict, steps: int, warmup: int) -> float:
    """Median milliseconds of one training step of ``variant`` after ``warmup`` steps (compilation)."""
    torch.manual_seed(0)
    task = Task(cfg)
    if variant == "trunks":
        engine.compile_trunks(task)
    elif variant == "task":
        task.compile(dynamic=False)
    optimizer = torch.optim.AdamW(task.parameters(), fused=True)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = task(batch, step=0 if variant == "task" else i, micro=0)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="measured steps per variant and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_compile")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    batch = random_batch(cfg, args.batch, seed=0)
    started, ms = time.time(), {v: [] for v in VARIANTS}
    for k in range(args.rounds):
        turn = k % len(VARIANTS)  # each variant goes first in some round
        for variant in VARIANTS[turn:] + VARIANTS[:turn]:
            ms[variant].append(step_ms(cfg, variant, batch, args.steps, args.warmup))
            print(f"round {k + 1}/{args.rounds} {variant:<7} {ms[variant][-1]:8.1f} ms/step", flush=True)
    eager = statistics.median(ms["eager"])
    print(f"\n{args.preset}, batch {args.batch}, {args.threads} threads, forward + backward + fused AdamW, "
          f"median of {args.rounds} round(s) x {args.steps} steps")  # fmt: skip
    for variant in VARIANTS:
        median = statistics.median(ms[variant])
        print(f"  {variant:<7} {median:8.1f} ms/step  {eager / median:5.2f}x eager")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "ms": ms,
        "wall_seconds": time.time() - started,
    }
    path = args.out / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
