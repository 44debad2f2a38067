"""Where a training step's time goes: torch.profiler over mmssl's own step (one rank, DeepSpeed engine,
the preset's loader), printing the top operators by self CPU time, the step's phases and the matmuls'
share: their part of the CPU time and their FLOP rate against this CPU's matmul peak, probed in the
same run.

    .venv/bin/python benchmarks/profile_step.py --preset small
    .venv/bin/python benchmarks/profile_step.py --preset small_masked --steps 5 engine.zero_stage=0

Writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev) and the table under
runs/profile/.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # the ops torch.profiler counts FLOPs of


def matmul_share(events, peak: float) -> str:
    """One line on the matmuls among profiled ``events`` (``key_averages()``): share of self CPU time,
    FLOP rate and that rate over ``peak`` (FLOP/s)."""
    total = sum(e.self_cpu_time_total for e in events)
    mm = [e for e in events if e.key in MATMULS]
    seconds = sum(e.self_cpu_time_total for e in mm) / 1e6
    rate = sum(e.flops for e in mm) / seconds if seconds else 0.0
    return (
        f"matmuls: {1e6 * seconds / total:.0%} of the CPU time, at {rate / 1e9:.1f} GFLOP/s = "
        f"{rate / peak:.0%} of the matmul peak ({peak / 1e9:.1f} GFLOP/s, probed now)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after as many warm-up steps)")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--shards", type=Path, default=REPO / "data" / "demo")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "profile")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from tqdm import tqdm

    from data_pipelines.demo import build_spoken_digits
    from mmssl import data, engine, ranks
    from mmssl.config import apply_overrides
    from mmssl.flops import cpu_peak
    from mmssl.presets import get_preset
    from mmssl.task import Task
    from mmssl.train import to_device

    build_spoken_digits(args.shards, progress=True)
    cfg = apply_overrides(
        get_preset(args.preset), [f"data.train_shards={args.shards / 'train'}", *args.overrides]
    )
    cfg = cfg.validate()
    info = engine.init_distributed()
    torch.manual_seed(cfg.train.seed)
    # each rank its own share of the data and of the contrastive batch, as the trainer builds them
    task = Task(cfg, rank=info.rank, world_size=info.world_size)
    eng = engine.Engine(task, cfg, info)
    batches = iter(data.loader(cfg, train=True, rank=info.rank, world_size=info.world_size))
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}

    def step(i: int, timed: bool) -> None:
        marks = [time.perf_counter()]
        with record_function("data"):
            batch = to_device(next(batches), info.device, eng.dtype)
        marks.append(time.perf_counter())
        with record_function("forward"):
            loss = eng(batch, step=i)["loss"]
        marks.append(time.perf_counter())
        with record_function("backward"):
            eng.backward(loss)
        marks.append(time.perf_counter())
        with record_function("optimizer step"):
            eng.step()
        marks.append(time.perf_counter())
        if timed:
            for name, a, b in zip(phases, marks, marks[1:], strict=False):
                phases[name] += b - a

    for i in tqdm(range(args.steps), desc="warm-up", unit="step"):
        step(i, timed=False)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for i in tqdm(range(args.steps), desc="profiled", unit="step"):
            step(args.steps + i, timed=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    # a shared machine's speed drifts: the peak is measured now, not read from the cache
    peak = cpu_peak(torch.get_num_threads(), cache=args.out / f"peak-{os.getpid()}.json", seconds=2.0)
    (args.out / f"peak-{os.getpid()}.json").unlink()
    name = f"{args.preset}-{os.getpid()}"
    prof.export_chrome_trace(str(args.out / f"{name}.trace.json"))
    total = sum(phases.values())
    summary = ", ".join(f"{k} {1000 * v / args.steps:.0f} ms ({v / total:.0%})" for k, v in phases.items())
    text = (
        f"{cfg.preset}, batch {cfg.optim.micro_batch_size}, {torch.get_num_threads()} thread(s), "
        f"ZeRO-{eng.zero_stage}; per step: {summary}\n{matmul_share(prof.key_averages(), peak)}\n\n{table}"
    )
    (args.out / f"{name}.txt").write_text(text)
    print(text)
    print(f"written: {args.out / name}.txt, {args.out / name}.trace.json")
    ranks.shutdown()


if __name__ == "__main__":
    main()
