"""Data-parallel scaling on one machine's cores: the same global batch trained by 1 rank x 2 threads
and by 2 ranks x 1 thread, and what the gradient all-reduce costs per step.

Each layout is one ``mmssl train`` run (DeepSpeed, the preset's ZeRO stage, fp32 CPU) on synthetic
image-text-audio shards written here; samples/s is the median of its own log rows after the warm-up
(the last row, which also covers the checkpoint save, left out). Scaling efficiency is samples/s of
2 ranks x 1 thread over 1 rank x 2 threads: the same cores, split between ranks instead of between
one rank's threads (1.0: data parallelism costs nothing over intra-op threading; target >= 0.95).
Two more runs split the gap: the 2-rank run with ZeRO's all-reduce on gloo, and the 1-rank run with
the contiguous gradient buffer that 2 CPU ranks must keep (``mmssl/ds_config.py``); ``--rounds N``
alternates all four and prints medians.

The all-reduce: 2 spawned ranks, 1 thread each, time an all-reduce of an fp32 tensor the size of
the task's trainable parameters (one step's gradients), through torch.distributed on gloo (what
ZeRO's reduction used on CPU before ``engine.shm_all_reduce``) and through DeepSpeed's shared-memory
all-reduce (its CPU comm op, when it builds: what mmssl routes ZeRO's gradients through when every rank
is on one node); median of ``--reduce-reps``. The 2-rank layout also runs with that routing off
(``engine.shm_all_reduce=false``), so the efficiency is printed both ways.

    .venv/bin/python benchmarks/bench_scaling.py                 # small preset, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_scaling.py --rounds 3      # the README's figures, ~12 min
    .venv/bin/python benchmarks/bench_scaling.py --preset tiny --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mfu import REPO, steady_rows  # noqa: E402

TARGET = 0.95
# name: (run folder, ranks, threads per rank, overrides). The 2-rank run as shipped (ZeRO's gradient
# all-reduce on DeepSpeed's shared-memory op) and on gloo (engine.shm_all_reduce=false); the 1-rank run as
# shipped (no contiguous gradient buffer, which 2 CPU ranks must keep: ds_config.py) and with the buffer
CONTIGUOUS = "1 rank x 2 threads, contiguous buffer"
LAYOUTS = {
    "1 rank x 2 threads": ("1x2", 1, 2, ()),
    CONTIGUOUS: ("1x2-contiguous", 1, 2, ("engine.ds_config={contiguous}",)),
    "2 ranks x 1 thread": ("2x1", 2, 1, ()),
    "2 ranks x 1 thread, gloo": ("2x1-gloo", 2, 1, ("engine.shm_all_reduce=false",)),
}


def contiguous_config(out: Path) -> Path:
    """The repository's ds_config.json with the contiguous gradient buffer on, whatever the rank count."""
    ds = json.loads((REPO / "ds_config.json").read_text())
    ds["zero_optimization"]["contiguous_gradients"] = True
    (path := out / "ds_config_contiguous.json").write_text(json.dumps(ds, indent=2) + "\n")
    return path


def write_data(out: Path, image_size: int) -> Path:
    from data_pipelines import synthetic_samples, write_shards

    if not (out / "sizes.json").is_file():
        write_shards(synthetic_samples(256, seed=1, image_size=image_size), out, max_count=64)
    return out


def train(
    args: argparse.Namespace,
    shards: Path,
    out: Path,
    k: int,
    folder: str,
    ranks: int,
    threads: int,
    extra: tuple,
) -> dict:
    """Round ``k``'s run of ``ranks`` x ``threads`` at the global batch ``args.batch``; its throughput."""
    run_dir = out / f"{folder}-{k}"
    steps = args.warmup + args.steps
    command = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", args.preset, "--nproc", str(ranks),
        "--run-dir", str(run_dir), f"data.train_shards={shards}", f"optim.micro_batch_size={args.batch // ranks}",
        f"train.steps={steps}", f"train.log_every={args.log_every}", f"train.ckpt_every={10 * steps}",
        "train.eval_at_end=false", *args.overrides, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MMSSL_CACHE": str(out / "cache")}
    log = out / f"{run_dir.name}.log"
    what = f"bench_scaling: the {ranks} x {threads} run"
    kept = steady_rows(command, env, run_dir, log, warmup=args.warmup, what=what)
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in kept),
        "data_wait": statistics.median(r["data_wait"] for r in kept),
        "rows": len(kept),
    }


def _reduce_worker(rank: int, world: int, port: int, numel: int, reps: int, out: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    from mmssl import engine  # the one DeepSpeed importer

    engine.init_distributed()
    grads = torch.randn(numel)

    def timed(reduce) -> float:
        reduce(grads)  # warm-up (buffers, connections)
        seconds = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            reduce(grads)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    result = {"gloo": timed(lambda t: dist.all_reduce(t))}
    if (shm := engine.shm_all_reduce()) is not None:
        result["deepspeed shm"] = timed(shm)
    if rank == 0:
        out.update(result)
    dist.barrier()
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, reps: int) -> dict[str, float]:
    """{"gloo": s, "deepspeed shm": s (when its op is available)}: median seconds of one all-reduce of
    ``numel`` fp32 values on 2 local ranks."""
    import torch.multiprocessing as mp

    from mmssl.ranks import free_port, remove_shm_buffers

    port = free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        try:
            mp.spawn(_reduce_worker, args=(2, port, numel, reps, out), nprocs=2, join=True)
        finally:
            remove_shm_buffers(port)
        return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=64, help="global batch, the same for both layouts")
    p.add_argument("--warmup", type=int, default=5, help="steps not measured (a multiple of --log-every)")
    p.add_argument("--steps", type=int, default=15, help="measured steps")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds of the layouts; medians are printed"
    )
    p.add_argument("--reduce-reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_scaling")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for both runs")
    args = p.parse_args()
    if args.batch % 2:
        raise SystemExit("bench_scaling: --batch must be even (2 ranks share it)")

    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset
    from mmssl.task import Task

    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    shards = write_data(out / "data", cfg.model.image.image_size if cfg.model.image else 32)
    contiguous = contiguous_config(out)
    layouts = {  # the overrides with the contiguous config's path filled in
        name: (*layout, tuple(o.format(contiguous=contiguous) for o in extra))
        for name, (*layout, extra) in LAYOUTS.items()
    }
    started = time.time()
    rounds = [
        {name: train(args, shards, out, k, *layout) for name, layout in layouts.items()}
        for k in range(args.rounds)
    ]
    results = {
        name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
        for name in LAYOUTS
    }
    numel = sum(p.numel() for p in Task(cfg).parameters() if p.requires_grad)
    reduce = all_reduce_seconds(numel, args.reduce_reps)

    one, contiguous, two, gloo = (results[name]["samples_per_s"] for name in LAYOUTS)
    efficiency = two / one
    print(f"\n{args.preset}, global batch {args.batch}, {args.steps} measured steps after {args.warmup}, "
          f"median of {args.rounds} alternating round(s), "
          f"fp32 CPU, load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"{'layout':<38}{'samples/s':>11}{'ms/step':>9}{'data wait':>11}  each round's samples/s")
    for name, r in results.items():
        each = " / ".join(f"{x[name]['samples_per_s']:.1f}" for x in rounds)
        print(f"{name:<38}{r['samples_per_s']:>11.1f}{1000 * args.batch / r['samples_per_s']:>9.0f}"
              f"{r['data_wait']:>11.0%}  {each}")  # fmt: skip
    verdict = "met" if efficiency >= TARGET else "missed"
    print(f"scaling efficiency (2 ranks x 1 thread / 1 rank x 2 threads): {efficiency:.3f} "
          f"(target >= {TARGET}: {verdict}); with gloo's all-reduce instead: {gloo / one:.3f}; against the "
          f"1-rank run with the contiguous buffer the 2 ranks keep: {two / contiguous:.3f}")  # fmt: skip
    if efficiency > 1.05:  # ranks cannot beat threads on the same cores by this much on a quiet machine
        print("  (above 1: one rank's 2 threads stall whenever the machine runs something else, as an op waits"
              " for its slowest thread; measure again on a quiet machine)")  # fmt: skip
    step_ms = 1000 * args.batch / two
    print(
        f"all-reduce of one step's gradients ({numel / 1e6:.2f}M fp32, {4 * numel / 2**20:.1f} MiB), 2 ranks:"
    )
    for name, seconds in reduce.items():
        print(f"  {name:<14}{1000 * seconds:>8.1f} ms = {1000 * seconds / step_ms:.1%} of a 2-rank step")
    if "deepspeed shm" not in reduce:
        print("  deepspeed shm: unavailable (its CPU op did not build here)")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "layouts": results, "rounds": rounds,
              "efficiency": efficiency, "efficiency_gloo": gloo / one, "efficiency_same_buffer": two / contiguous, "all_reduce_seconds": reduce, "numel": numel,
              "wall_seconds": time.time() - started}  # fmt: skip
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out / 'results.json'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
