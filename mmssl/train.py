"""The training loop: fetch a batch, forward, loss, backward, step; logging, checkpoints and the final
evaluation on their own cadence. Runs identically on 1 or N ranks; the launcher decides which.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_pipelines import BAD_KINDS, combine_states
from mmssl import accumulate, data, engine, flops
from mmssl.config import RunConfig, save_json
from mmssl.eval import report
from mmssl.eval.run import run_eval
from mmssl.model import MultimodalModel
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
    the task's outputs plus ``stepped``, or None when the loss was not finite on some rank: then no
    rank ran backward or step, so no weight and no optimizer state changed."""
    out = eng(batch, step=step, micro=micro)
    if poison:  # a fault drill (train.inject_nonfinite_at)
        out["loss"] = out["loss"] * float("nan")
    if not engine.all_finite(out["loss"]):
        return None
    eng.backward(out["loss"])
    out["stepped"] = eng.step()
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
    totals = engine.all_reduce_sum({k: loader.bad_data.counts.get(k, 0) for k in BAD_KINDS})
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
    info = engine.init_distributed()
    report_data_warnings(info.rank)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    task = Task(cfg, rank=info.rank, world_size=info.world_size)
    eng = engine.Engine(task, cfg, info)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(cfg, run_dir / "config.json")
        (run_dir / "ds_config.json").write_text(json.dumps(eng.ds_config, indent=2) + "\n")

    step, data_state = 0, None
    if resume:
        state = eng.load(ckpt_dir, None if resume == "latest" else resume)
        step, data_state = int(state["step"]), state.get("data")
    samples_per_step = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * info.world_size
    peak, peak_source = flops.device_peak(info.device)
    global_batch = cfg.optim.micro_batch_size * info.world_size
    throughput = Throughput(samples_per_step=samples_per_step, world_size=info.world_size, peak_flops=peak)
    work = Work(lambda text: flops.train_flops_per_sample(cfg, global_batch, text), flops.tower_tokens(cfg))
    log = RunLog(
        run_dir, enabled=info.is_main, total_steps=cfg.train.steps, start_step=step, throughput=throughput
    )
    log.write(
        f"training {cfg.preset}: {sum(p.numel() for p in task.parameters()) / 1e6:.2f}M parameters, "
        f"{info.world_size} rank(s) on {info.device.type}, ZeRO-{eng.zero_stage}, "
        f"{samples_per_step} samples/step, steps {step}->{cfg.train.steps}; "
        f"{work.flops_per_sample(None) / 1e6:.1f} MFLOP/sample, peak {_flops(peak)} per rank ({peak_source})"
    )
    # a resumed loader continues at the next sample this run had not consumed
    loader = data.loader(cfg, train=True, rank=info.rank, world_size=info.world_size, resume=data_state)
    stream = iter(loader)
    keys = KeyLog(run_dir, info.rank, resumed_at=step if resume else None) if cfg.train.record_keys else None

    # the unit trained (or skipped) at once: a micro-batch, or under cached accumulation a whole window
    cached = cfg.objectives.contrastive.accumulate == "cached"
    unit = cfg.optim.grad_accum_steps if cached else 1
    start, first_loss, last = time.perf_counter(), None, {}
    micro, data_wait, attempts, bad_in_a_row, skipped = 0, 0.0, 0, 0, 0
    eng.train()
    while step < cfg.train.steps:
        fetch = time.perf_counter()
        batches = [to_device(next(stream), info.device, eng.dtype) for _ in range(unit)]
        data_wait += time.perf_counter() - fetch
        poison = any(attempts + i in cfg.train.inject_nonfinite_at for i in range(1, unit + 1))
        attempts += unit
        if cached:
            out = accumulate.train_window(eng, batches, step=step, poison=poison)
        else:
            out = train_step(eng, batches[0], step=step, micro=micro, poison=poison)
        if keys is not None:
            for batch in batches:
                keys.write(step + 1, batch["__key__"], skipped=out is None)
        if out is None:
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            what = "window" if cached else "micro-batch"
            log.write(
                f"step {step + 1}: non-finite loss, {what} skipped ({bad_in_a_row} in a row, {skipped} in all)"
            )
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise RuntimeError(
                    f"{bad_in_a_row} consecutive non-finite losses at step {step + 1} (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}): stopping; the last good checkpoint is in {ckpt_dir}"
                )
            continue
        bad_in_a_row = 0
        for batch in batches:
            work.add(batch)
        micro = (micro + unit) % cfg.optim.grad_accum_steps
        if not out.pop("stepped"):
            continue  # inside a gradient-accumulation window
        step += 1
        log.advance()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            # the only host sync of the loop: averaging the logged scalars over ranks
            scalars = {k: v for k, v in out.items() if v.numel() == 1}
            device = out["loss"].device
            scalars["data_wait_seconds"] = torch.tensor(data_wait, device=device)
            scalars.update({k: torch.tensor(v, device=device) for k, v in work.take().items()})
            bad = {f"bad_{k}": v for k, v in bad_data_totals(loader).items()}
            last = log.log(
                step, {**engine.all_reduce_mean(scalars), "lr": eng.lr, "skipped_steps": skipped, **bad}
            )
            data_wait = 0.0
            first_loss = last["loss"] if first_loss is None else first_loss
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            # every rank's loader position, taken between steps: what the trainer consumed, not what
            # the loader workers prefetched
            positions = combine_states(engine.all_gather_object(loader.state_dict()))
            tag = eng.save(ckpt_dir, step, {"step": step, "data": positions}, keep_last=cfg.train.keep_last)
            log.write(f"step {step}: checkpoint {ckpt_dir / tag}")
    log.close()
    elapsed = time.perf_counter() - start

    summary: dict[str, Any] = {
        "preset": cfg.preset,
        "steps": step,
        "world_size": info.world_size,
        "seconds": round(elapsed, 1),
        "first_logged_loss": first_loss,
        "final_loss": last.get("loss"),
        "samples_per_s": last.get("samples_per_s"),
        "mfu": last.get("mfu"),
        "data_wait": last.get("data_wait"),
        "checkpoint": str(ckpt_dir),
        "skipped_steps": skipped,
        "bad_data": bad_data_totals(loader),
    }
    error = None
    if cfg.train.eval_at_end and cfg.data.eval_shards:
        results, error, cause = evaluate_at_end(task, eng, cfg, info, progress=log.interactive)
        if results is not None:
            summary["eval"] = results
        if cause:
            summary["eval_error"] = cause
    if info.is_main:
        report.loss_curves_png(report.read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary, run_dir), flush=True)
        if "eval_error" in summary:
            print(eval_failure_line(summary["eval_error"], cfg), file=sys.stderr, flush=True)
    engine.shutdown()
    if error is not None and not isinstance(error, USER_ERRORS):
        raise error  # not the data's fault: a bug, with its traceback, once the summary is safe
    return summary


# What a user's data or settings raise during the evaluation (no samples, a layout that matches nothing,
# a label rule the data cannot meet, a file gone): reported in one line, not as a traceback
USER_ERRORS = (ValueError, FileNotFoundError)


def evaluate_at_end(
    task: Task, eng: engine.Engine, cfg: RunConfig, info: engine.DistInfo, *, progress: bool
) -> tuple[dict | None, Exception | None, str | None]:
    """The evaluation after training: (rank 0's results, rank 0's exception, its cause in one line on
    every rank). A failure does not end the run: rank 0 catches it, and every rank learns the outcome
    from rank 0 (a broadcast in place of a barrier, which rank 0's failure would break)."""
    model = model_to_evaluate(task, eng, cfg, info.device)  # every rank takes part under ZeRO-3
    results, error = None, None
    if info.is_main:
        try:
            results = run_eval(
                model, cfg, Path(cfg.run_dir), device=info.device, dtype=eng.dtype, progress=progress
            )
        except Exception as e:  # reported by the caller: re-raised there unless it is a user error
            error = e
    cause = None if error is None else " ".join(str(error).split()) or type(error).__name__
    if error is not None and not isinstance(error, USER_ERRORS):
        cause = f"{type(error).__name__}: {cause}"
    return results, error, engine.broadcast_object(cause)


def eval_failure_line(cause: str, cfg: RunConfig) -> str:
    """One line: what failed, on which shards, and the command that retries it from the checkpoint."""
    retry = shlex.join(["mmssl", "eval", str(cfg.run_dir), "--data", cfg.data.eval_shards])
    return (
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
