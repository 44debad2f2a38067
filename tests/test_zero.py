"""ZeRO stages, offload, bf16, gradient accumulation and activation checkpointing.

Every fp32 variant, trained on 2 CPU ranks, must follow the same loss trajectory as plain ZeRO-2 from
the same seed and data: partitioning changes where state lives, not what is computed. Each also shows
where its state went (the placement its engine records beside the checkpoint): offload is checked
active, not only configured. The runs train tiny_masked with every masked objective on, the MLM head
tied to the token embedding (one parameter in two modules): each variant's checkpoint keeps the tie. Accumulation and activation checkpointing are checked in one process for
what they compute: the gradient of the whole batch, and a second forward of each block in backward.

The training runs are `mmssl train` as a launched rank runs it, on the session's pool of 2 gloo ranks:
the same code from the parsed command on, without a launcher's start-up per run (test_end_to_end
starts ranks as a user does)."""

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from gloo_pool import engine_rank, mmssl_rank
from safetensors.torch import load_file
from test_flops import batch_for

from mmssl.checkpoint import task_state
from mmssl.cli import main
from mmssl.config import apply_overrides
from mmssl.objectives.masking import keep_count
from mmssl.presets import get_preset
from mmssl.task import Task

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def train(gloo, run_dir: Path, shards: Path, *overrides: str) -> list[dict]:
    """`mmssl train` on the session's 2 gloo ranks, each running it as a launched rank does."""
    gloo(2).run(
        mmssl_rank,
        [
            "train", "--preset", "tiny_masked", "--run-dir", str(run_dir),
            f"data.train_shards={shards}/train", f"data.eval_shards={shards}/test",
            "optim.micro_batch_size=8", "train.log_every=1", f"train.steps={STEPS}", f"train.ckpt_every={STEPS}",
            "data.num_workers=0", *overrides,
        ],
    )  # fmt: skip
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(gloo, demo_shards, tmp_path_factory):
    return train(gloo, tmp_path_factory.mktemp("zero2"), demo_shards, "engine.zero_stage=2")


@pytest.mark.parametrize(
    "overrides",
    [
        ["engine.zero_stage=1"],
        ["engine.zero_stage=3", "model.image.grad_checkpointing=true", "model.audio.grad_checkpointing=true"],
        ["engine.zero_stage=2", "engine.offload_optimizer=true"],
        ["engine.zero_stage=3", "engine.offload_params=true", "engine.offload_optimizer=true"],
    ],
    ids=["zero1", "zero3+checkpointing", "zero2+offload", "zero3+offload"],
)
def test_zero_variants_follow_the_same_trajectory(gloo, reference, demo_shards, tmp_path, overrides):
    rows = train(gloo, tmp_path / "run", demo_shards, *overrides)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for ours, ref in zip(rows, reference, strict=True):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=2e-4, abs=2e-4), (ours["step"], overrides)
    ds = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    stage = int(overrides[0].split("=")[1])
    assert ds["zero_optimization"]["stage"] == stage
    # where the live engine kept its state (rank 0's, recorded with the checkpoint)
    layout = json.loads((tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}" / "mmssl.json").read_text())
    placement = layout["placement"]
    assert placement["optimizer_offloaded"] == ("engine.offload_optimizer=true" in overrides), placement
    assert placement["optimizer_state_devices"] == ["cpu"]
    if stage == 3:  # every parameter partition in DeepSpeed's CPU buffers when offloaded, none otherwise
        offloaded = "engine.offload_params=true" in overrides
        assert placement["params_offloaded"] == offloaded and placement["param_partitions"] > 0
        expected = placement["param_partitions"] if offloaded else 0
        assert placement["param_partitions_in_cpu_buffers"] == expected, placement
    # the MLM head tied to the token embedding (the default) stayed one weight under partitioning: the
    # checkpoint consolidates both names to the same trained values
    state = task_state(tmp_path / "run")[0]
    assert "masked_text_loss" in rows[-1]
    assert torch.equal(state["masked_text.head.3.weight"], state["model.text.token_embedding.weight"])
    # a partitioned checkpoint consolidates to the same model that trained (mmssl eval reads it)
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "eval")]) == 0
    from_checkpoint = json.loads((tmp_path / "eval" / "eval.json").read_text())
    # the evaluation at the end of training (weights gathered from every rank under ZeRO-3) agrees
    at_end = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert from_checkpoint["pairs"] and at_end["pairs"] == from_checkpoint["pairs"]
    if stage == 3:  # `mmssl export` of the tied, partitioned run: the towers' weights as consolidated
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
        exported = load_file(str(tmp_path / "export" / "model.safetensors"))
        assert torch.equal(
            exported["text.token_embedding.weight"], state["model.text.token_embedding.weight"]
        )


def test_one_cpu_rank_trains_the_same_without_the_contiguous_buffer(gloo, demo_shards, tmp_path):
    """ds_config.json's contiguous_gradients "auto" turns ZeRO-2's gradient buffer off for one CPU rank
    (its copies are the only thing it does there): the losses and the trained weights are those of the
    buffer on, with gradient accumulation and every masked objective."""
    on = json.loads((REPO / "ds_config.json").read_text())
    on["zero_optimization"]["contiguous_gradients"] = True
    (tmp_path / "on.json").write_text(json.dumps(on))
    runs = {}
    for name, extra in (("auto", []), ("on", [f"engine.ds_config={tmp_path / 'on.json'}"])):
        gloo(1).run(
            mmssl_rank,
            [
                "train", "--preset", "tiny_masked", "--run-dir", str(tmp_path / name), "train.steps=3",
                "train.ckpt_every=3", f"data.train_shards={demo_shards}/train", "train.eval_at_end=false",
                "optim.micro_batch_size=8", "optim.grad_accum_steps=2", "train.log_every=1", "data.num_workers=0",
                "engine.zero_stage=2", *extra,
            ],
        )  # fmt: skip
        ds = json.loads((tmp_path / name / "ds_config.json").read_text())
        assert ds["zero_optimization"]["contiguous_gradients"] is (name == "on")
        metrics = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(line)["loss"] for line in metrics], task_state(tmp_path / name)[0])
    (losses, weights), (losses_on, weights_on) = runs["auto"], runs["on"]
    assert len(losses) == 3 and losses == pytest.approx(losses_on, rel=1e-6)
    for key, value in weights.items():
        assert torch.allclose(value, weights_on[key], rtol=1e-5, atol=1e-7), key


def test_bf16_trains(gloo, demo_shards, tmp_path):
    """bf16 (~100x slower on this CPU, so a short run) trains and stays finite."""
    rows = train(gloo, tmp_path / "bf16", demo_shards, "engine.precision=bf16", "train.steps=2")
    ds = json.loads((tmp_path / "bf16" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and len(rows) == 2 and rows[-1]["loss"] < 10


class _Bounded(torch.nn.Module):
    """A parameter that every step pushes past its bounds (by +-lr, Adam's first step), next to another
    so ZeRO splits flat buffers across ranks; forward returns the value it computed with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))  # 3 elements on 2 ranks: uneven partitions
        self.other = torch.nn.Linear(4, 4)

    def clamp_bounds(self):
        return [(self.w, -0.5, 0.5)]

    def forward(self, batch, step=0, micro=0):
        direction = batch["direction"]  # [3]
        loss = -(self.w * direction).sum() + 0 * self.other(batch["x"]).sum()
        return {"loss": loss, "w": self.w.detach().clone()}


DIRECTIONS = [[1.0, -1.0, 1.0]] + [[-1.0, 1.0, -1.0]] * 2  # out past the bounds, then back in


def _bounded_run(model) -> list[list[float]]:
    """The values of ``w`` that each step's forward saw."""
    seen = []
    for direction in DIRECTIONS:
        out = model({"direction": torch.tensor(direction), "x": torch.zeros(2, 4)})
        seen.append(out["w"].tolist())
        model.backward(out["loss"])
        model.step()
    return seen


def _bounded_reference() -> list[list[float]]:
    """What each forward of ``_Bounded`` sees under a plain AdamW step followed by the clamp."""
    torch.manual_seed(0)
    toy = _Bounded()
    optimizer = torch.optim.AdamW(toy.parameters(), lr=2.0, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    expected = []
    for direction in DIRECTIONS:
        out = toy({"direction": torch.tensor(direction), "x": torch.zeros(2, 4)})
        expected.append(out["w"].tolist())
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(toy.parameters(), 1.0)  # ds_config.json's gradient_clipping
        optimizer.step()
        with torch.no_grad():
            toy.w.clamp_(-0.5, 0.5)
    return expected


def _clamp_worker(rank: int, world: int) -> dict:
    from mmssl import engine
    from mmssl.presets import get_preset

    info = engine_rank(rank, world)  # joins the pool's process group
    out = {}
    for stage in (2, 3):
        cfg = get_preset("tiny")
        cfg.engine.ds_config, cfg.engine.zero_stage = str(REPO / "ds_config.json"), stage
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.micro_batch_size = 2.0, 0, 2
        torch.manual_seed(0)
        out[(rank, stage)] = _bounded_run(engine.Engine(_Bounded(), cfg, info))
    return out


def test_bounds_are_clamped_after_each_step_in_every_copy_zero_included(gloo):
    """The contrastive temperature's clamp (open_clip's, after the optimizer step): a parameter pushed
    past its bounds is clamped before the next forward, and the next step starts from the clamped
    value (the fp32 master weights were clamped too, not only the module's copy), on 2 ranks under
    ZeRO-2 and ZeRO-3, exactly as a plain AdamW step followed by a clamp (without ZeRO the module's
    tensor is the only copy)."""
    expected = _bounded_reference()
    # it crossed and was clamped; the way back starts at the bound (unclamped fp32 master weights would
    # start from 2, and be clamped to 0.5 again)
    assert expected[1] == [0.5, -0.5, 0.5] and 0 < expected[2][0] < 0.45
    world = 2
    results = {k: v for out in gloo(world).run(_clamp_worker) for k, v in out.items()}
    assert sorted(results) == [(r, s) for r in range(world) for s in (2, 3)]
    wrong = {
        k: v
        for k, v in results.items()
        if not torch.allclose(torch.tensor(v), torch.tensor(expected), atol=1e-5)
    }
    assert not wrong, (expected, wrong)


class _LandsLate:
    """An async all-gather whose result reaches its output only when waited on (or at ``land()``): what
    gloo may do on a loaded machine, where its worker threads finish a collective after the call that
    launched it has returned. Makes the race behind a once-flaky clamp (the persistent parameters'
    gather at the end of a ZeRO-3 step landing after the clamp) happen every time."""

    pending: list["_LandsLate"] = []

    def __init__(self, work, result: torch.Tensor, output: torch.Tensor):
        self.work, self.result, self.output, self.done = work, result, output, False
        self.pending.append(self)

    def wait(self, *args, **kwargs) -> bool:
        if not self.done:
            self.work.wait()
            self.output.copy_(self.result)
            self.done = True
        return True

    def is_completed(self) -> bool:
        return self.done

    @classmethod
    def land(cls) -> int:
        """Complete every gather nobody waited for; how many there were."""
        late = [g for g in cls.pending if not g.done]
        for g in late:
            g.wait()
        cls.pending.clear()
        return len(late)


def _late_gathers_worker(rank: int, world: int) -> dict:
    import deepspeed.comm

    from mmssl import engine

    info = engine_rank(rank, world)
    gather, apply_bounds = deepspeed.comm.all_gather_into_tensor, engine.apply_bounds
    left_in_flight = []

    def late_gather(output_tensor, input_tensor, group=None, async_op=False):
        if not async_op:
            return gather(output_tensor, input_tensor, group=group)
        result = torch.empty_like(output_tensor)
        return _LandsLate(
            gather(result, input_tensor.clone(), group=group, async_op=True), result, output_tensor
        )

    def clamp_then_land(bounds):  # whatever DeepSpeed left in flight lands after the clamp
        apply_bounds(bounds)
        left_in_flight.append(_LandsLate.land())

    deepspeed.comm.all_gather_into_tensor, engine.apply_bounds = late_gather, clamp_then_land
    try:
        cfg = get_preset("tiny")
        cfg.engine.ds_config, cfg.engine.zero_stage = str(REPO / "ds_config.json"), 3
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.micro_batch_size = 2.0, 0, 2
        torch.manual_seed(0)
        seen = _bounded_run(engine.Engine(_Bounded(), cfg, info))
    finally:  # the pool's process serves other tests after this one
        deepspeed.comm.all_gather_into_tensor, engine.apply_bounds = gather, apply_bounds
        _LandsLate.pending.clear()
    return {"seen": seen, "left_in_flight": left_in_flight}


def test_zero3_step_leaves_no_gather_in_flight_for_the_clamp(gloo):
    """ZeRO-3 on CPU: when the optimizer step returns, every gather it launched has landed, so nothing
    overwrites the clamp afterwards, however late gloo completes its async collectives (here: only when
    waited on). DeepSpeed waits on the last of its coalesced gathers only; the engine's DeepSpeed config
    makes them sequential on CPU. Without that, rank 0 and 1 see 2.0 at the second step."""
    expected = _bounded_reference()
    for rank, out in enumerate(gloo(2).run(_late_gathers_worker)):
        assert out["left_in_flight"] == [0] * len(DIRECTIONS), (rank, out)
        seen = torch.tensor(out["seen"])
        assert torch.allclose(seen, torch.tensor(expected), atol=1e-5), (rank, out, expected)


def _fixed_keep(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The same kept patches for every row, whatever the batch: masks no longer depend on how rows are
    split into micro-batches (they are drawn per micro-batch otherwise)."""
    count = keep_count(self.grid[0] * self.grid[1], self.cfg.mask_ratio)
    return torch.arange(count, device=device).expand(batch, count)


def _accumulation_worker(rank: int, world: int) -> dict:
    from mmssl.objectives import MaskedPatchObjective

    draw_keep, MaskedPatchObjective.draw_keep = MaskedPatchObjective.draw_keep, _fixed_keep
    try:
        return _accumulate()
    finally:  # the pool's process serves other tests after this one
        MaskedPatchObjective.draw_keep = draw_keep


def _accumulate() -> dict:
    from mmssl import engine

    out = {}
    # masked terms only (a mean over rows, so two halves average to the whole); the contrastive loss
    # couples rows across the batch and is weighted 0
    settings = ["objectives.masked_text.enabled=false", "objectives.contrastive.loss.weight=0",
                f"engine.ds_config={REPO / 'ds_config.json'}", "engine.zero_stage=2", "data.train_shards=x"]  # fmt: skip
    split = apply_overrides(
        get_preset("tiny_masked"), [*settings, "optim.micro_batch_size=4", "optim.grad_accum_steps=2"]
    )
    whole = apply_overrides(get_preset("tiny_masked"), [*settings, "optim.micro_batch_size=8"])
    info = engine.init_distributed()  # the pool's one-rank group
    torch.manual_seed(0)
    task = Task(split.validate())
    initial = [p.detach().clone() for p in task.parameters()]
    accumulating = engine.Engine(task, split, info)
    single = engine.Engine(copy.deepcopy(task), whole.validate(), info)
    torch.manual_seed(1)
    batch = batch_for(whole, 8)
    halves = [
        {k: ({m: v[i : i + 4] for m, v in x.items()} if k == "present" else x[i : i + 4]) for k, x in batch.items()}
        for i in (0, 4)
    ]  # fmt: skip
    stepped = []
    for micro, half in enumerate(halves):
        accumulating.backward(accumulating(half, step=0, micro=micro)["loss"])
        stepped.append(accumulating.step())
        if micro == 0:
            out["unchanged_inside_window"] = all(
                torch.equal(p, q) for p, q in zip(accumulating.module.parameters(), initial, strict=True)
            )
    single.backward(single(batch, step=0, micro=0)["loss"])
    single.step()
    out["stepped"] = stepped
    # DeepSpeed's global gradient norm (before clipping): Adam's first step hides the gradient's scale
    out["grad_norms"] = [float(e.ds.get_global_grad_norm()) for e in (accumulating, single)]
    pairs = list(zip(accumulating.module.parameters(), single.module.parameters(), initial, strict=True))
    out["max_difference"] = max((p - q).abs().max().item() for p, q, _ in pairs)
    out["moved"] = max((p - p0).abs().max().item() for p, _, p0 in pairs)
    return out


def test_accumulating_two_micro_batches_equals_one_batch_of_both(gloo):
    """ZeRO-2 with 2 micro-batches of 4 per step takes the same step as one batch of 8: the gradient is the
    mean over micro-batches (same norm, same update), and nothing moves inside the window."""
    (out,) = gloo(1).run(_accumulation_worker)
    assert out["stepped"] == ["accumulating", "stepped"] and out["unchanged_inside_window"]
    accumulated, whole = out["grad_norms"]
    assert whole > 0 and accumulated == pytest.approx(whole, rel=1e-5)
    # the same update, to rounding (a float32 step of 1.0 is 1.2e-7)
    assert out["moved"] > 0 and out["max_difference"] < 0.01 * out["moved"], out


def test_activation_checkpointing_recomputes_the_blocks_in_backward():
    """With grad_checkpointing a tower's blocks run a second time during backward (their activations
    were not kept); a tower without it runs each block once."""
    cfg = apply_overrides(
        get_preset("tiny_masked"),
        ["model.image.grad_checkpointing=true", "objectives.masked_text.enabled=false"],
    )
    task = Task(cfg.validate())
    calls: Counter = Counter()
    for modality in ("image", "text", "audio"):
        for block in getattr(task.model, modality).transformer.resblocks:
            # a pre-hook: the recomputation stops once it has what backward needs (torch's early stop),
            # before a forward hook would fire
            block.register_forward_pre_hook(lambda *_, m=modality: calls.update([m]))
    out = task(batch_for(cfg, 4))
    forward = dict(calls)
    out["loss"].backward()
    depth = len(task.model.image.transformer.resblocks)
    assert forward["image"] == depth and calls["image"] == 2 * depth  # recomputed in backward
    assert calls["text"] == forward["text"] > 0 and calls["audio"] == forward["audio"] > 0


class _Weighted(torch.nn.Module):
    """One long parameter (over the shared-memory op's 32 MiB chunk) whose gradient on rank r is
    (r + 1) x its index: the all-reduced mean is 1.5 x the index, element by element."""

    def __init__(self, numel: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(numel))

    def forward(self, batch, step=0, micro=0):
        return {"loss": (self.w * batch["weights"]).sum()}


def _shm_worker(rank: int, port: int, numel: int) -> dict:
    """One of 2 fresh ranks as DeepSpeed's launcher starts them on one node: whether the route is on, the
    sizes the shared-memory op reduced, and the gradient's largest error against the mean."""
    import os

    from mmssl import engine
    from mmssl.presets import get_preset

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = engine.init_distributed()  # DeepSpeed's comm backend starts here, its shm op with it
    real, sizes = engine.shm_all_reduce(), []

    def counted(tensor):
        sizes.append(tensor.numel())
        return real(tensor)

    engine.shm_all_reduce = lambda: counted
    cfg = get_preset("tiny")
    cfg.engine.ds_config, cfg.engine.zero_stage = str(REPO / "ds_config.json"), 2
    cfg.optim.warmup_steps, cfg.optim.micro_batch_size = 0, 2
    model = engine.Engine(_Weighted(numel), cfg, info)
    weights = (rank + 1) * torch.arange(numel, dtype=torch.float32)
    model.backward(model({"weights": weights})["loss"])
    grad = engine.deepspeed.utils.safe_get_full_grad(model.module.w)
    index = torch.arange(numel, dtype=torch.float32)
    out = {
        "routed": engine.route_cpu_all_reduce(),
        "sizes": sizes,
        "error": ((grad - 1.5 * index).abs().max() / (1.5 * numel)).item(),  # relative to the largest
    }
    engine.dist.destroy_process_group()
    return out


def test_zero_gradients_all_reduce_through_shared_memory_on_one_node():
    """With every rank on this node (LOCAL_SIZE = world size, as DeepSpeed's launcher sets it), ZeRO-2's
    gradient all-reduce goes through DeepSpeed's shared-memory op instead of gloo, and still averages:
    each element of the gradient is the mean of the ranks' (a wrong chunk or a missing reduce shows)."""
    from gloo_pool import spawned

    from mmssl.ranks import free_port, remove_shm_buffers

    numel, port = 9_000_000, free_port()
    try:
        outs = spawned(_shm_worker, port, numel, nprocs=2)
    finally:
        remove_shm_buffers(port)
    for out in outs:
        assert out["routed"] and sum(out["sizes"]) >= numel, out["sizes"][:5]
        assert out["error"] < 1e-6, out["error"]  # fp32 rounding of values up to 1.35e7
