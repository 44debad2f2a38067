"""Per-rank memory of model state under ZeRO 0/1/2/3 on 1, 2 and 4 CPU ranks: the 1/N fall, measured.

Each (preset, ZeRO stage, ranks) is its own process group: torchrun starts 2 or 4 ranks, a single rank
runs directly. Every rank builds the preset's task, wraps it in mmssl's engine (DeepSpeed, fp32, torch
AdamW, the repo's ds_config.json with the stage overridden), runs two training steps on a random batch
of the preset's shapes and counts the bytes of the tensors it holds between the second backward and
its optimizer step (``mmssl.memory.rank_state_bytes``: each storage once, in full):

    params   the parameters it holds (ZeRO-3: its partitions plus the small ones kept whole)
    grads    gradients, wherever ZeRO keeps them
    master   fp32 partitions the optimizer steps, where they are a copy of the weights
    Adam     the optimizer's two moments (and step counters)
    other    any further tensor the engine holds (ZeRO-3's reduce bucket); nothing else goes uncounted
    teacher  the EMA teacher of a *_distill preset (whole, fp32, on every rank; see mmssl/engine.py)

"at step" is the largest total seen inside the optimizer step (ZeRO flattens gradients there);
"peak RSS" is the rank's high-water mark of resident memory (imports and activations included).
Beside them: the textbook fp32 figure (4P params, 4P grads, 8P Adam, each divided by N once the
stage partitions it; no master copy) and DeepSpeed's own estimators, which assume 16-bit weights with
fp32 master weights and Adam (2P + 18P/N for ZeRO-2, 4L + 18P/N for ZeRO-3; there are none for 0/1).
"vs 1 rank" divides the total, and each of params / grads / optimizer (master + Adam), by the same
stage's 1-rank figure: 1/N is 0.50 on 2 ranks and 0.25 on 4.

The machine may be shared: a combination whose ranks would not fit in the memory free at its turn is
tried again after the others (waiting up to --wait seconds in all for memory to free), then skipped
with the reason; a launch that brings free memory below --floor-gib is stopped. Results go to
runs/bench_memory/ (results.json, table.md, per-rank records and logs).

    .venv/bin/python benchmarks/bench_memory.py                      # small and base: ~15-20 min here
    .venv/bin/python benchmarks/bench_memory.py --presets small --ranks 1 2
    .venv/bin/python benchmarks/bench_memory.py --presets small_masked small_distill --stages 2 3 --ranks 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20
KINDS = ("params", "grads", "master", "optim", "other", "teacher")
MICRO_BATCH = {"tiny": 2, "small": 2}  # larger presets: 1 (a base step is ~10 s of CPU per sample)

# Planning a launch's memory. A rank's peak resident memory is its overhead (interpreter, torch,
# DeepSpeed, open_clip, activations: measured on each preset's first launch) plus (a + b/N) x 4P bytes
# of model state and its transients, a and b per stage as measured on the base preset (stage 1-3 peaks
# come from the initial flattening, the full gradients of a backward and the flattening at the step).
STATE_PEAK = {0: (4.0, 0.0), 1: (0.6, 7.0), 2: (0.6, 7.5), 3: (2.0, 6.0)}
OVERHEAD_GUESS = int(1.5 * GiB)  # before a preset's first measurement
LAUNCHER = int(0.4 * GiB)  # torchrun's own process


# ---------------------------------------------------------------------------------------------------
# Worker: one rank of one (preset, stage, world size) run


def worker_config(preset: str, stage: int, micro_batch: int):
    from mmssl.presets import get_preset

    cfg = get_preset(preset)
    cfg.engine.zero_stage = stage
    cfg.engine.precision = "fp32"
    cfg.engine.ds_config = str(REPO / "ds_config.json")
    cfg.optim.micro_batch_size = micro_batch
    cfg.optim.grad_accum_steps = 1
    cfg.data.train_shards = "unused: random batches"
    return cfg.validate()


def random_batch(cfg, size: int, seed: int) -> dict[str, Any]:
    """A batch of the preset's shapes: image [B, 3, S, S], text ids [B, L], log-mel [B, F, T]."""
    from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID

    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    batch: dict[str, Any] = {}
    if m.image is not None:
        batch["image"] = torch.randn(size, 3, m.image.image_size, m.image.image_size, generator=g)
    if m.text is not None:
        text = torch.randint(1, 40000, (size, m.text.context_length), generator=g)
        text[:, 0], text[:, -1] = SOT_TOKEN_ID, EOT_TOKEN_ID
        batch["text"] = text
    if m.audio is not None:
        batch["audio"] = torch.randn(size, m.audio.n_mels, m.audio.n_frames, generator=g)
    batch["present"] = {k: torch.ones(size, dtype=torch.bool) for k in m.modalities}
    return batch


def peak_rss() -> int:
    """This process's high-water mark of resident memory, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def process_started() -> float:
    """When this process started (epoch seconds, Linux, to within a second): start-up cost is reported."""
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def worker(args: argparse.Namespace) -> None:
    from mmssl import engine, memory, ranks
    from mmssl.task import Task

    clock = {"started": process_started(), "imported": time.time()}
    cfg = worker_config(args.preset, args.stage, args.micro_batch)
    info = engine.init_distributed()
    clock["joined"] = time.time()
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    task = Task(cfg, rank=info.rank, world_size=info.world_size)
    eng = engine.Engine(task, cfg, info)
    clock["built"] = time.time()
    batch = random_batch(cfg, cfg.optim.micro_batch_size, seed=1000 + info.rank)

    # Snapshots inside the optimizer step: ZeRO steps its inner torch optimizer once per parameter
    # group, each after flattening that group's gradients.
    inner = getattr(eng.optimizer, "optimizer", eng.optimizer)
    at_step: list[int] = []
    measuring = False

    def snapshot(*_: Any) -> None:
        if measuring:
            at_step.append(memory.rank_state_bytes(eng)["total"])

    inner.register_step_pre_hook(snapshot)
    eng.train()
    for step in range(2):  # the first step creates Adam's moments; the second is measured
        out = eng(batch, step=step)
        eng.backward(out["loss"])
        if step == 1:
            held = memory.rank_state_bytes(eng)
            measuring = True
        eng.step()
        clock[f"step{step + 1}"] = time.time()
    measuring = False
    record = {
        "preset": args.preset,
        "stage": eng.zero_stage,
        "world_size": info.world_size,
        "rank": info.rank,
        "micro_batch": cfg.optim.micro_batch_size,
        "threads": torch.get_num_threads(),
        "held": held,
        "at_step_max_total": max(at_step, default=held["total"]),
        "after_step": memory.rank_state_bytes(eng),
        "peak_rss": peak_rss(),
        "loss": out["loss"].item(),
        "clock": clock,
    }
    Path(args.record).parent.mkdir(parents=True, exist_ok=True)
    Path(args.record).write_text(json.dumps(record, indent=2) + "\n")
    ranks.barrier()
    # Leave without tearing down: interpreter and process-group shutdown with torch, DeepSpeed and gloo
    # loaded took 4-11 s per launch here, and nothing is left to write.
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------
# Parent: plan, launch, collect, tabulate


def textbook_fp32(params: int, stage: int, n: int) -> int:
    """ZeRO's fp32 accounting with no master copy: 8P Adam (split from stage 1), 4P grads (from stage 2),
    4P params (from stage 3)."""
    adam = 8 * params / (n if stage >= 1 else 1)
    grads = 4 * params / (n if stage >= 2 else 1)
    weights = 4 * params / (n if stage >= 3 else 1)
    return int(adam + grads + weights)


def planned_bytes(params: int, stage: int, n: int, overhead: int) -> int:
    a, b = STATE_PEAK[stage]
    return int(n * (overhead + (a + b / n) * 4 * params) + (LAUNCHER if n > 1 else 0))


def meminfo(field: str = "MemAvailable") -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")


def preset_facts(preset: str, ranks: list[int]) -> dict[str, Any]:
    """Parameter counts and DeepSpeed's estimates, from the task built on the meta device (no memory)."""
    from mmssl import memory
    from mmssl.task import Task

    with torch.device("meta"):
        task = Task(worker_config(preset, 0, 1))
    estimates = {n: memory.zero_state_estimates(task, n) for n in ranks}
    first = estimates[ranks[0]]
    return {
        "params": first["params"],
        "largest_layer_params": first["largest_layer_params"],
        "ds_estimate": {n: {2: e["zero2"], 3: e["zero3"]} for n, e in estimates.items()},
    }


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launch and every process under it. torchrun starts each rank in a session of its own, so
    killing the launch's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [proc.pid], [proc.pid]
    while todo:
        found = children.get(todo.pop(), [])
        tree += found
        todo += found
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def launch(preset: str, stage: int, n: int, micro_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one process group to the end (or kill it: time out, memory low) and read its rank records."""
    tag = f"{preset}_zero{stage}_n{n}"
    out = args.out
    records = [out / "ranks" / f"{tag}_rank{r}.json" for r in range(n)]
    for path in records:
        path.unlink(missing_ok=True)
    rank_args = [
        __file__, "--worker", "--preset", preset, "--stage", str(stage), "--micro-batch", str(micro_batch),
        "--record", str(out / "ranks" / f"{tag}_rank{{rank}}.json"),
    ]  # fmt: skip
    if n == 1:  # a rank started directly makes its own one-rank group (mmssl.engine.init_distributed)
        command = [sys.executable, *rank_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        command += rank_args
    # one thread per rank, also for a single rank: on this shared 2-core machine 2 threads ran slower
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if "TORCH_EXTENSIONS_DIR" not in env:
        # DeepSpeed's shm comm op, built once for this venv: venvs sharing the default folder rewrite its
        # build.ninja with their own paths and rebuild it on each other's next use (2 min here)
        venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        env["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"venv-{venv}")
    log = out / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stopped = None
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while proc.poll() is None:
                if time.time() - start > args.timeout:
                    stopped = f"timed out after {args.timeout:.0f} s"
                elif meminfo() < args.floor_gib * GiB:
                    stopped = f"stopped: free memory fell below {args.floor_gib} GiB"
                if stopped:
                    kill_tree(proc)
                    break
                time.sleep(0.5)
        except BaseException:  # Ctrl-C: leave no rank behind
            kill_tree(proc)
            raise
    seconds = time.time() - start
    if stopped or proc.returncode != 0 or not all(path.is_file() for path in records):
        reason = stopped or f"exit code {proc.returncode}"
        tail = log.read_text(errors="replace").splitlines()[-12:]
        return {
            "status": "failed",
            "reason": f"{reason} ({log})",
            "log_tail": tail,
            "seconds": round(seconds, 1),
        }
    ranks = [json.loads(path.read_text()) for path in records]
    # where the time went: process start-up, imports, joining the group, building, two steps, teardown
    c = ranks[0]["clock"]
    phases = {
        "spawn": c["started"] - start,
        "imports": c["imported"] - c["started"],
        "join": c["joined"] - c["imported"],
        "build": c["built"] - c["joined"],
        "step1": c["step1"] - c["built"],
        "step2": c["step2"] - c["step1"],
        "teardown": start + seconds - c["step2"],
    }
    return {
        "status": "ok",
        "ranks": ranks,
        "seconds": round(seconds, 1),
        "phases": {k: round(v, 1) for k, v in phases.items()},
    }


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """The largest figure over ranks for each kind (the memory each rank must be provisioned with)."""
    ranks = run["ranks"]
    held = {k: max(r["held"][k] for r in ranks) for k in (*KINDS, "total")}
    return {
        **held,
        "at_step": max(r["at_step_max_total"] for r in ranks),
        "peak_rss": max(r["peak_rss"] for r in ranks),
        "other_top": ranks[0]["held"]["other_top"],
    }


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def table(results: list[dict[str, Any]], facts: dict[str, dict[str, Any]]) -> str:
    """A markdown table per preset; sizes are MiB per rank (the largest over ranks)."""
    head = (
        "| ZeRO | ranks | params | grads | master | Adam | other | teacher | total | vs 1 rank | params / grads / optim "
        "| textbook fp32 | DeepSpeed est. | at step | peak RSS |"
    )
    lines = []
    for preset, f in facts.items():
        p = f["params"]
        lines += [
            f"**{preset}**: {p / 1e6:.2f}M parameters ({mib(4 * p)} MiB in fp32), largest layer "
            f"{f['largest_layer_params'] / 1e6:.2f}M, micro-batch {f['micro_batch']}; MiB per rank",
            "",
            head,
            "|" + "---|" * (head.count("|") - 1),
        ]
        ok = [r for r in results if r["preset"] == preset and r["status"] == "ok"]
        one = {r["stage"]: r["summary"] for r in ok if r["world_size"] == 1}
        for r in (r for r in results if r["preset"] == preset):
            stage, n = r["stage"], r["world_size"]
            expected = [mib(textbook_fp32(p, stage, n)), mib(f["ds_estimate"][n].get(stage))]
            if r["status"] != "ok":  # the reason under "params", the expectations in their columns
                cells = [f"{r['status']}: {r['reason']}"] + [""] * 8 + expected + ["", ""]
                lines.append(f"| {stage} | {n} | " + " | ".join(cells) + " |")
                continue
            s = r["summary"]
            ratio, parts = "-", "-"
            if stage in one:
                base = one[stage]

                def rel(*keys: str, s=s, base=base) -> str:
                    den = sum(base[k] for k in keys)
                    return f"{sum(s[k] for k in keys) / den:.2f}" if den else "-"

                ratio = rel("total")
                parts = " / ".join((rel("params"), rel("grads"), rel("master", "optim")))
            cells = [mib(s[k]) for k in (*KINDS, "total")] + [ratio, parts, *expected]
            cells += [mib(s["at_step"]), mib(s["peak_rss"])]
            lines.append(f"| {stage} | {n} | " + " | ".join(cells) + " |")
        others = {(name, nbytes) for r in ok for name, nbytes in r["summary"]["other_top"] if nbytes > MiB}
        for name, nbytes in sorted(others):
            lines.append(f"\nother: `{name}` ({mib(nbytes)} MiB)")
        lines.append("")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["small", "base"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument(
        "--micro-batch", type=int, help="per rank (default: 2 for tiny/small, 1 for larger presets)"
    )
    p.add_argument(
        "--margin-gib", type=float, default=1.0, help="memory a launch must leave free, as planned"
    )
    p.add_argument(
        "--floor-gib", type=float, default=0.75, help="stop a launch if free memory falls below this"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait in all for memory to free")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_memory")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    return p.parse_args()


def run_plan(
    plan: list[tuple[str, int, int]], facts: dict[str, dict[str, Any]], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Launch every (preset, stage, ranks) of ``plan`` that fits in free memory; returns a row per
    combination, in plan order, and each preset's measured per-rank overhead."""
    overhead: dict[str, int] = {}  # per preset, measured on its first launch

    def planned(preset: str, stage: int, n: int) -> int:
        return planned_bytes(facts[preset]["params"], stage, n, overhead.get(preset, OVERHEAD_GUESS))

    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    bar = tqdm(total=len(plan), unit="launch", dynamic_ncols=True)
    # The machine is shared: a combination that does not fit now is tried again after the others, then
    # (if it could fit on a quieter machine) waits up to --wait seconds in all for memory to free.
    deferred: list[tuple[str, int, int]] = []
    for last_pass, queue in ((False, plan), (True, deferred)):
        wait_until = time.time() + args.wait
        for preset, stage, n in sorted(queue, key=lambda item: planned(*item)) if last_pass else queue:
            bar.set_description(f"{preset} ZeRO-{stage} x{n}")
            f = facts[preset]
            row: dict[str, Any] = {"preset": preset, "stage": stage, "world_size": n}
            need = planned(preset, stage, n)
            free = meminfo() - int(args.margin_gib * GiB)
            if need > free and not last_pass:
                deferred.append((preset, stage, n))
                continue
            if need <= 0.7 * meminfo("MemTotal"):
                while need > free and time.time() < wait_until:
                    bar.set_description(f"{preset} ZeRO-{stage} x{n}: waiting for memory")
                    time.sleep(5)
                    free = meminfo() - int(args.margin_gib * GiB)
            if need > free:
                reason = f"needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
                row |= {"status": "skipped", "reason": reason}
                tqdm.write(
                    f"skip {preset} ZeRO-{stage} on {n} ranks: {reason} (after a {args.margin_gib} GiB margin)"
                )
            else:
                row |= launch(preset, stage, n, f["micro_batch"], args) | {"planned_bytes": need}
                if row["status"] == "ok":
                    row["summary"] = s = summarise(row)
                    if preset not in overhead:  # peak RSS beyond the model state and its transients
                        a, b = STATE_PEAK[stage]
                        overhead[preset] = int(s["peak_rss"] - (a + b / n) * 4 * f["params"])
                else:
                    tqdm.write(
                        f"{preset} ZeRO-{stage} on {n} ranks failed: {row['reason']}\n  "
                        + "\n  ".join(row["log_tail"])
                    )
            results[preset, stage, n] = row
            bar.update(1)
    bar.close()
    return [results[item] for item in plan], overhead


def main() -> None:
    args = parse_args()
    if args.worker:
        args.record = args.record.replace("{rank}", os.environ.get("RANK", "0"))
        worker(args)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    ranks = sorted(args.ranks)
    facts = {preset: preset_facts(preset, ranks) for preset in args.presets}
    for preset, f in facts.items():
        f["micro_batch"] = args.micro_batch or MICRO_BATCH.get(preset, 1)
    # stage 0 on one rank first: it needs least and measures the preset's per-rank overhead
    plan = [(preset, stage, n) for preset in args.presets for stage in sorted(args.stages) for n in ranks]
    started = time.time()
    results, overhead = run_plan(plan, facts, args)

    text = table(results, facts)
    seconds = time.time() - started
    print(f"\n{text}\n{len(plan)} combinations in {seconds / 60:.1f} min")
    (args.out / "results.json").write_text(
        json.dumps(
            {"facts": facts, "overhead": overhead, "results": results, "seconds": round(seconds)}, indent=2
        )
        + "\n"
    )
    (args.out / "table.md").write_text(text)
    print(f"written: {args.out / 'results.json'}, {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
