"""engine.compile: compiled trunks give the eager loss and gradients, and keep the state dict keys; the
compiled code is what ran (dynamo's counters show graphs compiled and no frame falling back)."""

import copy

import torch
from test_flops import batch_for
from torch._dynamo.utils import counters

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
    torch._dynamo.reset()  # fresh caches and counters: graphs compiled by other tests do not count
    counters.clear()
    out_e = eager(batch, step=3)
    assert not counters["stats"]["unique_graphs"]  # the eager copy compiles nothing
    out_c = compiled(batch, step=3)
    # each trunk's forward became a graph (the MAE decoder's and both towers'), and dynamo ran it whole
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for name in out_e:
        assert torch.allclose(out_c[name], out_e[name], atol=1e-5), name
    out_e["loss"].backward()
    out_c["loss"].backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, atol=1e-5, rtol=1e-4), name
