"""What each remaining difference between mmssl and open_clip_train costs, measured in one process.

``bench_vs_open_clip.py`` runs both trainers at equal work; what still differs between them is code
neither trainer can switch off from its command line. Each difference that runs on this device is timed
here on the same model shapes, batch and threads, as milliseconds per training step of each side's way:

- attention: open_clip's transformer trunks as open_clip builds them (``nn.MultiheadAttention``) against
  the same trunks with mmssl's :class:`~mmssl.encoders.attention.SelfAttention` (one SDPA call), forward
  and backward of the image tower's tokens and the causal text tower's, same weights;
- optimizer: one AdamW step with gradient clipping over the CLIP's parameters, open_clip_train's way
  (torch's ``foreach`` AdamW, ``clip_grad_norm_``) against mmssl's on CPU (torch's ``fused`` AdamW);
  DeepSpeed's engine wraps mmssl's, and its own bookkeeping is not in this figure.

The loader's effect comes from the trainers' own runs (each one's data-wait share of its step), and bf16
handling only exists on CUDA (``gpu_check.sh``). Medians of ``REPS`` timed repetitions after ``WARMUP`` untimed ones.
Imported by ``bench_vs_open_clip.py``, which also runs it alone:

    .venv/bin/python benchmarks/bench_vs_open_clip.py --differences-only --models small
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

REPS, WARMUP = 10, 3  # timed repetitions (their median is reported) after untimed ones


def median_ms(fn: Callable[[], object], reps: int = REPS) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def trunk_pair(width: int, depth: int, heads: int, causal: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """open_clip's batch-first Transformer and mmssl's build of it (SelfAttention in every block), each
    initialised as open_clip initialises it from the same seed."""
    from open_clip.transformer import Transformer

    from mmssl.encoders.attention import sdpa_transformer

    torch.manual_seed(0)
    theirs = Transformer(width, depth, heads, 4.0, batch_first=True)
    torch.manual_seed(0)
    return theirs, sdpa_transformer(width, depth, heads, 4.0, causal=causal)


def attention_ms(arch: Any, batch: int, reps: int) -> tuple[float, float]:
    """Forward + backward of both towers' trunks per step: (open_clip's, mmssl's) milliseconds."""
    towers = [  # (width, depth, heads, tokens, causal)
        (arch.image_width, arch.image_depth, arch.image_heads, (arch.image_size // arch.patch_size) ** 2 + 1, False),
        (arch.text_width, arch.text_depth, arch.text_heads, arch.context_length, True),
    ]  # fmt: skip
    totals = [0.0, 0.0]
    for width, depth, heads, tokens, causal in towers:
        x = torch.randn(batch, tokens, width)
        # open_clip builds the causal mask once and passes it as an additive float mask
        mask = torch.full((tokens, tokens), float("-inf")).triu_(1) if causal else None
        for k, trunk in enumerate(trunk_pair(width, depth, heads, causal)):
            kwargs = {"attn_mask": mask} if k == 0 and causal else {}

            def step(trunk=trunk, x=x, kwargs=kwargs) -> None:
                trunk(x, **kwargs).sum().backward()

            totals[k] += median_ms(step, reps)
    return totals[0], totals[1]


def optimizer_ms(arch: Any, reps: int) -> tuple[float, float]:
    """One clipped AdamW step over the CLIP's parameters: (open_clip's foreach, mmssl's fused) ms."""
    import open_clip

    cfg = arch.open_clip_config()["model_cfg"]
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for kind in ("foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **{kind: True})

        def step(opt=opt) -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        times.append(median_ms(step, reps))
    return times[0], times[1]


def measure(arch: Any, batch: int, threads: int, reps: int = REPS) -> list[dict[str, Any]]:
    """Each timed difference: name, open_clip's and mmssl's ms per step, and what each side does."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    attn = attention_ms(arch, batch, reps)
    opt = optimizer_ms(arch, reps)
    return [
        {"name": "attention", "open_clip_ms": attn[0], "mmssl_ms": attn[1],
         "what": "both trunks' forward + backward: nn.MultiheadAttention vs one SDPA call"},
        {"name": "optimizer", "open_clip_ms": opt[0], "mmssl_ms": opt[1],
         "what": "clip_grad_norm_ + AdamW step: foreach vs fused (DeepSpeed's bookkeeping not included)"},
    ]  # fmt: skip
