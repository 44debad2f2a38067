"""What only a CUDA machine can check (marked ``cuda``; skipped here, run by benchmarks/gpu_check.sh):

- bf16: DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights), which
  ``engine.precision=auto`` picks on CUDA, follows the fp32 loss trajectory;
- FusedAdam: the optimizer ``build_optimizer`` picks on CUDA is DeepSpeed's FusedAdam, and one step
  of it matches torch's AdamW;
- the SDPA flash kernel: a whole bf16 training step (towers, and with the masked objectives the MAE
  encoders on their kept patches, decoders and MLM pass) with a causal text tower runs with only the
  flash kernel allowed (a call it cannot serve raises); a padded text tower at least avoids the math
  kernel (the memory-efficient one takes its mask);
- the loader hands out page-locked (pinned) batches on CUDA, copied to the GPU intact;
- DeepSpeed's 1-rank init on CUDA joins an NCCL group on cuda:0, and an all-reduce works.
"""

import pytest
import torch
from gloo_pool import spawned

from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]


def _batch(cfg, seed: int, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    m, n = cfg.model, 16
    text = torch.randint(1, 4000, (n, m.text.context_length), generator=g)
    text[:, 0], text[:, 7], text[:, 8:] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    batch = {
        "image": torch.randn(n, 3, m.image.image_size, m.image.image_size, generator=g),
        "text": text,
        "audio": torch.randn(n, m.audio.n_mels, m.audio.n_frames, generator=g),
        "present": {k: torch.ones(n, dtype=torch.bool) for k in ("image", "text", "audio")},
    }
    from mmssl.train import to_device

    return to_device(batch, torch.device(device), torch.float32)


def _trajectory_worker(_: int) -> dict:
    from mmssl import engine, ranks
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset
    from mmssl.task import Task
    from mmssl.train import to_device, train_step

    info = engine.init_distributed()
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = apply_overrides(get_preset("tiny"), [f"engine.precision={precision}", "optim.warmup_steps=5"])
        torch.manual_seed(0)
        eng = engine.Engine(Task(cfg), cfg, info)
        losses = []
        for step in range(30):
            batch = to_device(_batch(cfg, step % 4), info.device, eng.dtype)
            losses.append(float(train_step(eng, batch, step=step, micro=0)["loss"]))
        out[precision] = {"losses": losses, "dtype": str(eng.dtype)}
    ranks.shutdown()
    return out


def test_bf16_follows_the_fp32_loss_trajectory():
    (out,) = spawned(_trajectory_worker)
    assert out["bf16"]["dtype"] == "torch.bfloat16" and out["fp32"]["dtype"] == "torch.float32"
    fp32, bf16 = out["fp32"]["losses"], out["bf16"]["losses"]
    assert fp32[-1] < 0.8 * fp32[0] and bf16[-1] < 0.8 * bf16[0], (fp32, bf16)  # both learn
    gaps = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16, strict=True)]
    assert max(gaps) < 0.05, f"bf16 drifts from fp32 by up to {max(gaps):.1%}: {fp32} vs {bf16}"


def test_fused_adam_is_selected_on_cuda_and_steps_as_adamw():
    from deepspeed.ops.adam import FusedAdam

    from mmssl.engine import build_optimizer
    from mmssl.presets import get_preset
    from mmssl.task import Task

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    ours = Task(cfg).cuda()
    theirs = Task(cfg).cuda()
    theirs.load_state_dict(ours.state_dict())
    fused = build_optimizer(ours, cfg)
    assert isinstance(fused, FusedAdam)
    o = cfg.optim
    groups = [  # the same groups and settings as build_optimizer's
        {"params": [p for p in theirs.parameters() if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in theirs.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    for model, opt in ((ours, fused), (theirs, adamw)):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01) + 0.001 * torch.arange(p.numel(), device="cuda").view_as(p) % 7
        opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("preset", ["tiny", "tiny_masked"])
def test_attention_runs_on_the_flash_kernel(preset):
    """A whole training forward and backward in bf16 (towers; under tiny_masked also the MAE encoders
    on their kept patches, the decoders and the MLM pass) with only the flash kernel allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset
    from mmssl.task import Task

    def step(causal: bool, backends: list) -> None:
        cfg = apply_overrides(get_preset(preset), [f"model.text.causal={str(causal).lower()}"])
        task = Task(cfg).cuda().to(torch.bfloat16)
        batch = _batch(cfg, 0, "cuda")
        batch = {
            k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()
        }
        with sdpa_kernel(backends):  # an attention call none of these kernels can serve raises
            task(batch, step=0)["loss"].float().backward()

    step(True, [SDPBackend.FLASH_ATTENTION])
    # a padded (non-causal) text tower passes an additive mask, which flash does not take: not the math kernel
    step(False, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def test_loader_batches_are_pinned_and_reach_the_gpu_intact(demo_shards):
    from mmssl import data
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset
    from mmssl.train import to_device

    cfg = apply_overrides(
        get_preset("tiny"),
        [f"data.train_shards={demo_shards}/train", "data.num_workers=1", "optim.micro_batch_size=8"],
    )
    assert data.stream_config(cfg, train=True).pin_memory
    batch = next(iter(data.loader(cfg, train=True)))
    tensors = [batch["image"], batch["text"], batch["audio"]]
    assert all(t.is_pinned() for t in tensors)
    on_gpu = to_device(batch, torch.device("cuda"), torch.float32)
    torch.cuda.synchronize()
    for name, t in zip(("image", "text", "audio"), tensors, strict=True):
        assert on_gpu[name].is_cuda and torch.equal(
            on_gpu[name].cpu(), t.float() if t.is_floating_point() else t
        )


def _nccl_worker(_: int) -> dict:
    import torch.distributed as dist

    from mmssl import engine, ranks

    info = engine.init_distributed()
    x = torch.full((4,), 3.0, device=info.device)
    dist.all_reduce(x)
    out = dict(backend=dist.get_backend(), device=str(info.device), world=info.world_size, sum=x.tolist())
    ranks.shutdown()
    return out


def test_one_rank_init_joins_an_nccl_group_on_the_gpu():
    assert spawned(_nccl_worker) == [{"backend": "nccl", "device": "cuda:0", "world": 1, "sum": [3.0] * 4}]
