"""Memory accounting for ``benchmarks/bench_memory.py``: the model state one rank holds, by kind.

Measured on a live :class:`mmssl.engine.Engine` by walking the tensors DeepSpeed 0.19.7's engine and ZeRO
optimizers keep (private attributes, read by name: this module does not import deepspeed, and nothing
in training imports this module). Beside it, DeepSpeed's own estimates for the same model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from mmssl.engine import Engine

KINDS = ("params", "grads", "master", "optim")  # then "other": whatever else the engine holds

# Where DeepSpeed 0.19.7's ZeRO optimizers keep gradients (stage 1/2 names, then stage 3 names)
_ZERO_GRAD_ATTRS = (
    "averaged_gradients", "all_grad_tensors", "grads_in_partition",
    "grad_partitions_flat_buffer", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
)  # fmt: skip
# ... and the fp32 partitions its inner optimizer steps (a copy of the weights, or the same storage)
_ZERO_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _tensors_in(obj: Any) -> list[Tensor]:
    """Tensors in a tensor or in nested lists, tuples and dicts of them."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors_in(item)]
    return []


def _tensors_by_kind(eng: Engine) -> dict[str, list[Tensor]]:
    """The tensors of each kind in :data:`KINDS`, found where DeepSpeed keeps them (may repeat storage)."""
    ds = eng.ds
    params = list(ds.module.parameters())
    zero = ds.optimizer if eng.zero_stage > 0 else None
    inner = zero.optimizer if zero is not None else ds.optimizer  # the torch optimizer holding Adam's state
    kinds: dict[str, list[Tensor]] = {
        "params": [t for p in params for t in (getattr(p, "ds_tensor", None), p.data) if t is not None],
        "grads": [t for p in params for t in (p.grad, getattr(p, "grad_accum", None)) if t is not None],
        "master": [],
        "optim": _tensors_in([dict(s) for s in inner.state.values()]),
    }
    if zero is not None:
        kinds["grads"] += _tensors_in([getattr(zero, a, None) for a in _ZERO_GRAD_ATTRS])
        kinds["master"] = _tensors_in([getattr(zero, a, None) for a in _ZERO_MASTER_ATTRS])
        kinds["grads"] += [m.grad for m in kinds["master"] if m.grad is not None]
    return kinds


def _other_tensors(eng: Engine, seen: set[int]) -> dict[int, tuple[str, int]]:
    """Storages not in ``seen`` that DeepSpeed's own objects (not torch's or the model's) reach, with the
    path to each: ``{data_ptr: (path, bytes)}``."""
    found: dict[int, tuple[str, int]] = {}
    visited: set[int] = set()

    def walk(obj: Any, path: str, depth: int) -> None:
        if id(obj) in visited or depth > 6:
            return
        visited.add(id(obj))
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                found.setdefault(storage.data_ptr(), (path, storage.nbytes()))
        elif isinstance(obj, dict):
            for key, value in list(obj.items())[:10_000]:
                walk(value, f"{path}[{key!r}]", depth + 1)
        elif isinstance(obj, list | tuple | set):
            for i, value in enumerate(list(obj)[:10_000]):
                walk(value, f"{path}[{i}]", depth + 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for name, value in vars(obj).items():
                if name not in ("module", "_modules", "_parameters"):
                    walk(value, f"{path}.{name}", depth + 1)

    walk(eng.ds, "engine", 0)
    for name, buffer in eng.ds.module.named_buffers():
        walk(buffer, f"module.{name}", 0)
    return found


def rank_state_bytes(eng: Engine) -> dict[str, Any]:
    """Bytes of model state this rank holds right now, by kind:

    - ``params``: the module's parameters; under ZeRO-3 this rank's partitions (``ds_tensor``) plus any
      parameter held whole (the small ones ZeRO-3 keeps on every rank, ``stage3_param_persistence_threshold``);
    - ``grads``: gradients wherever ZeRO keeps them (``.grad``, accumulation buffers, flat partitions);
    - ``master``: the fp32 partitions the inner optimizer steps, where they are a separate copy;
    - ``optim``: the inner optimizer's state (Adam's two moments and step counters);
    - ``other``: any further tensor the DeepSpeed engine or its ZeRO optimizer holds (``other_top`` names
      the largest, e.g. communication buckets);
    - ``teacher``: the EMA teacher's weights (``objectives.distill``), which the engine keeps beside
      DeepSpeed's state.

    Each storage counts once, in full, under the first kind in that order that reaches it, so parameters
    and gradients that are views into DeepSpeed's flat buffers are not counted twice."""
    seen: set[int] = set()
    out: dict[str, Any] = {}
    for kind, tensors in _tensors_by_kind(eng).items():
        out[kind] = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out[kind] += storage.nbytes()
    found = _other_tensors(eng, seen)
    out["other"] = sum(nbytes for _, nbytes in found.values())
    out["other_top"] = sorted(found.values(), key=lambda item: -item[1])[:3]
    # the EMA teacher (objectives.distill): outside DeepSpeed, whole and fp32 on every rank
    teacher = eng.teacher.parameters() if eng.teacher is not None else []
    out["teacher"] = sum(t.untyped_storage().nbytes() for t in teacher)
    out["total"] = sum(out[k] for k in (*KINDS, "other", "teacher"))
    return out


def zero_state_estimates(model: nn.Module, world_size: int) -> dict[str, int]:
    """DeepSpeed's own per-rank estimates of model-state bytes without offload, for ZeRO-2 and ZeRO-3 on
    ``world_size`` ranks of one node. They assume 16-bit parameters and gradients with fp32 master weights
    and Adam: ZeRO-2 ``2P + 18P/N``, ZeRO-3 ``4L + 18P/N`` (``L`` the largest layer's parameters).

    Counts parameters by identity, so it works on a model built on the meta device (DeepSpeed's
    ``*_all_live`` helpers count by ``data_ptr``, which is 0 for every meta tensor)."""
    from mmssl.engine import deepspeed_state_estimates  # imports DeepSpeed

    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    estimates = deepspeed_state_estimates(total, largest, world_size)
    return {**estimates, "params": total, "largest_layer_params": largest}
