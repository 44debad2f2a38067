"""View objectives: NT-Xent against a plain loop (SimCLR's definition), its 2-rank gathered form against
one process, the loader's second views, text dropout, and the task wiring."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from data_pipelines import AudioAugment, AudioSpec, ImageSpec, StreamConfig, build_loader, write_shards
from data_pipelines.synthetic import synthetic_samples
from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID, TextTowerConfig, ViewConfig, apply_overrides
from mmssl.encoders import TextTower
from mmssl.objectives import NTXentLoss, ViewObjective
from mmssl.presets import get_preset
from mmssl.task import Task

TEMPERATURE = 0.1


def reference_nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent written out: the 2n views z; anchor i's positive is its other view, every other
    view is a negative; the mean over all 2n anchors."""
    z = torch.cat([a, b])  # [2n, P]
    n2 = z.shape[0]
    total = torch.zeros(())
    for i in range(n2):
        positive = (i + n2 // 2) % n2
        sims = [torch.exp(z[i] @ z[k] / temperature) for k in range(n2) if k != i]
        total = total - torch.log(torch.exp(z[i] @ z[positive] / temperature) / sum(sims))
    return total / n2


def views(n: int = 16, p: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, p, generator=g)
    b = a + 0.7 * torch.randn(n, p, generator=g)  # correlated, as two views are
    return F.normalize(a, dim=-1), F.normalize(b, dim=-1)


def test_nt_xent_equals_the_plain_definition_with_and_without_absent_rows():
    a, b = views()
    loss = NTXentLoss(TEMPERATURE)
    everyone = torch.ones(16, dtype=torch.bool)
    assert torch.allclose(loss(a, b, everyone), reference_nt_xent(a, b, TEMPERATURE), atol=1e-5)
    valid = everyone.clone()
    valid[[0, 3, 4, 11]] = False
    ours = loss(a, b, valid)
    assert torch.allclose(ours, reference_nt_xent(a[valid], b[valid], TEMPERATURE), atol=1e-5)
    # absent rows' values do not matter at all, neither as anchors nor as negatives
    a2, b2 = a.clone(), b.clone()
    a2[~valid], b2[~valid] = views(4, seed=9)
    assert torch.allclose(loss(a2, b2, valid), ours, atol=1e-6)
    nobody = torch.zeros(16, dtype=torch.bool)
    assert loss(a, b, nobody) == 0  # zero, not NaN


def test_view_objective_head_and_term_name():
    cfg = ViewConfig(enabled=True, head_layers=3, head_width=32, out_dim=8, temperature=TEMPERATURE)
    objective = ViewObjective(cfg, "image", 16)
    linears = [m for m in objective.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    first, second = torch.randn(6, 16), torch.randn(6, 16)
    terms = objective(first, second, torch.ones(6, dtype=torch.bool))
    expected = reference_nt_xent(
        F.normalize(objective.head(first), dim=-1), F.normalize(objective.head(second), dim=-1), TEMPERATURE
    )
    assert list(terms) == ["views_image_loss"] and torch.allclose(
        terms["views_image_loss"], expected, atol=1e-5
    )


# Rows present per rank in the distributed test: uneven, and in the second pattern rank 1 holds none.
PRESENT = {
    "uneven": [True, False, True, True, True, True, False, True] + [True, True, False, True, True, True, True, False],
    "rank 1 empty": [True, True, False, True, True, True, True, True] + [False] * 8,
}  # fmt: skip


def _rank_worker(rank: int, world: int) -> dict:
    a, b = views()
    n = a.shape[0] // world
    out = {}
    for name, present in PRESENT.items():
        mine = slice(rank * n, (rank + 1) * n)
        la, lb = a[mine].clone().requires_grad_(True), b[mine].clone().requires_grad_(True)
        loss = NTXentLoss(TEMPERATURE, rank=rank, world_size=world)(la, lb, torch.tensor(present[mine]))
        loss.backward()
        out[name] = (loss.detach(), la.grad, lb.grad)
    return out


@pytest.mark.distributed
def test_two_rank_gathered_loss_and_gradients_equal_one_process(gloo):
    """2 gloo ranks: the mean over ranks of each rank's value and the rank-averaged gradients equal
    one process holding the whole batch (the engine averages gradients over ranks)."""
    world = 2
    per_rank = gloo(world).run(_rank_worker)
    results = {(r, name): value for r, out in enumerate(per_rank) for name, value in out.items()}
    a0, b0 = views()
    n = a0.shape[0] // world
    for name, present in PRESENT.items():
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        full = NTXentLoss(TEMPERATURE)(a, b, torch.tensor(present))
        full.backward()
        assert torch.allclose(full, reference_nt_xent(a0[present], b0[present], TEMPERATURE), atol=1e-5)
        mean_over_ranks = sum(results[(r, name)][0] for r in range(world)) / world
        assert torch.allclose(mean_over_ranks, full.detach(), atol=1e-6), name
        for rank in range(world):
            mine = slice(rank * n, (rank + 1) * n)
            _, grad_a, grad_b = results[(rank, name)]
            assert torch.allclose(grad_a / world, a.grad[mine], atol=1e-6), (name, rank)
            assert torch.allclose(grad_b / world, b.grad[mine], atol=1e-6), (name, rank)
        absent = ~torch.tensor(present)
        assert a.grad[absent].abs().sum() == 0 and b.grad[absent].abs().sum() == 0


# ------------------------------------------------------------------------------------------ the data

AUDIO = AudioSpec(sample_rate=8000, clip_samples=2000, n_fft=256, hop_length=64, n_mels=16)  # 32 frames


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    drop = {"wav": 0.3, "png": 0.2}
    samples = synthetic_samples(24, seed=4, drop=drop, seconds=(0.2, 0.6))
    return write_shards(samples, tmp_path_factory.mktemp("views"), max_count=8)["pattern"]


def stream(shards, **overrides) -> StreamConfig:
    base = dict(shards=shards, batch_size=8, image=ImageSpec(size=16), audio=AUDIO, num_workers=0,
                shuffle_buffer=8, views=("image", "audio"))  # fmt: skip
    return StreamConfig(**{**base, **overrides})


def batches(cfg: StreamConfig, n: int = 3, resume: dict | None = None) -> list[dict]:
    loader = build_loader(cfg, tokenizer=SimpleTokenizer(context_length=16), resume=resume)
    return list(itertools.islice(loader, n))


def test_loader_decodes_seeded_second_views_with_the_modality_presence(shards):
    first = batches(stream(shards))
    for batch in first:
        assert batch["image_view"].shape == batch["image"].shape == (8, 3, 16, 16)
        assert batch["audio_view"].shape == batch["audio"].shape == (8, 16, 32)
        for modality in ("image", "audio"):
            absent = ~batch["present"][modality]
            assert batch[f"{modality}_view"][absent].abs().sum() == 0
    assert any((~b["present"]["audio"]).any() for b in first)  # the check above saw absent rows
    # clips longer than the window are cropped at random: some second views differ from the first
    assert any((b["audio_view"] != b["audio"]).any() for b in first)
    again = batches(stream(shards))
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x["image_view"], y["image_view"]) and torch.equal(x["audio_view"], y["audio_view"])
    # the second views are drawn after everything else: the first views are those of a stream without
    without = batches(stream(shards, views=()))
    for x, y in zip(first, without, strict=True):
        assert "image_view" not in y and "audio_view" not in y
        for key in ("image", "audio", "text"):
            assert torch.equal(x[key], y[key]), key
    other_seed = batches(
        stream(shards, seed=1, audio=AudioSpec(**{**vars(AUDIO), "augment": AudioAugment(gain_db=6.0)}))
    )
    assert not torch.equal(other_seed[0]["audio_view"], other_seed[0]["audio"])


def test_resumed_loader_repeats_the_second_views(shards):
    cfg = stream(shards)
    straight = batches(cfg, 4)
    loader = build_loader(cfg, tokenizer=SimpleTokenizer(context_length=16))
    head = list(itertools.islice(loader, 2))
    resumed = batches(cfg, 2, resume=loader.state_dict())
    for x, y in zip(head + resumed, straight, strict=True):
        assert x["__key__"] == y["__key__"]
        assert torch.equal(x["image_view"], y["image_view"]) and torch.equal(x["audio_view"], y["audio_view"])


def test_views_are_for_image_and_audio_streams_only(shards):
    with pytest.raises(ValueError, match="views: 'text'"):
        stream(shards, views=("text",))
    with pytest.raises(ValueError, match="views: 'audio'"):
        stream(shards, audio=None)
    batch = batches(stream(shards, train=False), 1)[0]  # evaluation decodes no second view
    assert "image_view" not in batch and "audio_view" not in batch


# ----------------------------------------------------------------------------------- dropout and task


def tokens(b: int, length: int = 16) -> torch.Tensor:
    text = torch.randint(1, 40000, (b, length), generator=torch.Generator().manual_seed(1))
    text[:, 0], text[:, -1] = SOT_TOKEN_ID, EOT_TOKEN_ID
    return text


def test_text_dropout_acts_in_training_only_and_keeps_the_state_dict():
    torch.manual_seed(0)
    plain = TextTower(TextTowerConfig(), 32)
    torch.manual_seed(0)
    dropped = TextTower(TextTowerConfig(dropout=0.1), 32)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    text = tokens(4)
    assert torch.equal(plain.train()(text), plain(text))
    assert not torch.allclose(dropped.train()(text), dropped(text))
    dropped.eval()
    assert torch.allclose(dropped(text), plain.eval()(text), atol=1e-6)


def view_config(preset: str, *extra: str):
    on = ["objectives.views.image.enabled=true", "objectives.views.audio.enabled=true",
          "objectives.views.text.enabled=true", "model.text.dropout=0.1"]  # fmt: skip
    return apply_overrides(get_preset(preset), [*on, *extra]).validate()


def task_batch(cfg, b: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    image = torch.randn(b, 3, m.image.image_size, m.image.image_size, generator=g)
    audio = torch.randn(b, m.audio.n_mels, m.audio.n_frames, generator=g)
    batch = {"image": image, "image_view": image + 0.1 * torch.randn(image.shape, generator=g),
             "audio": audio, "audio_view": audio + 0.1 * torch.randn(audio.shape, generator=g), "text": tokens(b)}  # fmt: skip
    batch["present"] = {m: torch.ones(b, dtype=torch.bool) for m in ("image", "text", "audio")}
    batch["present"]["audio"][:3] = False
    return batch


@pytest.mark.parametrize("preset, extra", [("tiny", []), ("tiny_masked", []),
                                           ("tiny_masked", ["objectives.unmasked_contrastive_pass=true"])])  # fmt: skip
def test_task_with_views_gives_finite_terms_and_trains_the_heads(preset, extra):
    torch.manual_seed(0)
    cfg = view_config(preset, *extra)
    task = Task(cfg).train()
    batch = task_batch(cfg)
    out = task(batch, step=3)
    names = ["views_image_loss", "views_text_loss", "views_audio_loss"]
    assert all(name in out and torch.isfinite(out[name]) for name in names)
    o = cfg.objectives
    masked = [o.masked(m).loss.weight * out[f"masked_{m}_loss"] for m in ("image", "text", "audio")
              if f"masked_{m}_loss" in out]  # fmt: skip
    assert torch.allclose(out["loss"], out["contrastive_loss"] + sum(masked) + sum(out[n] for n in names))
    out["loss"].backward()
    for name, p in task.views.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # masks and dropout are seeded by (step, micro): the same call gives the same loss
    assert (
        torch.equal(task(batch, step=3)["loss"], out["loss"]) and task(batch, step=4)["loss"] != out["loss"]
    )
    # the loss weight scales the term it owns and nothing else
    cfg.objectives.views.audio.loss.weight = 0.0
    assert torch.allclose(task(batch, step=3)["loss"], out["loss"] - out["views_audio_loss"], atol=1e-5)


def test_views_off_leaves_the_task_as_it_was():
    plain = get_preset("tiny")
    torch.manual_seed(0)
    before = Task(plain)
    torch.manual_seed(0)
    after = Task(view_config("tiny"))
    shared = before.state_dict()
    for key, value in after.state_dict().items():
        if not key.startswith("views."):
            assert torch.equal(value, shared[key]), key
    out = before(task_batch(plain))
    assert not any(k.startswith("views_") for k in out) and len(before.views) == 0
    assert math.isfinite(float(out["loss"].detach()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objectives.views.text.enabled=true"], "set model.text.dropout > 0"),
        (["objectives.views.audio.enabled=true", "model.audio=null"], "objectives.views.audio.enabled but model.audio is off"),
        (["objectives.views.image.enabled=true", "engine.zero_stage=3"], "needs a second pass"),
        (["objectives.views.image.temperature=0"], "objectives.views.image.temperature must be > 0"),
        (["model.text.dropout=1.0"], r"model.text.dropout must be in \[0, 1\)"),
    ],
)  # fmt: skip
def test_config_names_the_setting_at_fault(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("tiny"), overrides).validate()


def test_zeroshot_prototypes_take_no_dropout_from_a_training_model():
    from mmssl import data
    from mmssl.eval.zeroshot import DEFAULT_TEMPLATES, Prompts

    cfg = view_config("tiny")
    model = Task(cfg).train().model
    prompts = Prompts(["zero", "one"], DEFAULT_TEMPLATES[:2])
    embed = lambda: prompts.embed(model, data.tokenizer(cfg), device=torch.device("cpu"))  # noqa: E731
    assert torch.equal(embed(), embed()) and model.training
