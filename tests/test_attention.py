"""The SDPA self-attention equals open_clip's nn.MultiheadAttention block, forward and backward."""

import copy

import pytest
import torch
from open_clip.transformer import Transformer

from mmssl.encoders.attention import SelfAttention, sdpa_transformer

B, L, D, H = 3, 7, 32, 4


def _masks(kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """(mask for nn.MultiheadAttention, mask for SelfAttention, causal) of one kind."""
    if kind == "none":
        return None, None, False
    if kind == "causal":
        return torch.full((L, L), float("-inf")).triu_(1), None, True
    pad = torch.zeros(B, L)
    pad[0, 5:], pad[2, 2:] = float("-inf"), float("-inf")  # per-sample key padding
    return pad.repeat_interleave(H, 0)[:, None, :].expand(B * H, L, L), pad[:, None, None, :], False


@pytest.mark.parametrize("kind", ["none", "causal", "padding"])
def test_sdpa_blocks_equal_multihead_attention_forward_and_backward(kind):
    torch.manual_seed(0)
    mha_mask, sdpa_mask, causal = _masks(kind)
    reference = Transformer(D, 2, H, batch_first=True)
    ours = copy.deepcopy(reference)
    for block in ours.resblocks:
        block.attn = SelfAttention.adopt(block.attn, causal=causal)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(B, L, D)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = reference(xr, attn_mask=mha_mask), ours(xo, attn_mask=sdpa_mask)
    assert torch.allclose(out, out_ref, atol=1e-5)
    (out_ref**2).sum().backward()
    (out**2).sum().backward()
    assert torch.allclose(xo.grad, xr.grad, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(q.grad, p.grad, atol=1e-5), name


def test_sdpa_transformer_initialises_like_open_clip():
    torch.manual_seed(0)
    reference = Transformer(D, 2, H, batch_first=True)
    torch.manual_seed(0)
    ours = sdpa_transformer(D, 2, H, 4.0)
    for (name, p), q in zip(reference.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
