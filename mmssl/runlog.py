"""The run's record: a progress bar, TensorBoard scalars and ``metrics.jsonl``, written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class RunLog:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int):
        """A run that starts at step 0 starts its metrics afresh; a resumed one appends."""
        self.enabled = enabled
        self.run_dir = run_dir
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
            self._jsonl = open(run_dir / "metrics.jsonl", "a" if start_step else "w")  # noqa: SIM115 - kept open for the run
        self._last = (time.perf_counter(), start_step)

    def advance(self) -> None:
        self._bar.update(1)

    def log(self, step: int, scalars: dict[str, float], *, samples_per_step: int) -> dict:
        now = time.perf_counter()
        t0, s0 = self._last
        self._last = (now, step)
        row = {"step": step, **scalars}
        if step > s0:
            row["samples_per_s"] = samples_per_step * (step - s0) / (now - t0)
        self.rows.append(row)
        if self.enabled:
            for name, value in row.items():
                if name != "step":
                    self._writer.add_scalar(f"train/{name}", value, step)
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            self._bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row.get('samples_per_s', 0):.0f}")
        return row

    def write(self, message: str) -> None:
        if self.enabled:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
