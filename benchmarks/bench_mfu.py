"""Throughput and MFU of mmssl's own trainer, as a user runs it, for the tiny and small presets and the
full trimodal + masked-objective step.

Each configuration is one ``mmssl train`` run on the spoken-digits demo (DeepSpeed, ``--nproc`` CPU
ranks, one thread each by default); its own log rows after the warm-up give samples/s and MFU: model
FLOPs per sample (``mmssl/flops.py``, checked against torch's FLOP counter) x samples/s per rank over
the peak of one rank's threads, measured by a matmul probe at the start of that run (not the cached
figure: a shared machine's speed drifts; the peak column shows it). Configurations alternate round
by round and medians are reported. Compared step times: the trimodal + masked step (``small_masked``) against
plain unmasked CLIP on the same preset, both as trimodal contrastive (``small``) and as image-text
only (``small``, ``model.audio=null``).

    .venv/bin/python benchmarks/bench_mfu.py                      # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_mfu.py --rounds 1 --steps 20  # a quick look

Targets: small preset MFU >= 70% of the probed matmul peak on 2 ranks; the trimodal + masked step <= 0.6x
the plain trimodal step (FLIP reports 2-3x from masking). ``profile_step.py`` shows where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": ("tiny", []),
    "small": ("small", []),
    "small image-text CLIP": ("small", ["model.audio=null"]),
    "small_masked (trimodal + masked)": ("small_masked", []),
}
MFU_TARGET = 0.70
MASKED_TARGET = 0.6  # small_masked's step over small's (trimodal, unmasked)


def steady_rows(
    command: list[str], env: dict, run_dir: Path, log: Path, *, warmup: int, what: str
) -> list[dict]:
    """Run one ``mmssl train`` ``command`` (output to ``log``) and return its logged rows after ``warmup``
    steps that carry throughput, but the last (it also covers the checkpoint save)."""
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed; see {log}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["step"] > warmup and "samples_per_s" in r]
    return kept[:-1] if len(kept) > 1 else kept


def run(name: str, args: argparse.Namespace, out: Path, k: int) -> dict:
    preset, overrides = CONFIGS[name]
    run_dir = out / f"{name.split()[0]}-{len(overrides)}-{k}"
    command = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", preset, "--nproc", str(args.nproc),
        "--run-dir", str(run_dir), f"data.train_shards={args.shards / 'train'}",
        f"train.steps={args.warmup + args.steps}", f"train.log_every={args.log_every}",
        f"train.ckpt_every={10 * (args.warmup + args.steps)}", "train.eval_at_end=false", *overrides,
    ]  # fmt: skip
    # a fresh peak probe in every run (no cache): MFU is against what the machine gives right now
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MMSSL_CACHE": str(run_dir / "peak")}
    log = out / f"{run_dir.name}.log"
    kept = steady_rows(command, env, run_dir, log, warmup=args.warmup, what=f"bench: {name}")
    summary = json.loads((run_dir / "summary.json").read_text())
    batch = json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"]
    peak = re.search(r"peak ([\d.]+) GFLOP/s per rank", log.read_text())
    return {
        "peak_gflops": float(peak.group(1)) if peak else None,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in kept),
        "mfu": statistics.median(r["mfu"] for r in kept),
        "data_wait": statistics.median(r["data_wait"] for r in kept),
        "batch": batch,
        "world_size": summary["world_size"],
        "load": os.getloadavg()[0],
    }


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.barh(names, [100 * table[n]["mfu"] for n in names])
    left.axvline(100 * MFU_TARGET, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("MFU, % of the measured peak")
    right.barh(names, [table[n]["ms_per_step"] for n in names])
    right.set_xlabel("ms per step")
    right.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks (the demo's 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--warmup", type=int, default=10, help="steps not measured (a multiple of --log-every)")
    p.add_argument("--steps", type=int, default=40, help="measured steps")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    p.add_argument(
        "--shards", type=Path, default=REPO / "data" / "demo", help="spoken-digits build (made if missing)"
    )
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_mfu")
    args = p.parse_args()
    if not (args.shards / "DONE.json").is_file():
        from data_pipelines.demo import build_spoken_digits

        build_spoken_digits(args.shards, progress=True)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    from mmssl import flops
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset

    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    bar = tqdm(total=args.rounds * len(CONFIGS), desc="runs", unit="run")
    for k in range(args.rounds):
        for name in CONFIGS:
            bar.set_postfix_str(name)
            results[name].append(run(name, args, out, k))
            bar.update(1)
    bar.close()

    print(f"\nmmssl train --nproc {args.nproc}, {args.threads} thread(s) per rank, demo data, fp32 CPU; "
          f"medians over {args.rounds} round(s) of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(
        f"{'configuration':<34}{'MFLOP/sample':>13}{'samples/s':>11}{'ms/step':>9}{'MFU':>7}{'data wait':>11}"
        f"{'peak GFLOP/s':>14}"
    )
    table = {}
    for name, runs in results.items():
        preset, overrides = CONFIGS[name]
        cfg = apply_overrides(get_preset(preset), overrides).validate()
        batch, world = runs[0]["batch"], runs[0]["world_size"]
        per_sample = flops.train_flops_per_sample(cfg, cfg.optim.micro_batch_size * world)
        sps = statistics.median(r["samples_per_s"] for r in runs)
        row = {
            "mflop_per_sample": per_sample / 1e6,
            "samples_per_s": sps,
            "ms_per_step": 1000 * batch / sps,
            "mfu": statistics.median(r["mfu"] for r in runs),
            "data_wait": statistics.median(r["data_wait"] for r in runs),
            "peak_gflops": statistics.median(r["peak_gflops"] or 0.0 for r in runs),
            "runs": runs,
        }
        table[name] = row
        print(f"{name:<34}{row['mflop_per_sample']:>13.1f}{sps:>11.1f}{row['ms_per_step']:>9.0f}"
              f"{row['mfu']:>7.1%}{row['data_wait']:>11.1%}{row['peak_gflops']:>14.1f}")  # fmt: skip
    masked = table["small_masked (trimodal + masked)"]["ms_per_step"]
    small_mfu = table["small"]["mfu"]
    print(
        f"\nsmall preset MFU {small_mfu:.1%} (target >= {MFU_TARGET:.0%}: {'met' if small_mfu >= MFU_TARGET else 'missed'})"
    )
    ratio = masked / table["small"]["ms_per_step"]
    verdict = "met" if ratio <= MASKED_TARGET else "missed"
    print(f"trimodal + masked step / small step = {ratio:.2f} (target <= {MASKED_TARGET}: {verdict})")
    ratio = masked / table["small image-text CLIP"]["ms_per_step"]
    print(f"trimodal + masked step / small image-text CLIP step = {ratio:.2f}")
    plot(table, out / "mfu.png")
    (out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table}, indent=2)
    )
    print(f"\nwritten: {out / 'results.json'}, {out / 'mfu.png'}")


if __name__ == "__main__":
    main()
