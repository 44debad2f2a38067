"""The finite check of a training step: watched on the device per micro-batch, checked on the host once
per optimizer step. A non-finite loss inside an accumulation window skips that whole window: no weight,
no optimizer state and no learning rate change, its gradients are dropped (the next window's update is
the one it would have been without the bad window), under no ZeRO and under ZeRO-2."""

import torch

from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID

STAGES = (0, 2)


def _batch(cfg, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    text = torch.randint(1, 4000, (4, m.text.context_length), generator=g)
    text[:, 0], text[:, 5], text[:, 6:] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    return {
        "image": torch.randn(4, 3, m.image.image_size, m.image.image_size, generator=g),
        "text": text,
        "audio": torch.randn(4, m.audio.n_mels, m.audio.n_frames, generator=g),
        "present": {k: torch.ones(4, dtype=torch.bool) for k in ("image", "text", "audio")},
    }


def _snapshot(eng) -> list[torch.Tensor]:
    """Module weights, the optimizer's own parameters (ZeRO's fp32 master partition) and its state."""
    inner = getattr(eng.optimizer, "optimizer", eng.optimizer)
    masters = [p for group in inner.param_groups for p in group["params"]]
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    return [t.detach().clone() for t in [*eng.module.parameters(), *masters, *state]]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _window(eng, batches: list[dict], step: int, first: int, *, poison: bool = False) -> list:
    """Train one window of 2 micro-batches (``batches[first]``, ``batches[first + 1]``); ``poison`` makes
    the first one's loss non-finite."""
    from mmssl.train import train_step

    return [
        train_step(eng, batches[first + i], step=step, micro=i, poison=poison and i == 0) for i in range(2)
    ]


def _run_stage(stage: int, info) -> dict:
    from mmssl import engine
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset
    from mmssl.task import Task

    cfg = apply_overrides(get_preset("tiny"), [f"engine.zero_stage={stage}", "optim.grad_accum_steps=2"])
    batches = [_batch(cfg, seed) for seed in range(4)]
    torch.manual_seed(0)
    eng = engine.Engine(Task(cfg), cfg, info)
    checks, window_finite = [], eng.window_finite
    eng.window_finite = lambda: checks.append(1) or window_finite()  # count the host checks
    first = _window(eng, batches, 0, 0)
    before, lr = _snapshot(eng), eng.lr
    bad = _window(eng, batches, 1, 2, poison=True)
    after_bad, lr_after_bad = _snapshot(eng), eng.lr
    good = _window(eng, batches, 1, 0)
    result = _snapshot(eng)

    torch.manual_seed(0)
    reference = engine.Engine(Task(cfg), cfg, info)  # the same run without the bad window
    _window(reference, batches, 0, 0)
    _window(reference, batches, 1, 0)
    return {
        "stepped": [o is not None and o["stepped"] for o in first + good],
        "bad_window": [o is None if i else o is not None and not o["stepped"] for i, o in enumerate(bad)],
        "unchanged_by_bad_window": _same(before, after_bad) and lr_after_bad == lr,
        "next_window_as_without_it": _same(result, _snapshot(reference)),
        "host_checks": len(checks),
    }


def _window_worker(rank: int, world: int, stages: tuple[int, ...]) -> dict:
    from mmssl import engine

    info = engine.init_distributed()  # the pool's one-rank group
    return {stage: _run_stage(stage, info) for stage in stages}


def test_a_nonfinite_micro_batch_skips_its_window_with_one_check_per_step(gloo):
    (out,) = gloo(1).run(_window_worker, STAGES)
    expected = {
        "stepped": [False, True, False, True],
        "bad_window": [True, True],  # the first micro-batch accumulates, the boundary skips the window
        "unchanged_by_bad_window": True,
        "next_window_as_without_it": True,
        "host_checks": 3,  # three windows, one host check each (not one per micro-batch)
    }
    assert out == dict.fromkeys(STAGES, expected)
