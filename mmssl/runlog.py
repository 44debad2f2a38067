"""The run's record: progress on screen, TensorBoard scalars and ``metrics.jsonl``, written by rank 0 only.

On a terminal progress is a tqdm bar; anywhere else (SLURM, nohup, CI, ``| tee``) it is one plain line
per logging step, so a log file holds no carriage-return redraws.

Every logged row carries the throughput figures a user compares systems by: samples/s (global and
per rank), tokens/s per modality, the share of wall time spent waiting for data, and MFU (model
FLOPs per sample x samples/s per rank / the device's peak; see ``mmssl/flops.py``).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass(frozen=True)
class Throughput:
    samples_per_step: int  # global
    world_size: int
    peak_flops: float | None  # one rank's device


class Work:
    """FLOPs and tokens this rank has put through its towers since the last log row. Counted per batch
    from tensor shapes (a text batch may be trimmed below the context), so counting never waits on the
    device."""

    def __init__(
        self,
        flops_per_sample: Callable[[int | None], float],
        tokens_per_sample: dict[str, int],
        tuning_flops_per_sample: Callable[[int | None], float] | None = None,
    ):
        self.flops_per_sample = functools.cache(flops_per_sample)  # by text length (None: the context)
        # the same during FLIP's unmasked tuning (whole inputs, no masked objective), when it differs
        self.tuning_flops_per_sample = functools.cache(tuning_flops_per_sample or flops_per_sample)
        self._tokens = tokens_per_sample
        self.flops, self.tokens = 0.0, {m: 0 for m in tokens_per_sample}

    def add(self, batch: dict[str, Any], *, tuning: bool = False) -> None:
        """Count one micro-batch; ``tuning``: trained in the unmasked-tuning phase."""
        rows = len(batch["__key__"])
        text = batch["text"].shape[1] if "text" in batch else None
        self.flops += rows * (self.tuning_flops_per_sample if tuning else self.flops_per_sample)(text)
        for m, n in self._tokens.items():
            self.tokens[m] += rows * (text if m == "text" and text is not None else n)

    def take(self) -> dict[str, float]:
        """``{"flops_done", "tokens_done_<modality>"}`` so far, and start counting afresh."""
        done = {"flops_done": self.flops, **{f"tokens_done_{m}": float(n) for m, n in self.tokens.items()}}
        self.flops, self.tokens = 0.0, {m: 0 for m in self._tokens}
        return done


def on_terminal() -> bool:
    """Standard output is a terminal a person watches (not a file or a pipe)."""
    return sys.stdout.isatty()


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        throughput: Throughput,
        interactive: bool | None = None,
    ):
        """A run that starts at step 0 starts its metrics afresh; a resumed one appends. ``interactive``
        (default: stdout is a terminal) draws a progress bar instead of plain lines."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.throughput = throughput
        self.total_steps = total_steps
        self.interactive = on_terminal() if interactive is None else interactive
        self.rows: list[dict] = []
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (enabled and self.interactive),
            dynamic_ncols=True,
        )
        self._writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tb"))
            self._jsonl = open(run_dir / "metrics.jsonl", "a" if start_step else "w")  # noqa: SIM115 - kept open
        self._last = self._start = (time.perf_counter(), start_step)
        self._warned_mfu = False

    def advance(self) -> None:
        self._bar.update(1)

    def rates(
        self, steps: int, seconds: float, data_wait_seconds: float, done: dict[str, float]
    ) -> dict[str, float]:
        """``done``: rank-averaged ``Work.take()`` over the same window."""
        t = self.throughput
        samples_per_s = t.samples_per_step * steps / seconds
        per_rank = samples_per_s / t.world_size
        out = {"samples_per_s": samples_per_s, "samples_per_s_per_rank": per_rank}
        for name, tokens in done.items():
            if name.startswith("tokens_done_"):
                out[f"tokens_per_s_{name.removeprefix('tokens_done_')}"] = tokens * t.world_size / seconds
        out["data_wait"] = min(1.0, data_wait_seconds / seconds)
        if t.peak_flops and "flops_done" in done:
            out["mfu"] = done["flops_done"] / seconds / t.peak_flops
        return out

    def log(self, step: int, scalars: dict[str, float]) -> dict:
        """``scalars`` are rank-averaged; among them ``data_wait_seconds`` (each rank's time blocked on the
        loader) and ``Work.take()``'s counts, since the previous log."""
        now = time.perf_counter()
        t0, s0 = self._last
        self._last = (now, step)
        wait = scalars.pop("data_wait_seconds", 0.0)
        done = {k: scalars.pop(k) for k in list(scalars) if k == "flops_done" or k.startswith("tokens_done_")}
        row = {"step": step, **scalars}
        if step > s0:
            row.update(self.rates(step - s0, now - t0, wait, done))
        self.rows.append(row)
        if row.get("mfu", 0.0) > MFU_CEILING and not self._warned_mfu:
            self._warned_mfu = True
            self.write(
                f"warning: MFU {row['mfu']:.0%} is above 100%: the peak it is measured against "
                f"({self.throughput.peak_flops / 1e9:.1f} GFLOP/s per rank) read low. On CPU it is a matmul "
                "probe cached in $MMSSL_CACHE/cpu_peak.json (default ~/.cache/mmssl): delete it to probe "
                "again. metrics.jsonl keeps the ratio; the log shows >100%"
            )
        if self.enabled:
            for name, value in row.items():
                if name != "step":
                    self._writer.add_scalar(f"train/{name}", value, step)
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            if self.interactive:
                postfix = {"loss": f"{row['loss']:.3f}", "sps": f"{row.get('samples_per_s', 0):.0f}"}
                if "mfu" in row:
                    postfix["mfu"] = mfu_text(row["mfu"])
                self._bar.set_postfix(postfix)
            else:
                self.write(self.line(row, now))
        return row

    def line(self, row: dict, now: float) -> str:
        """A logged row as one plain line: step/total, loss, samples/s, MFU, data wait, ETA."""
        parts = [f"step {row['step']}/{self.total_steps}", f"loss {row['loss']:.4f}"]
        if "samples_per_s" in row:
            parts.append(f"{row['samples_per_s']:.0f} samples/s")
        if "mfu" in row:
            parts.append(f"MFU {mfu_text(row['mfu'])}")
        if "data_wait" in row:
            parts.append(f"data wait {row['data_wait']:.0%}")
        t0, s0 = self._start
        if row["step"] > s0:
            left = (now - t0) / (row["step"] - s0) * (self.total_steps - row["step"])
            parts.append(f"ETA {duration(left)}")
        return ", ".join(parts)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self._bar.close()
        if self.enabled:
            self._writer.close()
            self._jsonl.close()


# No step does more work than its device's peak: a ratio above this says the peak read low, not that
# the run is fast (a CPU probe timed while another rank started up read 5x low once: MFU 450-490%)
MFU_CEILING = 1.0


def mfu_text(mfu: float) -> str:
    """``"41.3%"``, or ``">100%"`` above :data:`MFU_CEILING` (the figure is not believable)."""
    return f"{mfu:.1%}" if mfu <= MFU_CEILING else f">{MFU_CEILING:.0%}"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
