"""Loader throughput against the trainer's demand, measured in one run on the same shards.

Prints samples/s of
    raw         tar iteration: headers scanned and file bytes read, nothing decoded
    pipeline    the full training stream (resampled shards, shuffle, decode, transforms, collate)
                with 0 (in the calling process), 1 and 2 loader workers
    remote      the same shards streamed from `python -m http.server` on 127.0.0.1 and through
                `pipe:cat`, raw and through the pipeline with 1 worker, against local files (target:
                >= 0.8x local)
    demand      the trainer: forward + backward + AdamW step of the chosen preset on batches taken
                from the pipeline, one process, no DeepSpeed
and the ratio pipeline(1 worker) / demand, whose target is >= 5x (the loader should never be what a
run waits for). Shards: --shards, or spoken digits built with data_pipelines.build_spoken_digits
(espeak-ng) into --out (a temporary directory by default).

    .venv/bin/python benchmarks/bench_loader.py                      # builds ~500 demo samples first
    .venv/bin/python benchmarks/bench_loader.py --shards data/demo/train --batches 30
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipelines import StreamConfig, build_loader, build_spoken_digits, expand_shards, iter_samples
from mmssl import data, engine
from mmssl.presets import get_preset
from mmssl.task import Task

TARGET = 5.0
REMOTE_TARGET = 0.8  # remote streams (1 worker) against local files (1 worker)


def stream_config(cfg: Any, shards: str, num_workers: int) -> StreamConfig:
    """The trainer's own training stream (mmssl.data.stream_config) over `shards` with `num_workers`."""
    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = num_workers
    return data.stream_config(cfg, train=True, shards=shards)


@contextlib.contextmanager
def http_server(root: str) -> Iterator[int]:
    """`python -m http.server` on 127.0.0.1 serving `root`, in its own process; yields its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", root],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the local http.server did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait()


def raw_rate(shards: str, min_samples: int, bar: tqdm) -> float:
    count, start = 0, time.perf_counter()
    while count < min_samples:
        for _sample in iter_samples(shards):
            count += 1
            if count % 256 == 0:
                bar.set_postfix_str(f"raw tar: {count} samples")
            if count >= min_samples:
                break
    return count / (time.perf_counter() - start)


def pipeline_rate(
    cfg: Any, shards: str, tokenizer: Any, num_workers: int, batches: int, bar: tqdm
) -> tuple[float, dict[str, Any]]:
    """Samples/s after the first batch (which pays for starting the workers and filling their queues)."""
    loader = iter(build_loader(stream_config(cfg, shards, num_workers), tokenizer=tokenizer))
    first = next(loader)
    start, count = time.perf_counter(), 0
    for i, batch in enumerate(itertools.islice(loader, batches)):
        count += len(batch["__key__"])
        if (i + 1) % 5 == 0:
            bar.set_postfix_str(f"pipeline, {num_workers} worker(s): batch {i + 1}/{batches}")
    return count / (time.perf_counter() - start), first


def demand_rate(cfg: Any, batch: dict[str, Any], steps: int, bar: tqdm) -> tuple[float, float]:
    """Samples/s of the preset's training step on a real batch; also returns the parameter count (M)."""
    torch.manual_seed(0)
    task = Task(cfg)
    optimizer = engine.build_optimizer(task, cfg)  # mmssl's AdamW (fused on CPU)
    batch = {k: v for k, v in batch.items() if not k.startswith("__") or k == "__key__"}

    def step() -> None:
        out = task(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, autograd graph caches
        step()
    start = time.perf_counter()
    for i in range(steps):
        step()
        bar.set_postfix_str(f"trainer step {i + 1}/{steps}")
    params = sum(p.numel() for p in task.parameters()) / 1e6
    return steps * len(batch["__key__"]) / (time.perf_counter() - start), params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="shards to read (default: build spoken digits)")
    p.add_argument("--out", help="where to build spoken digits (default: a temporary directory)")
    p.add_argument(
        "--limit", type=int, default=300, help="digit images for the built shards (2 samples each)"
    )
    p.add_argument("--preset", default="small", help="whose towers and batch size set the demand")
    p.add_argument("--batches", type=int, default=20, help="batches timed per pipeline setting")
    p.add_argument("--steps", type=int, default=5, help="training steps timed for the demand")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    cfg = get_preset(args.preset)
    tokenizer = data.tokenizer(cfg)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = args.shards
        if shards is None:
            out = Path(args.out or tmp)
            print(f"building spoken digits ({args.limit} images) in {out} ...", flush=True)
            shards = build_spoken_digits(out, limit=args.limit, samples_per_shard=100)["splits"]["train"][
                "pattern"
            ]
        batch_size = cfg.optim.micro_batch_size
        urls = expand_shards(shards)
        root = os.path.commonpath([os.path.dirname(u) for u in urls])
        figures: dict[str, float] = {}
        with http_server(root) as port, tqdm(total=10, desc="bench_loader", unit="phase") as bar:
            remote = {
                "http": ",".join(f"http://127.0.0.1:{port}/{os.path.relpath(u, root)}" for u in urls),
                "pipe": ",".join(f"pipe:cat {shlex.quote(u)}" for u in urls),
            }
            for name, spec in (("raw", shards), ("raw_http", remote["http"]), ("raw_pipe", remote["pipe"])):
                figures[name] = raw_rate(spec, args.batches * batch_size, bar)
                bar.update(1)
            for workers in (0, 1, 2):
                figures[f"pipeline_{workers}"], batch = pipeline_rate(
                    cfg, shards, tokenizer, workers, args.batches, bar
                )
                bar.update(1)
            for name, spec in remote.items():  # one worker, as the local figure it is held against
                figures[f"pipeline_1_{name}"], _ = pipeline_rate(cfg, spec, tokenizer, 1, args.batches, bar)
                bar.update(1)
            # local again, after the remote rows: the ratio holds against the mean of both local runs
            again, _ = pipeline_rate(cfg, shards, tokenizer, 1, args.batches, bar)
            figures["pipeline_1"] = (figures["pipeline_1"] + again) / 2
            bar.update(1)
            figures["demand"], params = demand_rate(cfg, batch, args.steps, bar)
            bar.update(1)

    ratio = figures["pipeline_1"] / figures["demand"]
    remote_ratio = {name: figures[f"pipeline_1_{name}"] / figures["pipeline_1"] for name in ("http", "pipe")}
    for name in ("http", "pipe"):
        figures[f"ratio_{name}"] = remote_ratio[name]
    load = os.getloadavg()[0]
    lines = [
        f"loader benchmark on {shards}",
        f"  batch {batch_size}, preset {args.preset!r} ({params:.1f}M parameters), torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} cores, load average {load:.1f} at the end",
        f"  {'raw tar iteration':<34}{figures['raw']:>10.0f} samples/s",
        f"  {'raw tar iteration, http':<34}{figures['raw_http']:>10.0f} samples/s",
        f"  {'raw tar iteration, pipe:cat':<34}{figures['raw_pipe']:>10.0f} samples/s",
        *(
            f"  {f'pipeline, {w} worker' + ('s' if w != 1 else ''):<34}{figures[f'pipeline_{w}']:>10.0f} samples/s"
            for w in (0, 1, 2)
        ),
        *(
            f"  {f'pipeline, 1 worker, {label}':<34}{figures[f'pipeline_1_{name}']:>10.0f} samples/s"
            f"  ({remote_ratio[name]:.2f}x local, "
            f"{figures[f'pipeline_1_{name}'] / figures['demand']:.1f}x demand; target >= {REMOTE_TARGET}x local: "
            + ("met)" if remote_ratio[name] >= REMOTE_TARGET else "NOT met)")
            for name, label in (("http", "http.server"), ("pipe", "pipe:cat"))
        ),
        f"  {'trainer demand (' + args.preset + ' step)':<34}{figures['demand']:>10.0f} samples/s",
        f"  pipeline(1 worker) / demand = {ratio:.1f}x (target >= {TARGET:.0f}x): "
        + ("met" if ratio >= TARGET else "NOT met"),
    ]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(
            json.dumps({**figures, "ratio": ratio, "load_average": load}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
