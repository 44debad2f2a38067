"""One tiny trained run shared by the eval-CLI, export and API tests: synthetic shards (no espeak-ng),
`mmssl train` on 1 rank under ZeRO-3 for 2 steps (about 10 s), so its checkpoint is DeepSpeed's
partitioned format. Trained once per session whichever test module asks first."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

from data_pipelines import synthetic_samples, write_shards

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def tiny_run(base: Path) -> dict[str, Path | str]:
    train = write_shards(synthetic_samples(48, seed=1, image_size=32), base / "train", max_count=16)
    test = write_shards(synthetic_samples(24, seed=2, prefix="te", image_size=32), base / "test", max_count=8)
    run_dir = base / "run"
    command = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
        f"data.train_shards={train['pattern']}", f"data.eval_shards={test['pattern']}",
        "train.steps=2", "train.log_every=1", "optim.micro_batch_size=8", "optim.warmup_steps=1",
        "engine.zero_stage=3", "data.num_workers=0",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {"run_dir": run_dir, "train": train["pattern"], "test": test["pattern"]}
