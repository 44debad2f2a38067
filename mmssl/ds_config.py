"""The DeepSpeed config a run trains with: ``engine.ds_config`` (a JSON file) with its ``"auto"`` values
filled from the run config, checked against it, and its ZeRO buckets capped to the model's size.

Plain dictionaries, no DeepSpeed: the first process checks a run with :func:`resolve_ds_config` before
any rank starts, and :class:`mmssl.engine.Engine` hands the result to ``deepspeed.initialize``.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmssl.config import RunConfig


def name_cpu_accelerator(environ: MutableMapping[str, str]) -> None:
    """With no CUDA device DeepSpeed falls back to its CPU accelerator and warns "Setting accelerator to
    CPU" in every process that imports it; naming the CPU accelerator up front is the same choice, said
    once. A machine with CUDA (or a user's own DS_ACCELERATOR) is left to DeepSpeed's detection. Named
    in ``environ`` before DeepSpeed is imported: this process's (``mmssl.engine``), or the environment
    DeepSpeed's runner and the ranks it starts get (``mmssl.launch``)."""
    if not torch.cuda.is_available():
        environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Read the DeepSpeed JSON and fill its ``"auto"`` values from the run config. The batch identity
    train_batch = micro x accumulation x world_size is checked here, once."""
    path = Path(cfg.engine.ds_config)
    if not path.is_file():
        raise ValueError(f"engine.ds_config: no DeepSpeed config at {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"engine.ds_config: {path} is not valid JSON ({e})") from e
    micro, accum = cfg.optim.micro_batch_size, cfg.optim.grad_accum_steps
    ours = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
    }
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            raise ValueError(
                f"{path}: {key}={given} disagrees with the run config (micro_batch_size={micro} x "
                f'grad_accum_steps={accum} x world_size={world_size} gives {key}={value}); set it to "auto"'
            )
    zero = ds.setdefault("zero_optimization", {})
    if cfg.engine.zero_stage is not None:
        zero["stage"] = cfg.engine.zero_stage
    stage = zero.get("stage", 0)
    if cfg.engine.offload_optimizer:
        if stage < 1:
            raise ValueError("engine.offload_optimizer needs ZeRO stage 1, 2 or 3 (engine.zero_stage)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # on CPU the optimizer already runs where its state lives: torch's AdamW serves
        ds["zero_force_ds_cpu_optimizer"] = torch.cuda.is_available()
    if cfg.engine.offload_params:
        if stage != 3:
            raise ValueError(
                f"engine.offload_params needs ZeRO stage 3, the DeepSpeed config gives stage {stage}"
            )
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    resolve_contiguous_gradients(zero, stage, world_size)
    check_cpu_gradient_reduce(zero, stage, world_size, path)
    if cfg.engine.load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    if stage == 3 and not torch.cuda.is_available():
        # ZeRO-3 gathers several parameters outside forward (the persistent ones at the end of every
        # optimizer step, GatheredParameters) as one async all-gather each, waits only on the last, and
        # then synchronises the device, which on CPU is a no-op. Gloo runs async collectives on worker
        # threads, so an earlier gather may still be writing when step() returns: it then lands after
        # apply_bounds and the next forward sees the unclamped temperature (or a half-written weight).
        # Sequential gathers complete before DeepSpeed returns; on CUDA the device sync covers them.
        zero["stage3_allgather_sequential"] = True
    if stage == 3 and cfg.engine.compile:
        raise ValueError("engine.compile is not supported with ZeRO-3 (the DeepSpeed config gives stage 3)")
    if stage == 3 and cfg.objectives.any_unmasked_pass():
        raise ValueError(
            "ZeRO-3 runs each tower once per step: set objectives.unmasked_contrastive_pass=false"
        )
    if stage == 3 and cfg.objectives.views.enabled():
        raise ValueError(
            "ZeRO-3 runs each tower once per step and view objectives need a second pass: turn off "
            + ", ".join(f"objectives.views.{m}" for m in cfg.objectives.views.enabled())
        )
    precision = cfg.engine.precision
    bf16 = ds.setdefault("bf16", {})
    if precision != "auto":
        bf16["enabled"] = precision == "bf16"
    elif bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = torch.cuda.is_available()  # no hardware bf16 on CPU here: ~100x slower matmuls
    return ds


def optimizer_offloaded(zero: dict[str, Any]) -> bool:
    return zero.get("offload_optimizer", {}).get("device", "none") != "none"


def resolve_contiguous_gradients(zero: dict[str, Any], stage: int, world_size: int) -> None:
    """``"contiguous_gradients": "auto"`` (the shipped ds_config.json): off where one CPU rank runs ZeRO-1/2
    with nothing to reduce, since the buffer then only copies every gradient twice in backward (into the
    reduce bucket, then into the partition: 9-14% of a small step on 1 rank, README Performance, Copies);
    on everywhere else, where DeepSpeed needs it (see :func:`check_cpu_gradient_reduce`) or reduces
    through it. An explicit true or false is kept."""
    if zero.get("contiguous_gradients") != "auto":
        return
    offloaded = optimizer_offloaded(zero)
    one_cpu_rank = world_size == 1 and not torch.cuda.is_available() and not offloaded
    zero["contiguous_gradients"] = not (stage in (1, 2) and one_cpu_rank)


def check_cpu_gradient_reduce(zero: dict[str, Any], stage: int, world_size: int, path: Path) -> None:
    """ZeRO-1/2 on the CPU accelerator needs contiguous_gradients: without the contiguous buffer,
    DeepSpeed (0.19.7, stage_1_and_2.py ``buffered_reduce_fallback``) sorts the gradients into buckets
    with ``split_half_float_double``, which matches ``t.type()`` against "torch.cpu.FloatTensor" and
    the like; a CPU tensor's type is "torch.FloatTensor", so every bucket is empty, nothing is
    all-reduced, and each rank steps its partition on its own gradient. An optimizer offload forces
    the buffer on, and one rank has nothing to reduce."""
    offloaded = optimizer_offloaded(zero)
    if (
        stage in (1, 2) and world_size > 1 and not torch.cuda.is_available() and not offloaded
        and zero.get("contiguous_gradients", True) is False
    ):  # fmt: skip
        raise ValueError(
            f"{path}: zero_optimization.contiguous_gradients=false on CPU makes DeepSpeed "
            f"{version('deepspeed')} skip the gradient all-reduce of ZeRO-{stage} (every rank trains on its "
            "own gradient): set it to true"
        )


_BUCKETS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def cap_buckets(ds: dict[str, Any], task: nn.Module) -> dict[str, Any]:
    """ZeRO's communication buckets hold at most the whole model: a bucket sized for more (ZeRO-3
    allocates its reduce bucket in full) only costs memory. Numeric sizes are capped at the number of
    parameters, rounded up to a multiple of 1024; the run directory's ds_config.json shows the result."""
    total = sum(p.numel() for p in task.parameters())
    total = -(-total // 1024) * 1024  # ZeRO wants bucket sizes aligned (a multiple of its alignment)
    zero = ds.get("zero_optimization", {})
    for key in _BUCKETS:
        if isinstance(zero.get(key), int | float) and zero[key] > total:
            zero[key] = total
    return ds
