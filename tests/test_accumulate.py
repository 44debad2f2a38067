"""Cached accumulation (objectives.contrastive.accumulate=cached): on 2 ranks, with every masked
objective and every view objective on, one window of K=2 micro-batches of B rows gives the gradient of
one batch of 2B rows (the reference below: the contrastive and view losses over the concatenation, each
micro-batch's masked terms with its own masks); plain "local" accumulation does not. Then a short `mmssl train` in cached mode,
with a non-finite window skipped as a unit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gloo_pool import engine_rank

from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID

REPO = Path(__file__).resolve().parents[1]
B, K, WORLD = 4, 2, 2
MODALITIES = ("image", "text", "audio")
# stage 0 leaves the averaged gradient on each parameter until the optimizer steps; no clipping
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 0},
    "bf16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
}


def micro_batch(cfg, rank: int, micro: int) -> dict:
    """Distinct rows per (rank, micro); some rows lack audio or text."""
    g = torch.Generator().manual_seed(100 * rank + micro)
    m = cfg.model
    text = torch.randint(1, 40000, (B, m.text.context_length), generator=g)
    for row in range(B):
        end = 4 + row
        text[row, 0], text[row, end], text[row, end + 1 :] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    present = {k: torch.ones(B, dtype=torch.bool) for k in MODALITIES}
    present["audio"][(rank + micro) % B] = False
    present["text"][(rank + 2 * micro + 1) % B] = False
    return {
        "__key__": [f"r{rank}m{micro}s{i}" for i in range(B)],
        "image": torch.randn(B, 3, m.image.image_size, m.image.image_size, generator=g),
        "text": text,
        "audio": torch.randn(B, m.audio.n_mels, m.audio.n_frames, generator=g),
        "image_view": torch.randn(B, 3, m.image.image_size, m.image.image_size, generator=g),
        "audio_view": torch.randn(B, m.audio.n_mels, m.audio.n_frames, generator=g),
        "present": present,
    }


def reference_gradients(task, batches) -> dict[str, torch.Tensor]:
    """One batch of K*B rows: the contrastive loss on the concatenated embeddings (gathered across
    ranks) and the weighted view losses on the concatenated projections, plus the mean over
    micro-batches of each one's weighted masked terms (its own masks and dropout, seeded by its micro
    index); then the ranks' gradients averaged, as the engine does."""
    embeddings, projections, masked = [], [], []
    for micro, batch in enumerate(batches):
        e, terms, views = task.encode(batch, 0, micro)
        embeddings.append(e)
        projections.append(views)
        masked.append(task.add_local_terms(torch.zeros(()), terms, 0))
    joined = {m: torch.cat([e[m] for e in embeddings]) for m in MODALITIES}
    present = {m: torch.cat([b["present"][m] for b in batches]) for m in MODALITIES}
    views = {m: tuple(torch.cat([p[m][i] for p in projections]) for i in (0, 1)) for m in MODALITIES}
    contrastive = task.contrastive(joined, present)["contrastive_loss"]
    loss = task.cfg.objectives.contrastive.loss.at(0) * contrastive
    loss = task.add_local_terms(loss, task.view_terms(views, present), 0) + torch.stack(masked).mean()
    loss.backward()
    grads = {}
    for name, p in task.named_parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            grads[name] = p.grad / WORLD
    return grads


def _worker(rank: int, world: int, ds_config: str) -> dict:
    import copy
    import dataclasses

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from mmssl import accumulate, engine
    from mmssl.presets import get_preset
    from mmssl.task import Task
    from mmssl.train import train_step

    info = engine_rank(rank, world)  # joins the pool's process group
    cfg = get_preset("tiny_masked")
    cfg.optim.micro_batch_size, cfg.optim.grad_accum_steps = B, K
    cfg.optim.lr = 0.0  # the weights stay put, so both modes see the same ones
    cfg.engine.ds_config = ds_config
    cfg.objectives.contrastive.loss = dataclasses.replace(cfg.objectives.contrastive.loss, weight=0.7)
    for m in MODALITIES:  # SimCLR / SimCSE terms, whose negatives also span the window
        getattr(cfg.objectives.views, m).enabled = True
    cfg.model.text.dropout = 0.1  # SimCSE's two views: two dropout draws, replayed in the second pass
    torch.manual_seed(cfg.train.seed)
    task = Task(cfg, rank=rank, world_size=WORLD)
    reference = copy.deepcopy(task)
    eng = engine.Engine(task, cfg, info)
    captured = {}

    def capture(optimizer, args, kwargs):  # the gradient the optimizer is about to apply
        captured.update({n: p.grad.clone() for n, p in eng.module.named_parameters() if p.grad is not None})

    hook = register_optimizer_step_pre_hook(capture)  # global: removed below, the rank serves other tests
    batches = [micro_batch(cfg, rank, micro) for micro in range(K)]
    for micro, batch in enumerate(batches):
        train_step(eng, batch, step=0, micro=micro)
    local = dict(captured)
    out_cached = accumulate.train_window(eng, batches, step=0)
    cached = dict(captured)
    expected = reference_gradients(reference, batches)

    def max_diff(grads):
        return max((grads[n] - g).abs().max().item() for n, g in expected.items())

    hook.remove()
    return {
        "names": (sorted(expected), sorted(cached)),
        "cached": max_diff(cached),
        "local": max_diff(local),
        "scale_grad": min(expected[n].abs().item() for n in expected if "logit_scale" in n),
        "largest": max(g.abs().max().item() for g in expected.values()),
        "logged_masked_text": out_cached["masked_text_loss"].item(),
        "view_grad": min(expected[n].abs().max().item() for n in expected if n.startswith("views.")),
        "logged_views": [out_cached[f"views_{m}_loss"].item() for m in MODALITIES],
    }


@pytest.mark.distributed
def test_cached_window_gradient_equals_one_big_batch(gloo, tmp_path):
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text(json.dumps(DS_CONFIG))
    results = gloo(WORLD).run(_worker, str(ds_config))
    for rank, r in enumerate(results):
        expected_names, cached_names = r["names"]
        assert expected_names == cached_names, rank  # every parameter, the logit scales included
        assert r["scale_grad"] > 1e-4  # the scales' gradient is in the comparison, not zero
        assert r["view_grad"] > 1e-4, (rank, r)  # every view head trains, in the comparison too
        assert all(v > 0 for v in r["logged_views"]), (rank, r)  # the window's view terms are logged
        assert r["cached"] < 1e-6 * max(1.0, r["largest"]), (rank, r)
        # local accumulation scores each micro-batch against its own negatives only: a different gradient
        assert r["local"] > 1e-3 * r["largest"], (rank, r)


def test_train_runs_cached_windows_and_skips_a_nonfinite_window_whole(demo_shards, tmp_path):
    """`mmssl train` with accumulate=cached (and the unmasked contrastive pass, which the test above
    leaves out): every step is one window of K micro-batches; attempt 3 (the first micro-batch of the
    second window) is made non-finite, so that whole window is skipped, and the key log marks both of
    its micro-batches."""
    run_dir = tmp_path / "cached"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny_masked", "--run-dir", str(run_dir),
            f"data.train_shards={demo_shards}/train", "data.eval_shards=", "data.num_workers=0",
            "optim.micro_batch_size=4", f"optim.grad_accum_steps={K}", "objectives.contrastive.accumulate=cached",
            "train.steps=3", "train.log_every=1", "train.record_keys=true", "train.inject_nonfinite_at=[3]",
            "objectives.unmasked_contrastive_pass=true",
        ],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(r["loss"] == r["loss"] and r["masked_image_loss"] > 0 for r in rows)
    keys = [json.loads(line) for line in (run_dir / "keys" / "rank0.jsonl").read_text().splitlines()]
    assert [(k["step"], k["skipped"]) for k in keys] == [
        (1, False), (1, False), (2, True), (2, True), (2, False), (2, False), (3, False), (3, False)
    ]  # fmt: skip
    assert all(len(k["keys"]) == 4 for k in keys)
