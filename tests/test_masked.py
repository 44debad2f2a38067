"""Masked objectives: exact keep counts, parity with the unmasked pass at ratio 0, losses on masked
positions only, gradients into the encoders, and each objective overfitting a tiny fixed batch."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mmssl.config import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, MaskedPatchConfig, MaskedTextConfig
from mmssl.encoders import build_encoder
from mmssl.objectives import MaskedAudioObjective, MaskedImageObjective, MaskedTextObjective
from mmssl.objectives.masking import keep_count, mask_scores, random_keep
from mmssl.presets import get_preset
from mmssl.task import Task

MODEL = get_preset("tiny_masked").model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, MODEL.image.image_size, MODEL.image.image_size, generator=gen(1))


def spectrograms(b: int = 4) -> torch.Tensor:
    return torch.randn(b, MODEL.audio.n_mels, MODEL.audio.n_frames, generator=gen(2))


def texts(b: int = 4) -> torch.Tensor:
    t = torch.randint(1, 40000, (b, MODEL.text.context_length), generator=gen(3))
    t[:, 0], t[:, 9], t[:, 10:] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    return t


def patch_objective(modality: str, **overrides):
    tower_cfg = getattr(MODEL, modality)
    settings = {"enabled": True, "mask_ratio": 0.75 if modality == "image" else 0.8, **overrides}
    cfg = MaskedPatchConfig(**settings)
    build = MaskedImageObjective if modality == "image" else MaskedAudioObjective
    tower = build_encoder(tower_cfg, MODEL.embed_dim)
    return tower, build(cfg, tower)


@pytest.mark.parametrize("mode", ["unstructured", "time", "frequency", "time_frequency"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.8])
def test_keep_count_is_exact_random_and_reproducible(mode, ratio):
    grid = (8, 12)
    L = 96
    keep = random_keep(mask_scores(64, grid, mode, gen(0), torch.device("cpu")), ratio)
    assert keep.shape == (64, round(L * (1 - ratio)))
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)  # no index twice
    if ratio > 0:
        assert len({tuple(row.tolist()) for row in keep}) >= 5  # differs per sample
        again = random_keep(mask_scores(64, grid, mode, gen(0), torch.device("cpu")), ratio)
        other_step = random_keep(mask_scores(64, grid, mode, gen(1), torch.device("cpu")), ratio)
        assert torch.equal(keep, again) and not torch.equal(keep, other_step)
    assert keep_count(L, ratio) == keep.shape[1]


def test_time_masking_hides_whole_columns():
    keep = random_keep(
        mask_scores(8, (4, 12), "time", gen(0), torch.device("cpu")), 0.75
    )  # 12 kept = 3 columns
    for row in keep:
        columns = {int(i) % 12 for i in row}
        assert len(columns) == 3


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_ratio_zero_equals_unmasked_forward_and_backward(modality):
    torch.manual_seed(0)
    tower, objective = patch_objective(modality, mask_ratio=0.0)
    x = images() if modality == "image" else spectrograms()
    features, _ = objective(tower, x, torch.ones(4, dtype=torch.bool), gen(0))
    masked_emb = tower.forward_head(features)
    masked_emb.square().sum().backward()
    masked_grads = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    plain = tower(x)
    plain.square().sum().backward()
    assert torch.allclose(masked_emb, plain, atol=1e-6)
    for a, p in zip(masked_grads, tower.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_text_with_nothing_selected_equals_unmasked_pass():
    torch.manual_seed(0)
    tower = build_encoder(MODEL.text, MODEL.embed_dim)
    objective = MaskedTextObjective(MaskedTextConfig(enabled=True, select_prob=0.0), tower)
    t = texts()
    features, corrupted, terms = objective(tower, t, torch.ones(4, dtype=torch.bool), gen(0))
    assert torch.equal(corrupted, t) and terms["masked_text_loss"] == 0
    assert torch.allclose(tower.forward_head(features, corrupted), tower(t), atol=1e-6)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_reconstruction_loss_ignores_visible_targets_and_absent_rows(modality):
    torch.manual_seed(0)
    tower, objective = patch_objective(modality)
    x = images() if modality == "image" else spectrograms()
    present = torch.tensor([True, True, False, True])
    _, terms = objective(tower, x, present, gen(5))
    keep = objective.draw_keep(4, gen(5), x.device)  # the same draw the objective made
    true_targets = objective.targets(tower, x)
    visible_changed = true_targets.clone()
    rows = torch.arange(4)[:, None]
    visible_changed[rows, keep] += 7.0  # every visible patch's target
    visible_changed[2] += 3.0  # every target of the absent row
    objective.targets = lambda tower, x: visible_changed
    _, changed = objective(tower, x, present, gen(5))
    assert torch.allclose(terms[f"masked_{modality}_loss"], changed[f"masked_{modality}_loss"])
    masked_changed = true_targets.clone()
    masked_changed[0] += 1.0  # a masked patch of a present row does count
    objective.targets = lambda tower, x: masked_changed
    _, counted = objective(tower, x, present, gen(5))
    assert not torch.allclose(terms[f"masked_{modality}_loss"], counted[f"masked_{modality}_loss"])
    counted[f"masked_{modality}_loss"].backward()
    assert tower.conv1.weight.grad.abs().sum() > 0  # gradients reach the encoder


def selected_mask(objective: MaskedTextObjective, text: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    corrupted, positions, chosen = objective.corrupt(text, gen(seed))
    return corrupted, torch.zeros_like(text, dtype=torch.bool).scatter_(1, positions, chosen)


def test_mlm_corruption_statistics_and_loss_on_selected_only():
    torch.manual_seed(0)
    cfg = MaskedTextConfig(enabled=True)
    tower = build_encoder(MODEL.text, MODEL.embed_dim)
    objective = MaskedTextObjective(cfg, tower)
    t = torch.randint(1, 40000, (4000, MODEL.text.context_length), generator=gen(3))
    t[:, 0], t[:, -1] = SOT_TOKEN_ID, EOT_TOKEN_ID
    t[2000:, 5], t[2000:, 6:] = EOT_TOKEN_ID, 0  # half of them short: 4 ordinary tokens
    corrupted, selected = selected_mask(objective, t, 0)
    assert not (selected & ((t == SOT_TOKEN_ID) | (t == EOT_TOKEN_ID) | (t == 0))).any()  # specials never
    assert torch.equal(corrupted[~selected], t[~selected])  # unselected positions untouched
    for rows, ordinary in ((slice(0, 2000), 14), (slice(2000, None), 4)):  # 15% at every length
        assert abs(selected[rows].sum(1).float().mean() / ordinary - 0.15) < 0.01
    assert len({tuple(row.nonzero()[:, 0].tolist()) for row in selected[:200]}) > 50  # random positions
    as_mask = (corrupted[selected] == MASK_TOKEN_ID).float().mean()
    unchanged = (corrupted[selected] == t[selected]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02

    small = texts()
    features, corrupted, terms = objective(tower, small, torch.ones(4, dtype=torch.bool), gen(7))
    _, selected = selected_mask(objective, small, 7)
    assert selected.any()
    logits = objective.head(features)  # [B, L, V]
    reference = F.cross_entropy(logits[selected], small[selected])
    assert torch.allclose(terms["masked_text_loss"], reference, atol=1e-5)
    terms["masked_text_loss"].backward()
    assert tower.token_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["masked_image", "masked_text", "masked_audio"])
def test_each_objective_alone_overfits_a_fixed_batch(objective):
    """A fixed batch with fixed masks (step 0 every time): the objective alone must at least halve its loss."""
    torch.manual_seed(0)
    cfg = get_preset("tiny_masked")
    cfg.objectives.contrastive.loss.weight = 0.0
    for name in ("masked_image", "masked_text", "masked_audio"):
        getattr(cfg.objectives, name).loss.weight = 1.0 if name == objective else 0.0
    task = Task(cfg)
    batch = {"image": images(8), "text": texts(8), "audio": spectrograms(8)}
    batch["present"] = {m: torch.ones(8, dtype=torch.bool) for m in ("image", "text", "audio")}
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        out = task(batch, step=0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out[f"{objective}_loss"].item())
    assert min(losses[-10:]) < losses[0] / 2, (losses[0], losses[-10:])


def test_task_weights_schedules_and_one_pass():
    cfg = get_preset("tiny_masked")
    cfg.objectives.masked_image.loss = dataclasses.replace(
        cfg.objectives.masked_image.loss, schedule="linear_warmup", warmup_steps=10
    )
    task = Task(cfg)
    batch, calls = _batch_and_pass_counter(task)
    out = task(batch, step=4)
    assert calls == {"image": 1, "text": 1, "audio": 1}  # one encoder pass per tower
    o = cfg.objectives
    expected = (
        out["contrastive_loss"]
        + 0.5 * out["masked_image_loss"]  # linear warm-up: (4 + 1) / 10
        + o.masked_text.loss.weight * out["masked_text_loss"]
        + out["masked_audio_loss"]
    )
    assert torch.allclose(out["loss"], expected)
    assert out["masked_image_ratio"] == 0.75 and abs(float(out["masked_audio_ratio"]) - 0.8) < 0.05
    cfg.objectives.unmasked_contrastive_pass = True
    calls.update(image=0, text=0, audio=0)
    task(batch, step=4)
    assert calls == {"image": 2, "text": 2, "audio": 2}
    cfg.objectives.unmasked_contrastive_pass = ("audio",)  # the second pass for audio only
    calls.update(image=0, text=0, audio=0)
    task(batch, step=4)
    assert calls == {"image": 1, "text": 1, "audio": 2}


def _batch_and_pass_counter(task: Task) -> tuple[dict, dict[str, int]]:
    """A batch of 4 with every tower present, and a count of each tower's forward_features calls."""
    batch = {"image": images(4), "text": texts(4), "audio": spectrograms(4)}
    batch["present"] = {m: torch.ones(4, dtype=torch.bool) for m in ("image", "text", "audio")}
    calls = {m: 0 for m in ("image", "text", "audio")}
    for m in calls:
        getattr(task.model, m).forward_features = _counting(getattr(task.model, m).forward_features, calls, m)
    return batch, calls


def _counting(fn, calls, m):
    def wrapped(*args, **kwargs):
        calls[m] += 1
        return fn(*args, **kwargs)

    return wrapped


def test_unmasked_tuning_switches_masking_off_for_the_last_steps():
    """FLIP's unmasked tuning: with train.steps=10 and unmasked_tuning_steps=3, step 6 (0-based) is
    masked; from step 7 every tower sees its whole input once, the masked losses are gone, the ratios
    read 0 and the contrastive embeddings are the towers' plain (unmasked) ones."""
    cfg = get_preset("tiny_masked")
    cfg.train.steps, cfg.objectives.unmasked_tuning_steps = 10, 3
    cfg.validate()
    torch.manual_seed(0)
    task = Task(cfg)
    batch, calls = _batch_and_pass_counter(task)
    before = task(batch, step=6)
    assert before["masked_image_ratio"] == 0.75 and float(before["masked_audio_ratio"]) > 0.5
    assert float(before["masked_text_ratio"]) > 0 and "masked_image_loss" in before
    calls.update(image=0, text=0, audio=0)
    after = task(batch, step=7)
    assert calls == {"image": 1, "text": 1, "audio": 1}  # one pass per tower, on the whole input
    for m in ("image", "text", "audio"):
        assert after[f"masked_{m}_ratio"] == 0 and f"masked_{m}_loss" not in after
    plain = {m: task.model.embed(m, batch[m]) for m in ("image", "text", "audio")}
    assert torch.allclose(
        after["contrastive_loss"], task.contrastive(plain, batch["present"])["contrastive_loss"]
    )
    assert torch.allclose(after["loss"], after["contrastive_loss"])  # only the contrastive loss trains
    after["loss"].backward()
    assert all(p.grad is None for p in task.masked_image.parameters())  # the decoder rests


def test_unmasked_tuning_is_checked():
    cfg = get_preset("tiny")
    cfg.objectives.unmasked_tuning_steps = 5
    with pytest.raises(ValueError, match="no masked objective is on"):
        cfg.validate()
    cfg = get_preset("tiny_masked")
    cfg.objectives.unmasked_tuning_steps = cfg.train.steps + 1
    with pytest.raises(ValueError, match="more than train.steps"):
        cfg.validate()


def test_tied_mlm_head_is_the_token_embedding_and_gets_both_gradients():
    """``objectives.masked_text.tie_head`` (the default): the head's output weight is the token embedding
    itself (one parameter, one storage) and its bias its own; the task has exactly V x D parameters
    fewer than untied, every other initial weight the same. The one weight's gradient is the sum of the
    two an untied task with equal weights gives its embedding and its head (BERT's tying)."""
    tasks = {}
    for tie in (True, False):
        cfg = get_preset("tiny_masked")
        cfg.objectives.masked_text.tie_head = tie
        torch.manual_seed(0)
        tasks[tie] = Task(cfg.validate())
    tied, untied = tasks[True], tasks[False]
    embedding, out = tied.model.text.token_embedding.weight, tied.masked_text.head[-1]
    assert (
        out.weight is embedding
        and out.weight.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
    )
    assert out.bias is not None and out.bias.shape == (MODEL.text.vocab_size,)
    assert untied.masked_text.head[-1].weight is not untied.model.text.token_embedding.weight
    count = {tie: sum(p.numel() for p in task.parameters()) for tie, task in tasks.items()}
    assert count[False] - count[True] == MODEL.text.vocab_size * MODEL.text.width
    head_weight = "masked_text.head.3.weight"
    untied_state = untied.state_dict()
    assert all(torch.equal(v, untied_state[k]) for k, v in tied.state_dict().items() if k != head_weight)

    with torch.no_grad():
        untied.masked_text.head[-1].weight.copy_(embedding)
    b = 4
    batch = {"image": images(b), "text": texts(b), "audio": spectrograms(b)}
    batch["present"] = {m: torch.ones(b, dtype=torch.bool) for m in ("image", "text", "audio")}
    for task in (tied, untied):
        task(batch, step=0)["loss"].backward()
    both = untied.model.text.token_embedding.weight.grad + untied.masked_text.head[-1].weight.grad
    assert untied.masked_text.head[-1].weight.grad.abs().sum() > 0
    assert torch.allclose(embedding.grad, both, atol=1e-6)


# The MAE decoder's state-dict keys before it became the PatchDecoder shared with distillation, as
# that code wrote them (written out here, not derived from mmssl's own mapping): today's -> then.
_MAE_KEYS_THEN = {
    "decoder.embed.": "decoder_embed.",
    "decoder.mask_token": "mask_token",
    "decoder.pos": "decoder_pos",
    "decoder.blocks.": "decoder.",
    "decoder.norm.": "decoder_norm.",
    "decoder.pred.": "decoder_pred.",
}


def _as_then(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        rel = key.removeprefix(prefix)
        now = next(k for k in _MAE_KEYS_THEN if rel == k or (k.endswith(".") and rel.startswith(k)))
        out[prefix + _MAE_KEYS_THEN[now] + rel.removeprefix(now)] = value
    return out


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_old_mae_decoder_checkpoints_load_into_the_shared_decoder(modality, tmp_path):
    """The masked patch objectives and distillation share one PatchDecoder; a state dict saved before,
    with the MAE decoder's old keys, loads strictly into it (a pre-hook renames them) and predicts as
    the module it came from; a universal checkpoint's per-parameter folders are renamed alike."""
    from mmssl.ds_checkpoint import rename_legacy_params

    torch.manual_seed(0)
    tower, saved = patch_objective(modality)
    name = f"masked_{modality}"
    then = _as_then(torch.nn.ModuleDict({name: saved}).state_dict(), f"{name}.")
    assert {f"{name}.decoder_pos", f"{name}.mask_token", f"{name}.decoder_pred.weight"} <= set(then)
    assert f"{name}.decoder.resblocks.0.attn.in_proj_weight" in then
    torch.manual_seed(1)
    _, loaded = patch_objective(modality)
    assert not torch.equal(loaded.decoder.pos, saved.decoder.pos)
    torch.nn.ModuleDict({name: loaded}).load_state_dict(then)  # strict
    for (key, a), b in zip(saved.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    tokens = torch.randn(2, 5, tower.width)
    keep = torch.stack([torch.randperm(saved.decoder.pos.shape[0])[:5] for _ in range(2)])
    assert torch.equal(saved.decoder(tokens, keep), loaded.decoder(tokens, keep))
    zero = tmp_path / "zero"
    for key in [*then, "model.image.proj"]:
        (zero / key).mkdir(parents=True)
    rename_legacy_params(zero)
    assert sorted(p.name for p in zero.iterdir()) == sorted(
        [*saved.state_dict(prefix=f"{name}."), "model.image.proj"]
    )


def test_distill_decoder_is_the_mae_decoder_with_its_keys_unchanged():
    """Distillation's patch decoders are PatchDecoders predicting the tower width, under the keys its
    own decoder had (embed, mask_token, pos, blocks, norm, pred): old distill checkpoints load as they are."""
    from mmssl.objectives import DistillObjective
    from mmssl.objectives.masked_patches import PatchDecoder

    cfg = get_preset("tiny_distill")
    objective = DistillObjective(cfg.objectives.distill, cfg.model, ("image", "audio"))
    for modality in ("image", "audio"):
        decoder = objective.decoders[modality]
        assert isinstance(decoder, PatchDecoder)
        assert decoder.pred.out_features == getattr(cfg.model, modality).width
        keys = set(decoder.state_dict())
        assert {k.split(".")[0] for k in keys} == {"embed", "mask_token", "pos", "blocks", "norm", "pred"}
        assert "blocks.resblocks.0.attn.in_proj_weight" in keys
