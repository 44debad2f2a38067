"""engine.compile: compiled trunks give the eager loss and gradients, and keep the state dict keys."""

import copy

import torch
from test_flops import batch_for

from mmssl.config import apply_overrides
from mmssl.engine import compile_trunks
from mmssl.presets import get_preset
from mmssl.task import Task


def test_compiled_trunks_equal_eager_forward_and_backward():
    torch.manual_seed(0)
    # image and text towers with MAE (audio and MLM off: fewer graphs to compile, the same code paths)
    cfg = apply_overrides(
        get_preset("tiny_masked"),
        ["model.audio=null", "objectives.masked_audio.enabled=false", "objectives.masked_text.enabled=false"],
    )
    eager = Task(cfg.validate())
    compiled = copy.deepcopy(eager)
    assert compile_trunks(compiled) == 3  # two towers and the MAE decoder
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    batch = batch_for(cfg, 4)
    out_e, out_c = eager(batch, step=3), compiled(batch, step=3)
    for name in out_e:
        assert torch.allclose(out_c[name], out_e[name], atol=1e-5), name
    out_e["loss"].backward()
    out_c["loss"].backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, atol=1e-5, rtol=1e-4), name
