"""Every tower of every preset's registry entry: shapes, and per-sample independence."""

import dataclasses

import pytest
import torch

from mmssl.config import MODALITIES
from mmssl.encoders import build_encoder
from mmssl.model import MultimodalModel
from mmssl.presets import get_preset

TINY = get_preset("tiny").model


def random_input(modality: str, cfg, batch: int) -> torch.Tensor:
    if modality == "image":
        return torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    if modality == "audio":
        return torch.randn(batch, cfg.n_mels, cfg.n_frames)
    text = torch.randint(1, 1000, (batch, cfg.context_length))
    text[:, 0] = 49406  # start of text
    text[:, 6] = 49407  # end of text (the highest id)
    text[:, 7:] = 0
    return text


@pytest.mark.parametrize("modality", MODALITIES)
def test_tower_shapes_and_per_sample_independence(modality):
    torch.manual_seed(0)
    cfg = getattr(TINY, modality)
    tower = build_encoder(cfg, TINY.embed_dim).eval()
    x = random_input(modality, cfg, 4)
    out = tower(x)
    assert out.shape == (4, TINY.embed_dim)
    y = x.clone()
    if modality == "text":
        y[2, 3] = 4242
    else:
        y[2] = torch.randn_like(y[2])
    changed = tower(y)
    moved = (changed - out).abs().amax(dim=1)
    assert moved[2] > 1e-4
    assert torch.all(moved[[0, 1, 3]] < 1e-6)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_keep_index_sees_only_kept_patches(modality):
    torch.manual_seed(0)
    cfg = getattr(TINY, modality)
    tower = build_encoder(cfg, TINY.embed_dim).eval()
    x = random_input(modality, cfg, 2)
    keep = torch.stack([torch.randperm(tower.num_patches)[:3] for _ in range(2)])  # [B, K]
    feats = tower.forward_features(x, keep)
    assert feats.shape == (2, 1 + 3, cfg.width)
    patches = tower.patchify(x)
    assert patches.shape[:2] == (2, tower.num_patches)
    # changing a patch that is not kept changes nothing
    dropped = [i for i in range(tower.num_patches) if i not in keep[0].tolist()][0]
    y = x.clone()
    if modality == "image":
        p = cfg.patch_size
        r, c = divmod(dropped, cfg.image_size // p)
        y[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 5
    else:
        f, t = divmod(dropped, cfg.grid[1])
        y[
            0, f * cfg.patch_freq : (f + 1) * cfg.patch_freq, t * cfg.patch_time : (t + 1) * cfg.patch_time
        ] += 5
    assert not torch.equal(tower.patchify(y), patches)
    assert torch.allclose(tower.forward_features(y, keep), feats, atol=1e-6)
    # all patches kept in order equals no keep index
    all_idx = torch.arange(tower.num_patches).expand(2, -1)
    assert torch.allclose(tower.forward_features(x, all_idx), tower.forward_features(x), atol=1e-6)


def test_bidirectional_text_sees_later_tokens_and_ignores_padding():
    torch.manual_seed(0)
    cfg = get_preset("tiny").model.text
    causal = build_encoder(cfg, 16).eval()
    bidir = build_encoder(dataclasses.replace(cfg, causal=False), 16).eval()
    bidir.load_state_dict(causal.state_dict())
    x = random_input("text", cfg, 2)
    y = x.clone()
    y[0, 4] = 777  # a token after position 2
    assert torch.allclose(causal.forward_features(x)[0, 2], causal.forward_features(y)[0, 2], atol=1e-6)
    assert not torch.allclose(bidir.forward_features(x)[0, 2], bidir.forward_features(y)[0, 2], atol=1e-4)
    before = bidir(x)
    with torch.no_grad():  # padding keys are masked: what the pad token embeds to cannot matter
        bidir.token_embedding.weight[0] += 3.0
    assert torch.allclose(bidir(x), before, atol=1e-5)


def test_model_embeds_are_normalised():
    torch.manual_seed(0)
    model = MultimodalModel(TINY).eval()
    batch = {m: random_input(m, getattr(TINY, m), 3) for m in MODALITIES}
    out = model(batch)
    assert set(out) == set(MODALITIES)
    for emb in out.values():
        assert emb.shape == (3, TINY.embed_dim)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_patch_embedding_equals_the_patch_convolution(modality):
    """The towers embed patches with one matmul; the weights are a stride-p convolution's (open_clip's
    conv1), and the result is that convolution's, forward and backward."""
    import torch.nn.functional as F
    from einops import rearrange

    torch.manual_seed(0)
    cfg = getattr(TINY, modality)
    tower = build_encoder(cfg, TINY.embed_dim)
    x = random_input(modality, cfg, 3)
    ours = tower.embed_patches(x)
    if modality == "image":
        conv = F.conv2d(x, tower.conv1.weight, stride=cfg.patch_size)
    else:
        cropped = x[..., : cfg.grid[1] * cfg.patch_time]
        conv = F.conv2d(cropped[:, None], tower.conv1.weight, stride=(cfg.patch_freq, cfg.patch_time))
    reference = rearrange(conv, "b d h w -> b (h w) d")
    assert torch.allclose(ours, reference, atol=1e-5)
    (grad,) = torch.autograd.grad((ours**2).sum(), tower.conv1.weight)
    (expected,) = torch.autograd.grad((reference**2).sum(), tower.conv1.weight)
    assert torch.allclose(grad, expected, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_text_trimmed_after_the_longest_caption_gives_the_same_embeddings(causal):
    """data.trim_text cuts a batch after its last non-padding token: the tower's output is unchanged."""
    from data_pipelines import trim_padding

    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY.text, causal=causal)
    tower = build_encoder(cfg, TINY.embed_dim).eval()
    text = random_input("text", cfg, 3)  # end token at 6, padding after
    text[1, 4], text[1, 5:] = 49407, 0  # a shorter caption
    trimmed = trim_padding(text, min_length=2)
    assert trimmed.shape == (3, 7) and torch.equal(trimmed, text[:, :7])
    assert torch.allclose(tower(trimmed), tower(text), atol=1e-5)
    assert torch.allclose(tower.forward_features(trimmed), tower.forward_features(text)[:, :7], atol=1e-5)
    assert trim_padding(torch.zeros(2, 16, dtype=torch.long), min_length=5).shape == (2, 5)
