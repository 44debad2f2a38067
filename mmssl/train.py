"""The training loop: fetch a batch, forward, loss, backward, step; logging, checkpoints and the final
evaluation on their own cadence. Runs identically on 1 or N ranks; the launcher decides which.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from data_pipelines import BAD_KINDS, combine_states
from data_pipelines.remote import mask
from mmssl import accumulate, data, engine, flops, ranks
from mmssl.config import RunConfig, save_json
from mmssl.eval import report
from mmssl.eval.run import run_eval
from mmssl.lock import describe
from mmssl.model import MultimodalModel
from mmssl.objectives.distill import collapse
from mmssl.pretrained import initialize
from mmssl.runlog import RunLog, Throughput, Work
from mmssl.task import Task


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors (also in nested dicts such as the presence masks) to the device; floats to the engine dtype."""
    if isinstance(batch, dict):
        return {name: to_device(value, device, dtype) for name, value in batch.items()}
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(dtype) if batch.is_floating_point() else batch
    return batch


def train_step(
    eng: engine.Engine, batch: dict[str, Any], *, step: int, micro: int, poison: bool = False
) -> dict[str, torch.Tensor] | None:
    """One micro-batch: forward, loss, backward, optimizer step (at an accumulation boundary). Returns
    the task's outputs plus ``stepped``, or None when the window it ends is skipped: a loss in it was
    not finite on some rank, so no rank changed a weight or the optimizer state. The finiteness is
    watched on the device and checked once per window, at its boundary: no host sync per micro-batch."""
    out = eng(batch, step=step, micro=micro)
    if poison:  # a fault drill (train.inject_nonfinite_at)
        out["loss"] = out["loss"] * float("nan")
    eng.backward(out["loss"])
    outcome = eng.step()
    if outcome == "skipped":
        return None
    out["stepped"] = outcome == "stepped"
    return out


class KeyLog:
    """``RUN_DIR/keys/rank<r>.jsonl``: one line per micro-batch this rank trained on (or skipped), with the
    optimizer step it belongs to; a resumed run first writes ``{"resumed_at": step}``."""

    def __init__(self, run_dir: Path, rank: int, *, resumed_at: int | None):
        (run_dir / "keys").mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "keys" / f"rank{rank}.jsonl", "a" if resumed_at else "w")  # noqa: SIM115
        if resumed_at:
            self.file.write(json.dumps({"resumed_at": resumed_at}) + "\n")

    def write(self, step: int, keys: list[str], *, skipped: bool) -> None:
        self.file.write(json.dumps({"step": step, "keys": keys, "skipped": skipped}) + "\n")
        self.file.flush()


def bad_data_totals(loader: Any) -> dict[str, int]:
    """Bad samples skipped so far, summed over ranks, by kind (non-zero kinds only)."""
    totals = ranks.all_reduce_sum({k: loader.bad_data.counts.get(k, 0) for k in BAD_KINDS})
    return {k: v for k, v in totals.items() if v}


def report_data_warnings(rank: int) -> None:
    """Bad-data reports (shard, key, reason) from the loader, above the progress bar, naming the rank."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    handler.setStream(_TqdmStream())
    logger = logging.getLogger("data_pipelines")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


class _TqdmStream:
    """Lines above a progress bar when one is drawn; plain lines on stdout when none is (a batch log)."""

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip())

    def flush(self) -> None:
        sys.stdout.flush()  # a log file read while the run goes shows each warning as it comes


def train(cfg: RunConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` on the ranks the launcher started (or one), evaluate at the end, return the summary."""
    trainer = Trainer(cfg, resume=resume)
    trainer.run()
    return trainer.finish()


class Trainer:
    """One run's state between its steps: the engine, the loader, the logs, and the counters the loop keeps.
    ``run()`` is the loop; everything else is a step of it, on its own cadence."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None):
        self.cfg = cfg
        self.info = info = engine.init_distributed()
        report_data_warnings(info.rank)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.task = self.build_task()
        if not resume:  # a resumed run's checkpoint holds every weight
            initialize(self.task, cfg, show=info.is_main)
        self.eng = engine.Engine(self.task, cfg, info)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_json(cfg, self.run_dir / "config.json")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.eng.ds_config, indent=2) + "\n")
        self.step, data_state, state = 0, None, {}
        if resume:
            state = self.eng.load(self.ckpt_dir, None if resume == "latest" else resume)
            self.step, data_state = int(state["step"]), state.get("data")
        self.log, self.work = self.start_log()
        if state.get("teacher_from_student"):
            self.log.write(
                f"step {self.step}: the checkpoint holds no EMA teacher: it starts from the student"
            )
        # a resumed loader continues at the next sample this run had not consumed
        self.loader = data.loader(
            cfg, train=True, rank=info.rank, world_size=info.world_size, resume=data_state
        )
        self.keys = (
            KeyLog(self.run_dir, info.rank, resumed_at=self.step if resume else None)
            if cfg.train.record_keys
            else None
        )
        # the unit trained (or skipped) at once: a micro-batch, or under cached accumulation a whole window
        self.cached = cfg.objectives.contrastive.accumulate == "cached"
        self.unit = cfg.optim.grad_accum_steps if self.cached else 1
        self.micro, self.attempts, self.bad_in_a_row, self.skipped, self.data_wait = 0, 0, 0, 0, 0.0
        self.window_keys: list[list[str]] = []  # the keys of the window under way (written when it ends)
        self.first_loss, self.last, self.elapsed = None, {}, 0.0

    def start_log(self) -> tuple[RunLog, Work]:
        cfg, info = self.cfg, self.info
        samples_per_step = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * info.world_size
        peak, peak_source = flops.device_peak(info.device)
        global_batch = cfg.optim.micro_batch_size * info.world_size
        throughput = Throughput(
            samples_per_step=samples_per_step, world_size=info.world_size, peak_flops=peak
        )
        work = self.work_counter(global_batch)
        log = RunLog(
            self.run_dir, enabled=info.is_main, total_steps=cfg.train.steps, start_step=self.step,
            throughput=throughput,
        )  # fmt: skip
        log.write(
            f"{self.headline()}: {describe(self.task)}, "
            f"{info.world_size} rank(s) on {info.device.type}, ZeRO-{self.eng.zero_stage}, "
            f"{samples_per_step} samples/step, steps {self.step}->{cfg.train.steps}; "
            f"{work.flops_per_sample(None) / 1e6:.1f} MFLOP/sample, peak {_flops(peak)} per rank ({peak_source})"
        )
        if cfg.objectives.unmasked_tuning_steps:
            log.write(
                f"unmasked tuning (FLIP): masked objectives off, whole inputs, from step "
                f"{cfg.train.steps - cfg.objectives.unmasked_tuning_steps + 1} to {cfg.train.steps} "
                f"({work.tuning_flops_per_sample(None) / 1e6:.1f} MFLOP/sample)"
            )
        return log, work

    def build_task(self) -> nn.Module:
        """The module the engine wraps: the pretraining task (a fine-tuning trainer builds its own)."""
        return Task(self.cfg, rank=self.info.rank, world_size=self.info.world_size)

    def headline(self) -> str:
        return f"training {self.cfg.preset}"

    def work_counter(self, global_batch: int) -> Work:
        """FLOPs and tokens per sample of what the task runs, for the throughput and MFU columns."""
        cfg, tuned = self.cfg, flops.unmasked_tuning_config(self.cfg)
        return Work(
            lambda text: flops.train_flops_per_sample(cfg, global_batch, text),
            flops.tower_tokens(cfg),
            lambda text: flops.train_flops_per_sample(tuned, global_batch, text),
        )

    def evaluate(self) -> tuple[dict | None, Exception | None, str | None]:
        """The evaluation at the end (see :func:`evaluate_at_end`)."""
        return evaluate_at_end(self.task, self.eng, self.cfg, self.info, progress=self.log.interactive)

    def run(self) -> None:
        cfg, stream = self.cfg, iter(self.loader)
        start = time.perf_counter()
        self.eng.train()
        while self.step < cfg.train.steps:
            fetch = time.perf_counter()
            batches = [to_device(next(stream), self.info.device, self.eng.dtype) for _ in range(self.unit)]
            self.data_wait += time.perf_counter() - fetch
            out = self.train_unit(batches)
            self.record_keys(batches, out)
            if out is None:
                self.skip()
                continue
            self.bad_in_a_row = 0
            tuning = cfg.unmasked_tuning(self.step)
            for batch in batches:
                self.work.add(batch, tuning=tuning)
            self.micro = (self.micro + self.unit) % cfg.optim.grad_accum_steps
            if not out.pop("stepped"):
                continue  # inside a gradient-accumulation window
            self.step += 1
            self.log.advance()
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                self.log_step(out)
            if self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.steps:
                self.checkpoint()
        self.log.close()
        self.elapsed = time.perf_counter() - start

    def train_unit(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        """A micro-batch (or a cached window): its outputs plus ``stepped``, or None when its window was
        skipped. ``train.inject_nonfinite_at`` poisons the attempts it names (a fault drill)."""
        poison = any(self.attempts + i in self.cfg.train.inject_nonfinite_at for i in range(1, self.unit + 1))
        self.attempts += self.unit
        if self.cached:
            return accumulate.train_window(self.eng, batches, step=self.step, poison=poison)
        return train_step(self.eng, batches[0], step=self.step, micro=self.micro, poison=poison)

    def record_keys(self, batches: list[dict[str, Any]], out: dict[str, torch.Tensor] | None) -> None:
        """The window's keys go to the key log once its fate (trained or skipped) is known."""
        self.window_keys += [batch["__key__"] for batch in batches]
        if out is not None and not out["stepped"]:
            return
        if self.keys is not None:
            for batch_keys in self.window_keys:
                self.keys.write(self.step + 1, batch_keys, skipped=out is None)
        self.window_keys = []

    def skip(self) -> None:
        """The whole accumulation window was skipped: count it; the next micro-batch starts a new one."""
        cfg = self.cfg
        self.skipped, self.bad_in_a_row, self.micro = self.skipped + 1, self.bad_in_a_row + 1, 0
        what = "window" if cfg.optim.grad_accum_steps > 1 else "micro-batch"
        self.log.write(
            f"step {self.step + 1}: non-finite loss, {what} skipped ({self.bad_in_a_row} in a row, "
            f"{self.skipped} in all)"
        )
        if self.bad_in_a_row >= cfg.train.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_in_a_row} consecutive non-finite losses at step {self.step + 1} (train.max_bad_steps="
                f"{cfg.train.max_bad_steps}): stopping; the last good checkpoint is in {self.ckpt_dir}"
            )

    def log_step(self, out: dict[str, torch.Tensor]) -> None:
        # the loop's host sync on a logging step: averaging the logged scalars over ranks
        scalars = {k: v for k, v in out.items() if v.numel() == 1}
        device = out["loss"].device
        scalars["data_wait_seconds"] = torch.tensor(self.data_wait, device=device)
        scalars.update({k: torch.tensor(v, device=device) for k, v in self.work.take().items()})
        bad = {f"bad_{k}": v for k, v in bad_data_totals(self.loader).items()}
        logged = {**ranks.all_reduce_mean(scalars), "lr": self.eng.lr, "skipped_steps": self.skipped, **bad}
        self.last = self.log.log(self.step, logged)
        self.data_wait = 0.0
        self.first_loss = self.last["loss"] if self.first_loss is None else self.first_loss
        # data2vec's guard, on the variances just averaged over ranks (every rank reaches the same verdict);
        # a fine-tuning task has no distillation
        if getattr(self.task, "distill", None) is not None and (
            why := collapse(self.cfg.objectives.distill, self.step, logged)
        ):
            self.log.write(why)
            raise RuntimeError(f"{why}; the last checkpoint is in {self.ckpt_dir}")

    def checkpoint(self) -> None:
        # every rank's loader position, taken between steps: what the trainer consumed, not what the
        # loader workers prefetched
        positions = combine_states(ranks.all_gather_object(self.loader.state_dict()))
        state = {"step": self.step, "data": positions}
        tag = self.eng.save(self.ckpt_dir, self.step, state, keep_last=self.cfg.train.keep_last)
        self.log.write(f"step {self.step}: checkpoint {self.ckpt_dir / tag}")

    def finish(self) -> dict[str, Any]:
        """The summary (summary.json, the terminal), the evaluation at the end, the loss curves."""
        cfg, info, last = self.cfg, self.info, self.last
        summary: dict[str, Any] = {
            "preset": cfg.preset,
            "steps": self.step,
            "world_size": info.world_size,
            "seconds": round(self.elapsed, 1),
            "first_logged_loss": self.first_loss,
            "final_loss": last.get("loss"),
            "samples_per_s": last.get("samples_per_s"),
            "mfu": last.get("mfu"),
            "data_wait": last.get("data_wait"),
            "checkpoint": str(self.ckpt_dir),
            "skipped_steps": self.skipped,
            "bad_data": bad_data_totals(self.loader),
        }
        error = None
        if cfg.train.eval_at_end and cfg.data.eval_shards:
            results, error, cause = self.evaluate()
            if results is not None:
                summary["eval"] = results
            if cause:
                summary["eval_error"] = cause
        if info.is_main:
            report.loss_curves_png(
                report.read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png"
            )
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(format_summary(summary, self.run_dir), flush=True)
            if "eval_error" in summary:
                print(eval_failure_line(summary["eval_error"], cfg), file=sys.stderr, flush=True)
        ranks.shutdown()
        if error is not None and not isinstance(error, USER_ERRORS):
            raise error  # not the data's fault: a bug, with its traceback, once the summary is safe
        return summary


# What a user's data or settings raise during the evaluation (no samples, a layout that matches nothing,
# a label rule the data cannot meet, a file gone): reported in one line, not as a traceback
USER_ERRORS = (ValueError, FileNotFoundError)


def evaluate_at_end(
    task: Task, eng: engine.Engine, cfg: RunConfig, info: ranks.DistInfo, *, progress: bool
) -> tuple[dict | None, Exception | None, str | None]:
    """The evaluation after training: (rank 0's results, rank 0's exception, its cause in one line on
    every rank). A failure does not end the run: rank 0 catches it, and every rank learns the outcome
    from rank 0 (a broadcast in place of a barrier, which rank 0's failure would break)."""
    model = model_to_evaluate(task, eng, cfg, info.device)  # every rank takes part under ZeRO-3
    return on_main_rank(
        lambda: run_eval(
            model, cfg, Path(cfg.run_dir), device=info.device, dtype=eng.dtype, progress=progress
        ),
        info,
    )


def on_main_rank(
    evaluate: Callable[[], dict], info: ranks.DistInfo
) -> tuple[dict | None, Exception | None, str | None]:
    """``evaluate()`` on rank 0, caught: (its results, its exception, the cause in one line on every
    rank, by a broadcast)."""
    results, error = None, None
    if info.is_main:
        try:
            results = evaluate()
        except Exception as e:  # reported by the caller: re-raised there unless it is a user error
            error = e
    cause = None if error is None else " ".join(str(error).split()) or type(error).__name__
    if error is not None and not isinstance(error, USER_ERRORS):
        cause = f"{type(error).__name__}: {cause}"
    return results, error, ranks.broadcast_object(cause)


def eval_failure_line(cause: str, cfg: RunConfig) -> str:
    """One line: what failed, on which shards, and the command that retries it from the checkpoint."""
    retry = shlex.join(["mmssl", "eval", str(cfg.run_dir), "--data", cfg.data.eval_shards])
    return mask(  # a URL's user:password part never reaches the terminal
        f"mmssl: error: training finished, but the evaluation after it failed: {cause} "
        f"(data.eval_shards={cfg.data.eval_shards}); every checkpoint is kept in "
        f"{Path(cfg.run_dir) / 'checkpoints'} and summary.json holds the training figures; "
        f"retry with: {retry}"
    )


def model_to_evaluate(
    task: Task, eng: engine.Engine, cfg: RunConfig, device: torch.device
) -> MultimodalModel | None:
    """What rank 0 evaluates: the trained model itself, or under ZeRO-3 (each rank holds a part of every
    weight, and a forward needs all ranks) a copy built from the gathered weights. None on other ranks."""
    if eng.zero_stage < 3:
        return task.model
    state = eng.gathered_state_dict()
    if state is None:
        return None
    model = MultimodalModel(cfg.model)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.to(device=device, dtype=eng.dtype)


def _flops(value: float | None) -> str:
    return f"{value / 1e9:.1f} GFLOP/s" if value else "unknown"


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    def fmt(x: Any, spec: str) -> str:
        return format(x, spec) if isinstance(x, int | float) else "-"

    lines = [
        f"done: {summary['steps']} steps on {summary['world_size']} rank(s) in {summary['seconds']} s "
        f"({fmt(summary['samples_per_s'], '.0f')} samples/s at the end, MFU {fmt(summary['mfu'], '.1%')}, "
        f"{fmt(summary['data_wait'], '.0%')} of the time waiting for data)",
        f"loss {fmt(summary['first_logged_loss'], '.3f')} -> {fmt(summary['final_loss'], '.3f')}",
        f"run directory: {run_dir} (config.json, metrics.jsonl, tb/, loss.png, checkpoints/"
        + (", eval.json, eval.html)" if "eval" in summary else ")"),
    ]
    return "\n".join(lines)
