"""Distribution, precision, optimizer and checkpoints: the ONLY module that imports deepspeed.

The training loop talks to a small :class:`Engine` (call, backward, step, save, load) and never to
DeepSpeed directly. The same code runs CPU/gloo here and CUDA/NCCL on GPU nodes: DeepSpeed picks its
accelerator and backend by itself. What needs no DeepSpeed lives beside it: the DeepSpeed config
(``mmssl.ds_config``), the ranks' small collectives (``mmssl.ranks``) and reading a checkpoint folder
(``mmssl.ds_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from mmssl.ds_config import name_cpu_accelerator

name_cpu_accelerator(os.environ)
# DeepSpeed's op builder imports torch's extension builder, which warns once per rank that it found no
# CUDA runtime: true and expected on a CPU machine, so that one message is dropped there.
if not torch.cuda.is_available():
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found")
    )

import deepspeed  # noqa: E402 - reads DS_ACCELERATOR on import
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402
from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mmssl.config import RunConfig  # noqa: E402
from mmssl.ds_checkpoint import TEACHER_KEY, hold_for_fault_drill, latest_tag  # noqa: E402
from mmssl.ds_config import cap_buckets, resolve_ds_config  # noqa: E402
from mmssl.ranks import DistInfo, barrier, free_port  # noqa: E402

ds_logger.setLevel(logging.WARNING)
# DeepSpeed's ZeRO still calls a torch collective that torch has renamed; the warning is not ours to fix
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def init_distributed() -> DistInfo:
    """Join the process group the launcher set up, or make a one-rank group when run directly."""
    if "RANK" not in os.environ:  # not started by a launcher: a single process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shm_all_reduce() -> Callable[[Tensor], object] | None:
    """DeepSpeed's shared-memory all-reduce (sum, in place) of its CPU comm op, when that op built here
    and joined every rank: the path its CPU backend offers on one node instead of gloo. DeepSpeed's
    launcher says "every rank is on this node" by setting ``LOCAL_SIZE`` to the world size; the op reads
    it when DeepSpeed's comm backend starts, and without it has no buffers to reduce through."""
    if not (hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")):
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world < 2 or os.environ.get("LOCAL_SIZE") != str(world):
        return None
    return torch.ops.deepspeed.inference_all_reduce_


_SHM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def route_cpu_all_reduce() -> bool:
    """Send DeepSpeed's blocking SUM all-reduces of contiguous CPU fp32/bf16/fp16 tensors over all
    ranks (ZeRO's gradient buckets, ZeRO-0's gradients, the gradient norm) through :func:`shm_all_reduce`
    instead of gloo; anything else (other ops, subgroups, async calls, dtypes) goes to gloo as before.
    ``benchmarks/bench_scaling.py`` times both. Once per process; returns whether the route is on."""
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    if backend is None or getattr(backend.all_reduce, "routes_to_shm", False):
        return backend is not None
    if torch.cuda.is_available() or (shm := shm_all_reduce()) is None:
        return False
    gloo, world, sums = backend.all_reduce, dist.get_world_size(), (ds_comm.ReduceOp.SUM, dist.ReduceOp.SUM)

    def all_reduce(tensor: Tensor, op=ds_comm.ReduceOp.SUM, group=None, async_op: bool = False):
        if (
            not async_op
            and op in sums
            and tensor.device.type == "cpu"
            and tensor.dtype in _SHM_DTYPES
            and tensor.is_contiguous()
            and (group is None or dist.get_world_size(group) == world)
        ):
            shm(tensor)
            return None
        return gloo(tensor, op, group, async_op)

    all_reduce.routes_to_shm = True
    backend.all_reduce = all_reduce
    return True


def param_groups(task: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups: no weight decay on biases, norms, embeddings'
    scalars and temperatures (ndim < 2); and, when the task gives per-parameter learning-rate factors
    (``task.lr_scales()``: ``{id(param): factor}``, layer-wise decay in fine-tuning), one group per
    factor at ``optim.lr`` x factor, the largest first (the logged lr is the first group's)."""
    scales = task.lr_scales() if hasattr(task, "lr_scales") else {}
    o = cfg.optim
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in task.parameters():
        if p.requires_grad:
            grouped.setdefault((scales.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    keys = sorted(grouped, key=lambda k: (-k[0], not k[1]))
    if not scales:  # the two groups pretraining has always had, even when one is empty
        keys = [(1.0, True), (1.0, False)]
    return [
        {"params": grouped.get(k, []), "weight_decay": o.weight_decay if k[1] else 0.0, "lr": o.lr * k[0]}
        for k in keys
    ]


def build_optimizer(task: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`."""
    o = cfg.optim
    groups = param_groups(task, cfg)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if torch.cuda.is_available() and cfg.engine.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    # On CPU torch's fused AdamW (one vectorised pass over each tensor: ~10x faster than its default
    # per-tensor loop here) also avoids building DeepSpeed's C++ Adam (about two minutes, once per machine)
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def compile_trunks(module: nn.Module) -> int:
    """torch.compile, in place, every open_clip ``Transformer`` in ``module`` (tower trunks and MAE
    decoders): the module tree and its state dict keys stay as they are. Returns how many."""
    from open_clip.transformer import Transformer

    trunks = [m for m in module.modules() if isinstance(m, Transformer)]
    for trunk in trunks:
        trunk.compile(dynamic=False)
    return len(trunks)


def lr_lambda(cfg: RunConfig):
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


Bounds = list[tuple[nn.Parameter, float, float]]


def clamp_bounds(module: nn.Module) -> Bounds:
    """Every (parameter, low, high) the submodules of ``module`` ask to be clamped to after each
    optimizer step, through a ``clamp_bounds()`` method (the contrastive temperatures)."""
    return [bound for m in module.modules() if hasattr(m, "clamp_bounds") for bound in m.clamp_bounds()]


@torch.no_grad()
def apply_bounds(bounds: Bounds) -> None:
    """Clamp each parameter in place, in every copy DeepSpeed keeps of it, on this rank: a clamp is
    elementwise, so clamping each rank's part of each copy clamps the whole, with no communication.

    - the module's tensor: the whole parameter (no ZeRO, ZeRO-1/2, a ZeRO-3 persistent parameter) or
      an empty placeholder (other ZeRO-3 parameters outside forward);
    - ZeRO-3: this rank's partition of the working copy (``ds_tensor``, gathered for the next forward)
      and of the fp32 master weights the optimizer steps (else the next step would undo the clamp);
    - ZeRO-1/2 (and the bf16 optimizer): this rank's fragment of the fp32 master partition.

    It relies on no gather of the step still being in flight, to land over the clamp afterwards: on CPU
    ``resolve_ds_config`` makes ZeRO-3's gathers sequential for that.
    """
    for param, low, high in bounds:
        param.data.clamp_(low, high)
        if hasattr(param, "ds_tensor"):
            param.ds_tensor.clamp_(low, high)
            master = safe_get_local_fp32_param(param)  # a copy when the master lives elsewhere (offload)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(low, high))
        elif getattr(param, "_hp_mapping", None) is not None:
            param._hp_mapping.get_hp_fragment().clamp_(low, high)


class Engine:
    """A DeepSpeed engine around the task, behind the few calls the training loop needs."""

    def __init__(self, task: nn.Module, cfg: RunConfig, info: DistInfo):
        self.info = info
        self.bounds = clamp_bounds(task)
        self.ds_config = cap_buckets(resolve_ds_config(cfg, info.world_size), task)
        if cfg.engine.compile:
            compile_trunks(task)
        # the EMA teacher (objectives.distill) starts as the student does, after any init_from; it is no
        # submodule of the task, so DeepSpeed neither partitions, casts nor checkpoints it (see update_teacher)
        self.teacher = getattr(task, "teacher", None)
        if self.teacher is not None:
            self.teacher.copy_from(self.teacher.student_parameters(task.model))
            self.teacher.to(info.device)
        optimizer = build_optimizer(task, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=task,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        if cfg.engine.shm_all_reduce:
            route_cpu_all_reduce()
        self.dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        self._nonfinite: Tensor | None = None  # this window's found-non-finite flag, on the device

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def zero_stage(self) -> int:
        return self.ds.zero_optimization_stage()

    def __call__(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Tensor]:
        return self.ds(batch, **kwargs)

    def backward(self, loss: Tensor, *, watch: bool = True) -> None:
        """Backward of one micro-batch's loss; ``watch`` folds its finiteness into the window's flag first
        (a device op: no host sync), which :meth:`step` checks once at the accumulation boundary."""
        if watch:
            self.watch(loss)
        self.ds.backward(loss)

    def watch(self, loss: Tensor) -> None:
        """Note on the device whether ``loss`` is non-finite; the window's flag is checked once, by
        :meth:`window_finite` (or :meth:`step` at the boundary)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    def window_finite(self) -> bool:
        """Whether every loss watched in this window was finite on every rank, then forget them. The one
        host sync of an optimizer step (an all-reduce and ``.item()``): all ranks must agree to skip a
        step together, or ZeRO's collectives would diverge."""
        flag = (
            self._nonfinite.float()
            if self._nonfinite is not None
            else torch.zeros((), device=self.info.device)
        )
        self._nonfinite = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    @property
    def loss_divisor(self) -> int:
        """What :meth:`backward` divides each micro-batch's loss by: DeepSpeed scales it by
        1/gradient_accumulation_steps, so that the accumulated gradient averages the micro-batches'."""
        return self.ds.gradient_accumulation_steps()

    def step(self) -> Literal["accumulating", "stepped", "skipped"]:
        """Inside an accumulation window: count the micro-batch. At its boundary: if a loss watched in the
        window was not finite on some rank, skip the update on every rank (gradients zeroed, no weight,
        optimizer state or learning rate changed); else step the optimizer, then clamp the bounded
        parameters (as open_clip clamps its logit scale after ``optimizer.step()``)."""
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()
            return "accumulating"
        if self._nonfinite is not None and not self.window_finite():
            self._skip_step()
            return "skipped"
        self.ds.step()
        apply_bounds(self.bounds)
        self.update_teacher()
        return "stepped"

    def _student_for_teacher(self) -> contextlib.AbstractContextManager[list[Tensor]]:
        """The student parameters the teacher follows, whole: under ZeRO-3 gathered from every rank for
        the duration (read-only, one all-gather of the distilled towers), else the module's own."""
        assert self.teacher is not None
        params = self.teacher.student_parameters(self.module.model)
        if self.zero_stage != 3:
            return contextlib.nullcontext(params)
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

        @contextlib.contextmanager
        def whole() -> Iterator[list[Tensor]]:
            with gathered:
                yield params

        return whole()

    def update_teacher(self) -> None:
        """The EMA step of the teacher after an optimizer step (and the temperature clamp), on every rank.

        Under ZeRO-3 the teacher stays a plain, unpartitioned fp32 module and the student's partitions
        are gathered for the update, rather than partitioning the teacher like the student: its forward
        needs whole weights anyway (a partitioned teacher would be gathered for every forward instead, the
        same all-gather per step), the update stays one fused lerp over whole tensors with no rank
        bookkeeping, and the teacher stays out of DeepSpeed (no bf16 cast, no optimizer, no frozen-
        parameter path through ZeRO's checkpoints). The price is memory: 4 bytes per teacher parameter
        on every rank (benchmarks/bench_memory.py measures it), against ZeRO-3's 16/W per student one."""
        if self.teacher is None:
            return
        with self._student_for_teacher() as student:
            self.teacher.update(student)

    def reset_teacher(self) -> None:
        """Set the teacher to the student's current weights (a checkpoint written without one)."""
        assert self.teacher is not None
        with self._student_for_teacher() as student:
            self.teacher.copy_from(student)

    def _skip_step(self) -> None:
        """End the window without an update, through DeepSpeed's own overflow path (the one its fp16 loss
        scaling takes): the optimizer reports an overflow, so DeepSpeed zeroes the gradients (under ZeRO
        also the reduced partitions), steps neither the optimizer nor the lr scheduler, counts a skipped
        step and advances its micro-step counter to the next window. ZeRO's optimizers take that path
        themselves when ``overflow`` is set (and not recomputed); the optimizer without ZeRO (torch's, or
        DeepSpeed's bf16 one) has no such path, so its ``step`` is made a no-op for this one call."""
        opt = self.ds.optimizer
        saved = {name: opt.__dict__[name] for name in ("step", "check_grad_overflow") if name in opt.__dict__}
        had_overflow = hasattr(opt, "overflow")
        zero = self.zero_stage > 0
        if zero:
            opt.check_grad_overflow = False  # ZeRO-1/2: else a bf16 run recomputes it from the gradients
        else:
            opt.step = lambda *args, **kwargs: None
        opt.overflow = True
        try:
            self.ds.step()
        finally:
            for name in ("step", "check_grad_overflow"):
                opt.__dict__.pop(name, None)
            opt.__dict__.update(saved)
            if had_overflow:
                opt.overflow = False
            else:
                del opt.overflow

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def placement(self) -> dict[str, Any]:
        """Where this rank's optimizer state and parameter partitions live, read from the live ZeRO
        optimizer rather than the config (recorded beside each checkpoint; the offload tests read it):
        whether the optimizer step is offloaded and the devices of its state, and under ZeRO-3 how many
        parameter partitions sit in DeepSpeed's CPU buffers for offloaded parameters."""
        zero = self.ds.optimizer if self.zero_stage > 0 else None
        # the torch optimizer holding Adam's state, inside DeepSpeed's ZeRO or bf16 wrapper if any
        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        out: dict[str, Any] = {
            # ZeRO-1/2 call it cpu_offload, ZeRO-3 offload_optimizer
            "optimizer_offloaded": bool(getattr(zero, "cpu_offload", False))
            or bool(getattr(zero, "offload_optimizer", False)),
            "optimizer_state_devices": sorted({t.device.type for t in state}),
        }
        if self.zero_stage == 3:
            cpu_buffers = {
                b.untyped_storage().data_ptr() for b in getattr(zero, "param_groups_fp16_flat_cpu_memory", [])
            }
            parts = [
                p.ds_tensor for p in self.module.parameters() if getattr(p, "ds_tensor", None) is not None
            ]
            out["params_offloaded"] = bool(zero.offload_param)
            out["param_partitions"] = len(parts)
            out["param_partitions_in_cpu_buffers"] = sum(
                t.untyped_storage().data_ptr() in cpu_buffers for t in parts
            )
        return out

    def gathered_state_dict(self) -> dict[str, Tensor] | None:
        """The whole task's weights on rank 0 (None on the others). Under ZeRO-3, where every rank holds a
        part of each weight, they are gathered one layer at a time: call this on every rank."""
        if self.zero_stage == 3:
            return self.ds._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if self.info.is_main else None

    def save(self, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], *, keep_last: int) -> str:
        """Save atomically: every rank writes its part of ``step_<n>``; only when all are done does rank 0
        point ``latest`` at it (write to a temporary file, then rename), so a kill at any moment leaves
        ``latest`` naming a complete checkpoint. Then all but the newest ``keep_last`` are deleted."""
        tag = f"step_{step:08d}"
        ckpt_dir = Path(ckpt_dir)
        if self.teacher is not None:  # the same on every rank; in the client state beside the module's
            client_state = {**client_state, TEACHER_KEY: self.teacher.state_dict()}
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        hold_for_fault_drill(ckpt_dir / tag, step, self.info.rank)
        barrier()
        if self.info.is_main:
            layout = {"step": step, "world_size": self.info.world_size, "zero_stage": self.zero_stage}
            layout["placement"] = self.placement()
            (ckpt_dir / tag / "mmssl.json").write_text(json.dumps(layout) + "\n")
            tmp = ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, ckpt_dir / "latest")
            for old in sorted(ckpt_dir.glob("step_*"))[:-keep_last]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        return tag

    def load(self, ckpt_dir: str | Path, tag: str | None = None) -> dict[str, Any]:
        """Load module, optimizer, scheduler and client state; ``tag=None`` reads DeepSpeed's ``latest``."""
        path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {ckpt_dir} (tag {tag or 'latest'})")
        teacher = client_state.pop(TEACHER_KEY, None)
        if self.teacher is not None:
            if teacher is None:  # distillation switched on for a run that had none: start from the student
                self.reset_teacher()
                client_state["teacher_from_student"] = True
            else:
                self.teacher.load_state_dict(teacher)
        return client_state


def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, Tensor]:
    """fp32 weights of the whole task from a checkpoint of any ZeRO stage, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag or latest_tag(ckpt_dir))


def deepspeed_state_estimates(params: int, largest_layer: int, world_size: int) -> dict[str, int]:
    """DeepSpeed's own per-rank estimates of model-state bytes without offload, for ZeRO-2 and ZeRO-3 on
    ``world_size`` ranks of one node, given the parameter count and the largest layer's (the memory
    benchmark's reference; ``mmssl.memory`` counts what a live engine holds)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, zero2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world_size, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        params, largest_layer, num_gpus_per_node=world_size, cpu_offload=False, cpu_offload_params=False
    )
    return {"zero2": zero2, "zero3": zero3}
