"""Self-distillation from an EMA teacher (mmssl/objectives/distill.py): the EMA update is the formula on
every parameter, the teacher gets no gradient, a resumed engine's teacher equals the uninterrupted
one's, ZeRO-2 and ZeRO-3 on 2 ranks follow the same trajectory (teacher included), the collapse guard
stops a run, and ``mmssl export --teacher`` writes the teacher's towers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from batches import padded_batch
from gloo_pool import engine_rank, spawned

from mmssl.config import DistillConfig, apply_overrides
from mmssl.objectives.distill import collapse, instance_norm, momentum_at
from mmssl.presets import get_preset
from mmssl.task import Task

REPO = Path(__file__).resolve().parents[1]


def distill_only(*extra: str):
    """tiny_distill with every other term weighted 0 (they still run: the masked pass is shared)."""
    overrides = ["objectives.contrastive.loss.weight=0", "data.train_shards=x", *extra]
    overrides += [f"objectives.masked_{m}.loss.weight=0" for m in ("image", "text", "audio")]
    return apply_overrides(get_preset("tiny_distill"), overrides).validate()


def test_momentum_schedules():
    cfg = DistillConfig(momentum_start=0.99, momentum_end=0.999)
    assert momentum_at(cfg, 0, 100) == 0.99 and momentum_at(cfg, 100, 100) == pytest.approx(0.999)
    assert momentum_at(cfg, 500, 100) == pytest.approx(0.999)  # constant after the anneal
    assert momentum_at(cfg, 25, 100) == pytest.approx(0.99 + 0.009 * 0.25)
    cfg.momentum_schedule = "cosine"
    assert momentum_at(cfg, 25, 100) == pytest.approx(0.99 + 0.009 * 0.5 * (1 - math.cos(math.pi / 4)))


def test_instance_norm_ignores_padding():
    x = torch.randn(2, 5, 3)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = instance_norm(x, valid)
    torch.testing.assert_close(out[0, :3], instance_norm(x[:1, :3])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], instance_norm(x[1:])[0], atol=1e-4, rtol=1e-4)


def test_ema_update_equals_the_formula_on_every_parameter():
    torch.manual_seed(0)
    task = Task(distill_only())
    teacher = task.teacher
    assert teacher.modalities == ("image", "text", "audio")
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(torch.randn_like(p))  # the student moved away from the teacher
    for _ in range(3):  # three updates, the momentum rising along the schedule
        before = [t.clone() for t in teacher.parameters()]
        student = teacher.student_parameters(task.model)
        m = teacher.momentum()
        assert teacher.update(student) == m
        for old, new, s in zip(before, teacher.parameters(), student, strict=True):
            torch.testing.assert_close(new, m * old + (1 - m) * s, rtol=1e-6, atol=1e-7)
    assert teacher.updates == 3 and teacher.momentum() > task.cfg.objectives.distill.momentum_start


def test_teacher_gets_no_gradient_and_the_student_learns_from_it():
    torch.manual_seed(0)
    cfg = distill_only()
    task = Task(cfg)
    out = task(padded_batch(cfg, 4, eot=6, vocab=4000))
    assert {f"distill_{m}_loss" for m in ("image", "text", "audio")} <= set(out)
    out["loss"].backward()
    teacher = task.teacher.parameters()
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    # the distillation terms alone (others weighted 0) reach every student tower and decoder
    for name in ("image", "text", "audio"):
        grads = [p.grad for p in getattr(task.model, name).transformer.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
        assert all(p.grad is not None for p in task.distill.decoders[name].parameters()), name
    assert all(p.dtype == torch.float32 for p in teacher)


def _engine_run(eng, cfg, batches, start: int) -> list[float]:
    from mmssl.train import train_step

    losses = []
    for i, batch in enumerate(batches):
        before = [t.clone() for t in eng.teacher.parameters()]
        m = eng.teacher.momentum()
        out = train_step(eng, batch, step=start + i, micro=0)
        losses.append(float(out["loss"]))
        student = eng.teacher.student_parameters(eng.module.model)  # after the optimizer step
        for old, new, s in zip(before, eng.teacher.parameters(), student, strict=True):
            torch.testing.assert_close(new, m * old + (1 - m) * s, rtol=1e-6, atol=1e-7)
    return losses


def _resume_worker(_: int, run_dir: str) -> dict:
    from mmssl import engine, ranks
    from mmssl.ds_checkpoint import saved_teacher

    cfg = distill_only(f"engine.ds_config={REPO / 'ds_config.json'}", "optim.warmup_steps=0")
    info = engine.init_distributed()
    out = {}
    torch.manual_seed(1)
    batches = [padded_batch(cfg, 4, eot=6, vocab=4000) for _ in range(4)]

    def fresh() -> engine.Engine:
        torch.manual_seed(0)
        return engine.Engine(Task(cfg), cfg, info)

    whole = fresh()
    _engine_run(whole, cfg, batches[:2], 0)
    whole.save(run_dir, 2, {"step": 2}, keep_last=1)
    out["whole"] = _engine_run(whole, cfg, batches[2:], 2)
    resumed = fresh()
    resumed.module.model.image.proj.data.zero_()  # overwritten by the checkpoint
    assert int(resumed.load(run_dir)["step"]) == 2
    out["resumed"] = _engine_run(resumed, cfg, batches[2:], 2)
    out["updates"] = (whole.teacher.updates, resumed.teacher.updates)
    out["teacher_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(whole.teacher.parameters(), resumed.teacher.parameters(), strict=True)
    )
    out["saved"] = sorted(saved_teacher(run_dir))[:2]
    ranks.shutdown()
    return out


def test_engine_updates_the_teacher_after_each_step_and_a_resumed_engine_continues_it_exactly(tmp_path):
    """Through the engine (one rank, ZeRO as ds_config.json says): after every optimizer step the teacher
    is the EMA of the stepped student; saved at step 2 and loaded into a fresh engine, the next two
    steps give the same losses and the same teacher as the uninterrupted engine."""
    (out,) = spawned(_resume_worker, str(tmp_path / "ckpt"))
    assert out["resumed"] == out["whole"], out
    assert out["updates"] == (4, 4) and out["teacher_equal"]
    assert out["saved"] and all(k.split(".")[0] in ("image", "text", "audio") for k in out["saved"])


def _zero_worker(rank: int, world: int) -> dict:
    from mmssl import engine

    info = engine_rank(rank, world)  # joins the pool's process group
    result = {}
    for stage in (2, 3):
        cfg = get_preset("tiny_distill")
        cfg = apply_overrides(
            cfg,
            [f"engine.ds_config={REPO / 'ds_config.json'}", f"engine.zero_stage={stage}", "data.train_shards=x",
             "optim.micro_batch_size=4", "optim.warmup_steps=0"],
        ).validate()  # fmt: skip
        torch.manual_seed(0)
        eng = engine.Engine(Task(cfg, rank=rank, world_size=world), cfg, info)
        torch.manual_seed(10 + rank)
        losses = []
        for step in range(3):
            out = eng(padded_batch(cfg, 4, eot=6, vocab=4000), step=step, micro=0)
            losses.append(
                [float(out["loss"]), float(out["distill_image_loss"]), float(out["distill_text_loss"])]
            )
            eng.backward(out["loss"])
            eng.step()
        result[stage] = {"losses": losses, "teacher": [t.clone() for t in eng.teacher.parameters()]}
    return result


@pytest.mark.distributed
def test_zero2_and_zero3_follow_the_same_trajectory_teacher_included(gloo):
    """2 gloo ranks, tiny_distill, 3 steps under ZeRO-2 and ZeRO-3 (the student partitioned, the teacher
    whole on each rank, updated from the gathered student): the same losses, distillation terms and
    teacher, the same teacher on both ranks."""
    results = gloo(2).run(_zero_worker)
    for rank, result in enumerate(results):
        zero2, zero3 = result[2], result[3]
        torch.testing.assert_close(
            torch.tensor(zero3["losses"]), torch.tensor(zero2["losses"]), rtol=2e-4, atol=2e-4
        )
        for a, b in zip(zero2["teacher"], zero3["teacher"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"rank {rank}")
    for a, b in zip(results[0][3]["teacher"], results[1][3]["teacher"], strict=True):
        assert torch.equal(a, b)


def _teacher_against_student(eng) -> dict:
    """The teacher's towers against the student's, parameter by parameter and by name."""
    teacher, model = eng.teacher, eng.module.model
    pairs = [
        (t, dict(getattr(model, m).named_parameters())[name])
        for m in teacher.modalities
        for name, t in teacher.towers[m].named_parameters()
    ]
    return {
        "count": len(pairs),
        "equal": all(torch.equal(t, s.detach().float()) for t, s in pairs),
        "copies": all(t.data_ptr() != s.data_ptr() for t, s in pairs),
        "frozen": not any(p.requires_grad for p in teacher.towers.parameters()),
        "fp32": all(
            t.dtype == torch.float32 for t in teacher.towers.state_dict().values() if t.is_floating_point()
        ),
    }


def _teacher_from_student_worker(rank: int, world: int, run_dir: str) -> dict:
    from mmssl import engine

    info = engine_rank(rank, world)
    cfg = apply_overrides(
        get_preset("tiny_distill"),
        [f"engine.ds_config={REPO / 'ds_config.json'}", "engine.zero_stage=2", "data.train_shards=x",
         "optim.micro_batch_size=4", "optim.warmup_steps=0"],
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    task = Task(cfg, rank=rank, world_size=world)
    with torch.no_grad():  # weights set after the task was built (as model.init_from does)
        task.model.image.proj.add_(1.0)
    eng = engine.Engine(task, cfg, info)
    out = {"at_init": _teacher_against_student(eng)}
    torch.manual_seed(10 + rank)
    step = eng(padded_batch(cfg, 4, eot=6, vocab=4000), step=0, micro=0)
    eng.backward(step["loss"])
    eng.step()
    teacher, eng.teacher = eng.teacher, None  # a checkpoint without a teacher, as a run without distillation
    eng.save(run_dir, 1, {"step": 1}, keep_last=1)  # wrote it
    eng.teacher = teacher
    torch.manual_seed(1)
    resumed = engine.Engine(Task(cfg, rank=rank, world_size=world), cfg, info)
    out["flag"] = resumed.load(run_dir).get("teacher_from_student")
    out["loaded"] = _teacher_against_student(resumed)
    out["student_from_checkpoint"] = all(
        torch.equal(a, b)
        for a, b in zip(eng.module.model.parameters(), resumed.module.model.parameters(), strict=True)
    )
    out["ema_left_its_start"] = not _teacher_against_student(eng)["equal"]  # the first engine's stepped
    return out


@pytest.mark.distributed
def test_teacher_starts_as_a_frozen_fp32_copy_of_the_student(gloo, tmp_path):
    """The teacher equals the student when the engine starts (after any weights set on the task), and
    when a checkpoint without a teacher is loaded (``teacher_from_student``: distillation switched on
    for a run that had none); either way every teacher parameter is a separate fp32 tensor without
    gradients. On 2 ranks under ZeRO-2."""
    for rank, out in enumerate(gloo(2).run(_teacher_from_student_worker, str(tmp_path / "ckpt"))):
        for when in ("at_init", "loaded"):
            assert out[when]["count"] > 0 and all(out[when].values()), (rank, when, out)
        assert out["flag"] is True and out["student_from_checkpoint"] and out["ema_left_its_start"], out


def test_collapse_guard_waits_for_the_warmup_then_names_the_variance():
    cfg = DistillConfig(min_target_var=0.1, min_pred_var=0.01, collapse_warmup_steps=10)
    fine = {"distill_image_target_var": 0.5, "distill_image_pred_var": 0.05, "loss": 1.0}
    low = {**fine, "distill_image_pred_var": 0.001}
    assert collapse(cfg, 20, fine) is None and collapse(cfg, 10, low) is None
    why = collapse(cfg, 11, low)
    assert "distill_image_pred_var=0.001" in why and "objectives.distill.min_pred_var=0.01" in why


def test_collapse_guard_stops_a_run_and_export_teacher_writes_the_teachers_towers(demo_shards, tmp_path):
    """One rank, 3 steps, a target-variance bound no run meets after a 1-step warm-up: the run stops at
    step 2 with the guard's line; its step-1 checkpoint exports with --teacher to the teacher's towers."""
    from safetensors.torch import load_file

    from mmssl.ds_checkpoint import saved_teacher

    run_dir = tmp_path / "collapse"
    train = subprocess.run(
        [sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny_distill", "--run-dir", str(run_dir),
         f"data.train_shards={demo_shards}/train", "data.eval_shards=", "data.num_workers=0",
         "optim.micro_batch_size=8", "train.steps=3", "train.log_every=1", "train.ckpt_every=1",
         "objectives.distill.collapse_warmup_steps=1", "objectives.distill.min_target_var=100"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode != 0
    assert "step 2: distill_audio_target_var=" in train.stderr, train.stderr[-2000:]
    assert "objectives.distill.min_target_var=100: the distillation targets have collapsed" in train.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["distill_momentum"] > 0
    export = subprocess.run(
        [sys.executable, "-m", "mmssl.cli", "export", str(run_dir), "--out", str(tmp_path / "out"), "--teacher"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    teacher = saved_teacher(run_dir / "checkpoints")
    assert set(teacher) < set(exported)
    assert all(torch.equal(exported[k], v) for k, v in teacher.items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objectives.distill.enabled=true"], "objectives.distill.enabled but no masked objective is on"),
        (["objectives.distill.modalities=[\"image\"]", "objectives.masked_image.enabled=false"],
         "set objectives.masked_image.enabled=true"),
        (["objectives.distill.top_k=3"], "objectives.distill.top_k=3 exceeds model.image.depth=2"),
        (["objectives.distill.momentum_end=1.5"], "objectives.distill.momentum_end must be in [0, 1]"),
        (["objectives.distill.modalities=[\"video\"]"], "objectives.distill.modalities[0]: 'video'"),
        (["model.image.kind=timm", "model.image.timm_name=vit_tiny_patch16_224"],
         "objectives.distill trains model.image but its kind is 'timm'"),
    ],
)  # fmt: skip
def test_config_mistakes_name_the_field(overrides, message):
    preset = "tiny" if overrides == ["objectives.distill.enabled=true"] else "tiny_distill"
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(get_preset(preset), overrides).validate()
