"""The contrastive objective against a direct computation, and its 2-rank gathered value against the
single-process full batch (real gloo collectives, 2 processes)."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmssl.config import ContrastiveConfig
from mmssl.engine import free_port
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
    assert set(terms) == {
        "contrastive_image_text_loss",
        "contrastive_image_audio_loss",
        "contrastive_text_audio_loss",
    }
    for name, value in terms.items():
        a, b = name.removeprefix("contrastive_").removesuffix("_loss").split("_")
        assert torch.allclose(value, reference_loss(feats[a], feats[b], 10.0), atol=1e-6)


def test_absent_modality_drops_its_pairs_and_scale_is_clamped():
    objective = ContrastiveObjective(ContrastiveConfig(max_logit_scale=20.0), MODALITIES)
    with torch.no_grad():
        objective.logit_scale["image_text"].fill_(10.0)  # exp(10) >> 20
    feats = features()
    del feats["audio"]
    terms = objective(feats)
    assert list(terms) == ["contrastive_image_text_loss"]
    assert torch.allclose(
        terms["contrastive_image_text_loss"], reference_loss(feats["image"], feats["text"], 20.0)
    )


def test_temperature_is_learnable():
    objective = ContrastiveObjective(ContrastiveConfig(), MODALITIES)
    sum(objective(features()).values()).backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in objective.logit_scale.values())


def _rank_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    feats = features()
    n = feats["image"].shape[0] // world
    local = {m: f[rank * n : (rank + 1) * n].clone().requires_grad_(True) for m, f in feats.items()}
    objective = ContrastiveObjective(ContrastiveConfig(), MODALITIES, rank=rank, world_size=world)
    terms = objective(local)
    sum(terms.values()).backward()
    out[rank] = (
        {k: v.detach() for k, v in terms.items()},
        {m: t.grad for m, t in local.items()},
    )
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gathered_loss_equals_full_batch():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(world, free_port(), out), nprocs=world, join=True)
        results = dict(out)
    feats = {m: f.clone().requires_grad_(True) for m, f in features().items()}
    objective = ContrastiveObjective(ContrastiveConfig(), MODALITIES)
    full = objective(feats)
    sum(full.values()).backward()
    n = feats["image"].shape[0] // world
    for rank, (terms, grads) in results.items():
        for name, value in full.items():
            assert torch.allclose(terms[name], value.detach(), atol=1e-6), (rank, name)
        # every rank holds the full loss; the gather's backward sums their gradients, which the
        # engine's gradient averaging divides by the world size again
        for m, grad in grads.items():
            assert torch.allclose(grad / world, feats[m].grad[rank * n : (rank + 1) * n], atol=1e-6), (
                rank,
                m,
            )
