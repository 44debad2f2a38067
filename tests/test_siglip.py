"""SigLIP pairs: against open_clip's ``SigLipLoss`` (the reference), the chunked form against the plain
one, absent rows, and the exchanged 2-rank loss against one process holding the whole batch (real gloo
point-to-point and all-gather, 2 processes)."""

import math

import pytest
import torch
import torch.nn.functional as F
from batches import padded_batch

from mmssl.config import ContrastiveConfig, RunConfig, SigLipConfig, apply_overrides
from mmssl.objectives import ContrastiveObjective
from mmssl.objectives.siglip import SigLipLoss, bias_for_batch

MODALITIES = ("image", "text", "audio")


def features(n: int = 16, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: F.normalize(torch.randn(n, d, generator=g), dim=-1) for m in MODALITIES}


def leaf(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: f.clone().requires_grad_(True) for m, f in feats.items()}


def siglip_objective(world_size: int = 1, rank: int = 0, **siglip) -> ContrastiveObjective:
    cfg = ContrastiveConfig(kind="siglip", siglip=SigLipConfig(**siglip))
    return ContrastiveObjective(cfg, MODALITIES, rank=rank, world_size=world_size, global_batch=16)


def test_equals_open_clip_loss_and_gradients():
    from open_clip.loss import SigLipLoss as OpenClipSigLip

    objective = siglip_objective(init_bias=-3.0)
    with torch.no_grad():
        objective.logit_scale["image_text"].fill_(math.log(7.0))  # not the initial value
    ours_in = leaf(features())
    ours = objective(ours_in)["contrastive_image_text_loss"]
    ours.backward()

    theirs_in = leaf(features())
    log_scale = torch.tensor(math.log(7.0), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    theirs = OpenClipSigLip()(theirs_in["image"], theirs_in["text"], log_scale.exp(), bias)
    theirs.backward()

    assert torch.allclose(ours, theirs, atol=1e-5)
    for m in ("image", "text"):
        assert torch.allclose(ours_in[m].grad, theirs_in[m].grad, atol=1e-6), m
    assert torch.allclose(objective.logit_scale["image_text"].grad, log_scale.grad, atol=1e-5)
    assert torch.allclose(objective.logit_bias["image_text"].grad, bias.grad, atol=1e-5)


def test_chunked_form_equals_plain():
    feats = features(n=13)  # 13 rows: chunks of 4 leave a ragged last chunk
    valid = torch.ones(13, dtype=torch.bool)
    valid[[2, 11]] = False
    results = []
    for chunk_size in (0, 4):
        x, y = leaf({"a": feats["image"], "b": feats["text"]}).values()
        scale = torch.tensor(9.0, requires_grad=True)
        bias = torch.tensor(-2.0, requires_grad=True)
        loss = SigLipLoss(chunk_size=chunk_size)(x, y, scale, bias, valid)
        loss.backward()
        results.append((loss.detach(), x.grad, y.grad, scale.grad, bias.grad))
    for plain, chunked in zip(*results, strict=True):
        assert torch.allclose(plain, chunked, atol=1e-5)


def test_absent_rows_contribute_nothing():
    """Changing an absent row's features changes neither the loss nor any valid row's gradient, and
    the loss is the all-present loss over the valid rows alone."""
    objective = siglip_objective(init_bias=-2.0)
    present = {m: torch.ones(16, dtype=torch.bool) for m in MODALITIES}
    present["text"][[1, 4, 9]] = False
    present["image"][[4, 12]] = False
    keep = present["image"] & present["text"]

    def run(feats):
        x = leaf(feats)
        loss = objective(x, present)["contrastive_image_text_loss"]
        loss.backward()
        return loss.detach(), x["image"].grad[keep], x["text"].grad[keep]

    base = run(features())
    changed = features()
    changed["image"][12] = -changed["image"][12]  # image absent: row 12 drops out though text is present
    changed["text"][[1, 9]] = changed["image"][[1, 9]]  # text absent: a would-be perfect match
    for before, after in zip(base, run(changed), strict=True):
        assert torch.allclose(before, after, atol=1e-6)
    subset = {m: f[keep] for m, f in features().items()}
    assert torch.allclose(base[0], objective(subset)["contrastive_image_text_loss"], atol=1e-6)
    none = {m: torch.zeros(16, dtype=torch.bool) for m in MODALITIES}
    assert objective(features(), none)["contrastive_image_text_loss"] == 0  # zero, not NaN


def test_initial_bias_and_per_pair_kinds():
    cfg = ContrastiveConfig(kinds={"text_audio": "siglip"})
    objective = ContrastiveObjective(cfg, MODALITIES, global_batch=64)
    assert objective.kinds == {"image_text": "infonce", "image_audio": "infonce", "text_audio": "siglip"}
    assert list(objective.logit_bias) == ["text_audio"]
    p = 1 / 64
    assert objective.biases()["text_audio"].item() == pytest.approx(math.log(p / (1 - p)))
    assert objective.scales()["text_audio"].item() == pytest.approx(10.0)
    assert bias_for_batch(2) == 0.0
    terms = objective(features())
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in objective.parameters())
    # the command line sets one pair's kind; an unknown pair is refused with the field named
    run = apply_overrides(
        RunConfig(), ["objectives.contrastive.kinds.image_audio=siglip", "data.train_shards=x"]
    )
    assert run.validate().objectives.contrastive.kind_of("image_audio") == "siglip"
    apply_overrides(run, ["objectives.contrastive.kinds.text_audio=siglip"])  # one key at a time adds
    assert run.objectives.contrastive.kinds == {"image_audio": "siglip", "text_audio": "siglip"}
    apply_overrides(run, ['objectives.contrastive.kinds={"image_text": "siglip"}'])  # a mapping replaces
    assert run.objectives.contrastive.kinds == {"image_text": "siglip"}
    with pytest.raises(ValueError, match=r"objectives.contrastive.kinds.text_audio must be one of"):
        apply_overrides(run, ["objectives.contrastive.kinds.text_audio=sigmoid"])
    with pytest.raises(ValueError, match="objectives.contrastive.kinds: 'image_image'"):
        apply_overrides(run, ["objectives.contrastive.kinds.image_image=siglip"]).validate()


# Rows present per rank in the distributed test: uneven, and rank 1 holds none for the text pairs.
PRESENT = {"image": [True] * 5 + [False] + [True] * 10, "audio": [True] * 16,
           "text": [True, False, True, True, False, True, True, True] + [False] * 8}  # fmt: skip
EXCHANGES = ("bidir", "gather")


def _rank_worker(rank: int, world: int) -> dict:
    feats = features()
    n = feats["image"].shape[0] // world
    out = {}
    for exchange in EXCHANGES:
        local = leaf({m: f[rank * n : (rank + 1) * n] for m, f in feats.items()})
        present = {m: torch.tensor(PRESENT[m][rank * n : (rank + 1) * n]) for m in MODALITIES}
        objective = siglip_objective(world, rank, exchange=exchange, chunk_size=3)
        terms = objective(local, present)
        sum(terms.values()).backward()
        out[exchange] = (
            {k: v.detach() for k, v in terms.items()},
            {m: t.grad for m, t in local.items()},
            {k: p.grad for k, p in objective.named_parameters()},
        )
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_exchanged_loss_equals_full_batch(gloo, world: int):
    """2 ranks (one one-way hop) and 4 (a two-way round and a one-way hop), uneven presence (one rank
    with no valid text rows), both exchanges, chunked: the mean over ranks of each rank's loss, the
    rank-averaged feature and parameter gradients equal one process holding the whole batch."""
    per_rank_out = gloo(world).run(_rank_worker)
    results = {(world, r, ex): value for r, out in enumerate(per_rank_out) for ex, value in out.items()}
    feats = leaf(features())
    objective = siglip_objective()
    full = objective(feats, {m: torch.tensor(v) for m, v in PRESENT.items()})
    sum(full.values()).backward()
    n = feats["image"].shape[0] // world
    for exchange in EXCHANGES:
        per_rank = [results[(world, r, exchange)] for r in range(world)]
        for name, value in full.items():
            mean_over_ranks = sum(terms[name] for terms, _, _ in per_rank) / world
            assert torch.allclose(mean_over_ranks, value.detach(), atol=1e-5), (exchange, name)
        for rank, (_, grads, _) in enumerate(per_rank):
            # the exchange's backward returns every rank's gradient to the owner of the rows; the
            # engine's gradient averaging divides by the world size
            for m, grad in grads.items():
                expected = feats[m].grad[rank * n : (rank + 1) * n]
                assert torch.allclose(grad / world, expected, atol=1e-6), (exchange, rank, m)
        for name, p in objective.named_parameters():
            averaged = sum(param_grads[name] for _, _, param_grads in per_rank) / world
            assert torch.allclose(averaged, p.grad, atol=1e-5), (exchange, name)


def test_export_carries_the_biases_to_mmssl_and_open_clip(tmp_path):
    """An export folder made by hand (no DeepSpeed) with a SigLIP image-text pair exports again: the
    biases stay beside the scales, and open_clip builds its model with the pair's logit_bias."""
    import open_clip
    from safetensors.torch import load_file, save_file

    from mmssl import checkpoint
    from mmssl.config import save_json
    from mmssl.export import export
    from mmssl.model import MultimodalModel
    from mmssl.presets import tiny_siglip

    cfg = tiny_siglip()
    src = tmp_path / "src"
    src.mkdir()
    extras = {"logit_scale.image_text": torch.tensor(2.5), "logit_bias.image_text": torch.tensor(-4.25)}
    save_file({**MultimodalModel(cfg.model).state_dict(), **extras}, str(src / "model.safetensors"))
    save_json(cfg, src / "config.json")
    summary = export(src, tmp_path / "out")
    assert summary["logit_biases"] == {"image_text": -4.25}
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert float(saved["logit_bias.image_text"]) == -4.25
    assert checkpoint.load(tmp_path / "out").logit_biases == {"image_text": -4.25}
    oc = open_clip.create_model(summary["open_clip"]["model_name"], pretrained=None)
    assert oc.logit_bias.item() == -4.25 and oc.logit_scale.item() == 2.5


def test_mixed_pairs_train_together():
    """InfoNCE for two pairs, SigLIP for text-audio, in the training task: a fixed batch is fitted by
    every pair, each pair's own scale (and the SigLIP pair's bias) is learned and logged."""
    from mmssl.presets import tiny
    from mmssl.task import Task

    torch.manual_seed(0)
    cfg = apply_overrides(tiny(), ["objectives.contrastive.kinds.text_audio=siglip"])
    task = Task(cfg)
    batch = padded_batch(cfg, 8, eot=9, vocab=40000)
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    pairs = ("image_text", "image_audio", "text_audio")
    first = last = None
    for _ in range(25):
        out = task(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        last = {p: out[f"contrastive_{p}_loss"].item() for p in pairs}
        first = first or last
    assert all(last[p] < first[p] / 2 for p in pairs), (first, last)
    assert out["logit_scale_text_audio"] != 10.0 and out["logit_bias_text_audio"] != bias_for_batch(32)
    assert "logit_bias_image_text" not in out
