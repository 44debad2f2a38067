"""The run's record: a progress bar, TensorBoard scalars and ``metrics.jsonl``, written by rank 0 only.

Every logged row carries the throughput figures a user compares systems by: samples/s (global and
per rank), tokens/s per modality, the share of wall time spent waiting for data, and MFU (model
FLOPs per sample x samples/s per rank / the device's peak; see ``mmssl/flops.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Throughput:
    samples_per_step: int  # global
    world_size: int
    flops_per_sample: float  # forward + backward
    peak_flops: float | None  # one rank's device
    tokens_per_sample: dict[str, int]


class RunLog:
    def __init__(
        self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, throughput: Throughput
    ):
        """A run that starts at step 0 starts its metrics afresh; a resumed one appends."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.throughput = throughput
        self.rows: list[dict] = []
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
        )
        self._writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tb"))
            self._jsonl = open(run_dir / "metrics.jsonl", "a" if start_step else "w")  # noqa: SIM115 - kept open
        self._last = (time.perf_counter(), start_step)

    def advance(self) -> None:
        self._bar.update(1)

    def rates(self, steps: int, seconds: float, data_wait_seconds: float) -> dict[str, float]:
        t = self.throughput
        samples_per_s = t.samples_per_step * steps / seconds
        per_rank = samples_per_s / t.world_size
        out = {"samples_per_s": samples_per_s, "samples_per_s_per_rank": per_rank}
        out.update({f"tokens_per_s_{m}": samples_per_s * n for m, n in t.tokens_per_sample.items()})
        out["data_wait"] = min(1.0, data_wait_seconds / seconds)
        if t.peak_flops:
            out["mfu"] = t.flops_per_sample * per_rank / t.peak_flops
        return out

    def log(self, step: int, scalars: dict[str, float]) -> dict:
        """``scalars`` are rank-averaged; a ``data_wait_seconds`` among them is each rank's time blocked
        on the loader since the previous log."""
        now = time.perf_counter()
        t0, s0 = self._last
        self._last = (now, step)
        wait = scalars.pop("data_wait_seconds", 0.0)
        row = {"step": step, **scalars}
        if step > s0:
            row.update(self.rates(step - s0, now - t0, wait))
        self.rows.append(row)
        if self.enabled:
            for name, value in row.items():
                if name != "step":
                    self._writer.add_scalar(f"train/{name}", value, step)
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            postfix = {"loss": f"{row['loss']:.3f}", "sps": f"{row.get('samples_per_s', 0):.0f}"}
            if "mfu" in row:
                postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
            self._bar.set_postfix(postfix)
        return row

    def write(self, message: str) -> None:
        if self.enabled:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
