"""Model FLOPs per sample from the config's shapes, and the peak they are measured against (MFU).

Counted: every matmul and convolution of the towers, the masked-objective decoders and heads, the
view objectives' second passes, heads and logits, the distillation teacher's pass (forward only) and
decoders, and the contrastive logits, forward and backward (backward = 2 x forward, except the patch convolutions,
whose input is data and needs no gradient: 1 x forward). Masked passes count at their
real size: an MAE encoder sees ``K + 1`` tokens, not ``L + 1``; the MLM head runs on its fixed
number of selection slots per caption. Norms, softmax and elementwise work are left out, as in the usual MFU
accounting (PaLM, Megatron). ``tests/test_flops.py`` checks the count against torch's FLOP counter.

Peaks: on CUDA a table of dense bf16 tensor-core peaks; on CPU a short fp32 matmul probe, measured
once per machine and thread count and cached.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from mmssl.config import RunConfig
from mmssl.objectives.masked_text import selection_slots
from mmssl.objectives.masking import keep_count


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks over ``tokens`` tokens (per sample)."""
    t, d = tokens, width
    per_layer = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * int(d * mlp_ratio) + 2 * 2 * t * t * d
    return depth * per_layer


def tower_tokens(cfg: RunConfig) -> dict[str, int]:
    """Input tokens per sample of each tower (patches, or the text context)."""
    m = cfg.model
    out = {}
    if m.image is not None:
        out["image"] = m.image.num_patches
    if m.text is not None:
        out["text"] = m.text.context_length
    if m.audio is not None:
        out["audio"] = m.audio.grid[0] * m.audio.grid[1]
    return out


def forward_flops_per_sample(
    cfg: RunConfig, global_batch: int, text_tokens: int | None = None
) -> dict[str, float]:
    """Forward FLOPs per sample by part (each tower's passes with its objective, and the losses).
    ``text_tokens``: the text batch's length when trimmed below the context (``data.trim_text``)."""
    m, o = cfg.model, cfg.objectives
    e = m.embed_dim
    parts: dict[str, float] = {}
    for name, tower in (("image", m.image), ("audio", m.audio)):
        if tower is None:
            continue
        patches = tower_tokens(cfg)[name]
        patch_dim = 3 * tower.patch_size**2 if name == "image" else tower.patch_freq * tower.patch_time
        masked = o.masked(name)

        def encoder(seen: int, tower=tower) -> float:
            return (
                transformer_flops(seen + 1, tower.width, tower.depth, tower.mlp_ratio) + 2 * tower.width * e
            )

        passes = 2 if masked.enabled and o.unmasked_contrastive_pass else 1
        parts[f"{name}_patch_embed"] = passes * 2 * patches * patch_dim * tower.width  # over every patch
        if masked.enabled:
            k = keep_count(patches, masked.mask_ratio)
            dw = masked.decoder_width
            decoder = 2 * k * tower.width * dw + transformer_flops(patches, dw, masked.decoder_depth, 4.0)
            decoder += 2 * patches * dw * patch_dim
            parts[name] = encoder(k) + decoder + (encoder(patches) if o.unmasked_contrastive_pass else 0.0)
        else:
            parts[name] = encoder(patches)
    if m.text is not None:
        t = m.text
        encoder = transformer_flops(text_tokens or t.context_length, t.width, t.depth, t.mlp_ratio)
        encoder += 2 * t.width * e
        parts["text"] = encoder
        if o.masked_text.enabled:
            slots = selection_slots(t.context_length, o.masked_text.select_prob)  # the head's positions
            parts["text"] += slots * (2 * t.width * t.width + 2 * t.width * t.vocab_size)
            parts["text"] += encoder if o.unmasked_contrastive_pass else 0.0
    pairs = len(o.contrastive.pair_names(m.modalities))
    parts["contrastive"] = pairs * 2 * global_batch * e  # one [B, N] logit matmul per pair, per row
    parts.update(views_flops_per_sample(cfg, global_batch, text_tokens))
    parts.update(distill_flops_per_sample(cfg, text_tokens))
    return parts


def distill_flops_per_sample(cfg: RunConfig, text_tokens: int | None) -> dict[str, float]:
    """Forward FLOPs of self-distillation: the teacher's pass over each whole input (``distill_teacher_*``:
    no backward) and the student's decoder (patch towers) or head (text) on the masked positions."""
    m, d = cfg.model, cfg.objectives.distill
    parts: dict[str, float] = {}
    for name in cfg.distilled_modalities():
        tower = getattr(m, name)
        if name == "text":
            tokens = text_tokens or tower.context_length
            parts["distill_teacher_text"] = transformer_flops(
                tokens, tower.width, tower.depth, tower.mlp_ratio
            )
            slots = selection_slots(tower.context_length, cfg.objectives.masked_text.select_prob)
            parts["distill_text"] = slots * 2 * (2 * tower.width * tower.width)
            continue
        patches = tower_tokens(cfg)[name]
        patch_dim = 3 * tower.patch_size**2 if name == "image" else tower.patch_freq * tower.patch_time
        teacher = transformer_flops(patches + 1, tower.width, tower.depth, tower.mlp_ratio)
        parts[f"distill_teacher_{name}"] = teacher + 2 * patches * patch_dim * tower.width
        k = keep_count(patches, cfg.objectives.masked(name).mask_ratio)
        dw = d.decoder_width
        decoder = 2 * k * tower.width * dw + transformer_flops(patches, dw, d.decoder_depth, 4.0)
        parts[f"distill_{name}"] = decoder + 2 * patches * dw * tower.width
    return parts


def views_flops_per_sample(cfg: RunConfig, global_batch: int, text_tokens: int | None) -> dict[str, float]:
    """Forward FLOPs of the view objectives: the second view's pass (masked as the contrastive pass is,
    pooled without the projection), the head on both views, and NT-Xent's two ``[B, 2N]`` logit matmuls."""
    m, o = cfg.model, cfg.objectives
    parts: dict[str, float] = {}
    for name in o.views.enabled():
        tower, view = getattr(m, name), getattr(o.views, name)
        if tower is None:
            continue
        masked = o.masked(name).enabled and not o.unmasked_contrastive_pass
        if name == "text":
            encoder = transformer_flops(
                text_tokens or tower.context_length, tower.width, tower.depth, tower.mlp_ratio
            )
        else:
            patches = tower_tokens(cfg)[name]
            patch_dim = 3 * tower.patch_size**2 if name == "image" else tower.patch_freq * tower.patch_time
            parts[f"views_{name}_patch_embed"] = 2 * patches * patch_dim * tower.width
            seen = keep_count(patches, o.masked(name).mask_ratio) if masked else patches
            encoder = transformer_flops(seen + 1, tower.width, tower.depth, tower.mlp_ratio)
        dims = [tower.width] + [view.head_width] * (view.head_layers - 1) + [view.out_dim]
        head = sum(2 * d_in * d_out for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
        parts[f"views_{name}"] = encoder + 2 * head + 2 * 2 * (2 * global_batch) * view.out_dim
    return parts


def train_flops_per_sample(cfg: RunConfig, global_batch: int, text_tokens: int | None = None) -> float:
    """Forward + backward FLOPs per training sample (the EMA teacher's pass: forward only)."""
    parts = forward_flops_per_sample(cfg, global_batch, text_tokens)

    def passes(name: str) -> float:
        return 1.0 if name.startswith("distill_teacher_") else 2.0 if name.endswith("_patch_embed") else 3.0

    return sum(passes(name) * v for name, v in parts.items())


# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
GPU_PEAKS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16: the V100 has no bf16
    "RTX 4090": 165e12,
    "RTX A6000": 155e12,
}


def gpu_peak(name: str) -> float | None:
    for key, peak in GPU_PEAKS.items():  # most specific names first
        if key in name:
            return peak
    return None


def cpu_peak(threads: int, *, cache: Path | None = None, size: int = 1024, seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s on ``threads`` threads, measured once per machine and cached."""
    cache = cache or Path(os.environ.get("MMSSL_CACHE", Path.home() / ".cache" / "mmssl")) / "cpu_peak.json"
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|threads={threads}|n={size}"
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}  # unreadable: measure again and rewrite it
    if key in known:
        return known[key]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b  # warm-up
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            a @ b
            runs += 1
    finally:
        torch.set_num_threads(before)
    peak = 2 * size**3 * runs / elapsed
    cache.parent.mkdir(parents=True, exist_ok=True)
    known[key] = peak
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # ranks probe at once: write, then rename
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(cache)
    return peak


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s of one rank's device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name), f"{name} bf16 data sheet"
    threads = torch.get_num_threads()
    return cpu_peak(threads), f"fp32 matmul probe, {threads} thread(s)"
