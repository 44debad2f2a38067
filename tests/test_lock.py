"""Locking towers (mmssl/lock.py, LiT): open_clip's layer groups, counted from the head; after training
under ZeRO-2 and ZeRO-3 every locked parameter is bit-identical to its start and the optimizer holds
state for the unlocked ones only."""

import pytest
import torch
from batches import padded_batch

from mmssl.config import apply_overrides
from mmssl.lock import describe, layer_groups
from mmssl.presets import tiny
from mmssl.task import Task


def test_groups_cover_each_parameter_once_and_unlock_from_the_head():
    task = Task(tiny())
    for name in ("image", "text", "audio"):
        tower = getattr(task.model, name)
        groups = layer_groups(tower)
        assert len(groups) == getattr(task.cfg.model, name).depth + 2
        ids = [id(p) for g in groups for p in g]
        assert sorted(ids) == sorted(id(p) for p in tower.parameters())  # each exactly once
    cfg = apply_overrides(
        tiny(), ["model.image.lock=true", "model.image.unlocked_groups=2", "model.text.lock=true"]
    ).validate()
    task = Task(cfg)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    image = {n.removeprefix("image.") for n in trainable if n.startswith("image.")}
    assert image == {"proj", "ln_post.weight", "ln_post.bias"} | {
        n for n, _ in task.model.image.named_parameters() if n.startswith("transformer.resblocks.1.")
    }
    assert not any(n.startswith("text.") for n in trainable)
    assert {n for n, _ in task.model.audio.named_parameters()} == {
        n.removeprefix("audio.") for n in trainable if n.startswith("audio.")
    }
    assert "M train)" in describe(task)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.image.unlocked_groups=1", "model.image.unlocked_groups=1 needs model.image.lock=true"),
        ("model.text.unlocked_groups=5", "model.text.unlocked_groups=5 exceeds the tower's 4 groups"),
    ],
)
def test_lock_settings_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(tiny(), ["model.text.lock=true", override]).validate()


def _train(stage: int, info) -> dict:
    from mmssl import engine
    from mmssl.train import train_step

    cfg = apply_overrides(
        tiny(),
        [f"engine.zero_stage={stage}", "model.image.lock=true", "model.text.lock=true",
         "model.text.unlocked_groups=1", "optim.lr=1e-2", "optim.warmup_steps=0"],
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    task = Task(cfg)
    locked = {n for n, p in task.named_parameters() if not p.requires_grad}
    eng = engine.Engine(task, cfg, info)
    batch = padded_batch(cfg, 4, eot=5, vocab=4000)
    before = {k: v.clone() for k, v in eng.gathered_state_dict().items()}
    for step in range(2):
        assert train_step(eng, batch, step=step, micro=0) is not None
    after = eng.gathered_state_dict()
    return {
        "locked": len(locked),
        "locked_unchanged": all(torch.equal(before[n], after[n]) for n in locked),
        "unlocked_changed": sorted(
            n for n in before if n not in locked and not torch.equal(before[n], after[n])
        ),
        "state_numel": sum(s["exp_avg"].numel() for s in eng.optimizer.optimizer.state.values()),
        "trainable": sum(p.numel() for p in task.parameters() if p.requires_grad),
        "locked_numel": sum(p.numel() for n, p in task.named_parameters() if n in locked),
    }


def _train_worker(rank: int, world: int) -> dict:
    from mmssl import engine

    info = engine.init_distributed()  # the pool's one-rank group
    return {stage: _train(stage, info) for stage in (2, 3)}


def test_locked_parameters_stay_bit_identical_and_have_no_optimizer_state(gloo):
    (out,) = gloo(1).run(_train_worker)
    for stage in (2, 3):
        result = out[stage]
        assert result["locked"] > 0 and result["locked_unchanged"], stage
        assert "model.text.text_projection" in result["unlocked_changed"], stage
        assert any(n.startswith("model.audio.") for n in result["unlocked_changed"]), stage
        # ZeRO's flat fp32 partition pads the trainable parameters to its alignment (a few elements)
        padding = result["state_numel"] - result["trainable"]
        assert 0 <= padding < 64 < result["locked_numel"], (stage, result)
