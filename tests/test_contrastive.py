"""The contrastive objective against a direct computation, and its 2-rank gathered value against the
single-process full batch (real gloo collectives, 2 processes)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.config import ContrastiveConfig
from mmssl.objectives import ContrastiveObjective

MODALITIES = ("image", "text", "audio")


def reference_loss(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def features(n: int = 16, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: F.normalize(torch.randn(n, d, generator=g), dim=-1) for m in MODALITIES}


def test_every_pair_equals_the_direct_computation():
    objective = ContrastiveObjective(ContrastiveConfig(init_temperature=0.1), MODALITIES)
    feats = features()
    terms = objective(feats)
    pairs = {"contrastive_image_text_loss", "contrastive_image_audio_loss", "contrastive_text_audio_loss"}
    assert set(terms) == pairs | {"contrastive_loss"}
    for name in pairs:
        a, b = name.removeprefix("contrastive_").removesuffix("_loss").split("_")
        assert torch.allclose(terms[name], reference_loss(feats[a], feats[b], 10.0), atol=1e-6)
    # every row present in every pair: the weighted mean is the plain mean
    assert torch.allclose(terms["contrastive_loss"], sum(terms[n] for n in pairs) / 3)


def test_absent_modality_drops_its_pairs_and_the_temperature_trains_past_its_bound():
    """The scale is not clamped in forward (the engine clamps the parameter after each step), so its
    gradient stays alive at and above the bound."""
    objective = ContrastiveObjective(ContrastiveConfig(max_logit_scale=20.0), MODALITIES)
    for log_scale in (math.log(20.0), 4.0):  # at the bound, and above it
        with torch.no_grad():
            objective.logit_scale["image_text"].fill_(log_scale)
        feats = features()
        del feats["audio"]
        terms = objective(feats)
        assert list(terms) == ["contrastive_image_text_loss", "contrastive_loss"]
        expected = reference_loss(feats["image"], feats["text"], math.exp(log_scale))
        assert torch.allclose(terms["contrastive_image_text_loss"], expected)
        objective.zero_grad()
        terms["contrastive_loss"].backward()
        assert objective.logit_scale["image_text"].grad.abs() > 1e-4, log_scale
    assert objective.clamp_bounds()[0][1:] == (0.0, math.log(20.0))


def _mixed_presence() -> dict[str, torch.Tensor]:
    """A mix of two sources: rows 0-9 image-text, rows 10-15 audio-text; no row has image and audio."""
    image = torch.arange(16) < 10
    return {"image": image, "text": torch.ones(16, dtype=torch.bool), "audio": ~image}


def test_pairs_are_weighted_by_rows_and_an_absent_pair_changes_nothing():
    present = _mixed_presence()
    runs = {}
    for pairs in ((), ("image_text", "text_audio")):  # every pair, and without the one that is absent
        torch.manual_seed(0)
        objective = ContrastiveObjective(ContrastiveConfig(pairs=pairs), MODALITIES)
        feats = {m: f.clone().requires_grad_(True) for m, f in features().items()}
        terms = objective(feats, present)
        terms["contrastive_loss"].backward()
        scale_grads = {n: p.grad for n, p in objective.logit_scale.items() if p.grad is not None}
        runs[pairs] = (terms, {m: f.grad for m, f in feats.items()}, scale_grads)
    (every, every_grads, every_scales), (two, two_grads, two_scales) = runs.values()
    assert every["contrastive_image_audio_loss"] == 0
    # 10 image-text rows and 6 audio-text rows: each valid (row, pair) counts once
    weighted = (10 * every["contrastive_image_text_loss"] + 6 * every["contrastive_text_audio_loss"]) / 16
    assert torch.allclose(every["contrastive_loss"], weighted)
    assert torch.allclose(every["contrastive_loss"], two["contrastive_loss"])
    for m in MODALITIES:
        assert torch.allclose(every_grads[m], two_grads[m], atol=1e-7), m
    for name, grad in two_scales.items():
        assert torch.allclose(every_scales[name], grad)
    assert every_scales["image_audio"] == 0  # present in the graph, but no row to learn from


def test_temperature_is_learnable():
    objective = ContrastiveObjective(ContrastiveConfig(), MODALITIES)
    sum(objective(features()).values()).backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in objective.logit_scale.values())


def test_all_present_equals_open_clip_and_absent_rows_drop_out():
    from open_clip.loss import ClipLoss

    feats = features()
    objective = ContrastiveObjective(ContrastiveConfig(), MODALITIES)
    scale = objective.scales()["image_text"]
    ours = objective(feats)["contrastive_image_text_loss"]
    assert torch.allclose(ours, ClipLoss()(feats["image"], feats["text"], scale), atol=1e-6)
    present = {m: torch.ones(16, dtype=torch.bool) for m in MODALITIES}
    present["text"][[1, 4, 9]] = False
    present["audio"][:] = False
    terms = objective(feats, present)
    keep = present["text"]
    subset = reference_loss(feats["image"][keep], feats["text"][keep], float(scale.detach()))
    assert torch.allclose(terms["contrastive_image_text_loss"], subset, atol=1e-6)
    assert terms["contrastive_image_audio_loss"] == 0  # no row has both: zero, not NaN


# Rows present per rank in the distributed test: uneven, and rank 1 holds none for the text pairs.
PRESENT = {"image": [True] * 16, "text": [True, False, True, True, False, True, True, True] + [False] * 8,
           "audio": [True] * 16}  # fmt: skip


def _rank_worker(rank: int, world: int) -> dict:
    feats = features()
    n = feats["image"].shape[0] // world
    out = {}
    for local_loss in (False, True):
        local = {m: f[rank * n : (rank + 1) * n].clone().requires_grad_(True) for m, f in feats.items()}
        present = {m: torch.tensor(PRESENT[m][rank * n : (rank + 1) * n]) for m in MODALITIES}
        cfg = ContrastiveConfig(local_loss=local_loss)
        objective = ContrastiveObjective(cfg, MODALITIES, rank=rank, world_size=world)
        terms = objective(local, present)
        sum(terms.values()).backward()
        out[local_loss] = (
            {k: v.detach() for k, v in terms.items()},
            {m: t.grad for m, t in local.items()},
        )
    return out


@pytest.mark.distributed
def test_two_rank_gathered_loss_equals_full_batch(gloo):
    """2 gloo ranks, uneven presence (one rank with no valid text rows), full gather and local loss:
    the mean over ranks of each rank's loss, and the rank-averaged gradients, equal one process
    holding the whole batch."""
    world = 2
    per_rank = gloo(world).run(_rank_worker)
    results = {(r, local_loss): value for r, out in enumerate(per_rank) for local_loss, value in out.items()}
    feats = {m: f.clone().requires_grad_(True) for m, f in features().items()}
    present = {m: torch.tensor(v) for m, v in PRESENT.items()}
    objective = ContrastiveObjective(ContrastiveConfig(), MODALITIES)
    full = objective(feats, present)
    sum(full.values()).backward()
    n = feats["image"].shape[0] // world
    for local_loss in (False, True):
        for name, value in full.items():
            mean_over_ranks = sum(results[(r, local_loss)][0][name] for r in range(world)) / world
            assert torch.allclose(mean_over_ranks, value.detach(), atol=1e-6), (local_loss, name)
        for rank in range(world):
            # the gather's backward sums every rank's gradient into the owner's rows; the engine's
            # gradient averaging divides by the world size again
            for m, grad in results[(rank, local_loss)][1].items():
                expected = feats[m].grad[rank * n : (rank + 1) * n]
                assert torch.allclose(grad / world, expected, atol=1e-6), (local_loss, rank, m)
