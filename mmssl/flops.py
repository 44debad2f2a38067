"""Model FLOPs per sample from the config's shapes, and the peak they are measured against (MFU).

Counted: every matmul and convolution of the towers, the masked-objective decoders and heads, the
view objectives' second passes, heads and logits, the distillation teacher's pass (forward only) and
decoders, and the contrastive logits, forward and backward (backward = 2 x forward, except the patch convolutions,
whose input is data and needs no gradient: 1 x forward). Masked passes count at their
real size: an MAE encoder sees ``K + 1`` tokens, not ``L + 1``; the MLM head runs on its fixed
number of selection slots per caption. A timm or Hugging Face tower is counted by torch's FLOP counter
on a model built on the meta device (shapes only, once per config), its patch embedding apart as for
the native towers (a timm convnet's first convolution stays with the rest: its backward counts 2 x). Norms, softmax and elementwise work are left out, as in the usual MFU
accounting (PaLM, Megatron). ``tests/test_flops.py`` checks the count against torch's FLOP counter.

Peaks: on CUDA a table of dense bf16 tensor-core peaks; on CPU a short fp32 matmul probe (warm-up, then
the best of several timed batches), measured once per machine and thread count and cached.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmssl.config import RunConfig
from mmssl.encoders import build_encoder
from mmssl.objectives.masked_text import selection_slots
from mmssl.objectives.masking import keep_count


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks over ``tokens`` tokens (per sample)."""
    t, d = tokens, width
    per_layer = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * int(d * mlp_ratio) + 2 * 2 * t * t * d
    return depth * per_layer


def tower_tokens(cfg: RunConfig) -> dict[str, int]:
    """Input tokens per sample of each tower (patches, or the text context; a timm tower without
    tokens: 1, the whole input)."""
    m = cfg.model
    out = {}
    if m.image is not None:
        out["image"] = (
            m.image.num_patches if m.image.kind == "native" else foreign_tower(cfg, "image").num_patches
        )
    if m.text is not None:
        out["text"] = m.text.context_length
    if m.audio is not None:
        out["audio"] = (
            m.audio.grid[0] * m.audio.grid[1]
            if m.audio.kind == "native"
            else foreign_tower(cfg, "audio").num_patches
        )
    return out


_FOREIGN: dict[str, nn.Module] = {}


def foreign_tower(cfg: RunConfig, name: str) -> nn.Module:
    """A timm or Hugging Face tower of ``cfg`` built on the meta device (no memory), once per config."""
    key = f"{name}|{cfg.model.embed_dim}|{getattr(cfg.model, name)!r}"
    if key not in _FOREIGN:
        with torch.device("meta"):
            _FOREIGN[key] = build_encoder(getattr(cfg.model, name), cfg.model.embed_dim)
    return _FOREIGN[key]


def counted(fn: Callable[[], object]) -> float:
    """torch's FLOP count of ``fn()`` (run on meta tensors: shapes only, nothing computed)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def foreign_encoder_flops(cfg: RunConfig, name: str, seen: int) -> float:
    """Forward FLOPs per sample of a timm or Hugging Face tower, counted by torch on meta tensors: every
    matmul and convolution, attention included, its patch embedding over the whole input. ``seen``:
    the kept patches of a masked pass, or the text length."""
    tower, e = foreign_tower(cfg, name), cfg.model.embed_dim
    with torch.device("meta"):
        if name == "text":  # no attention mask: Hugging Face reads the mask's values, which meta lacks
            ids = torch.zeros(1, seen, dtype=torch.long)
            return counted(lambda: tower.encoder(input_ids=ids)) + 2 * tower.width * e
        x = torch.zeros(1, *input_shape(cfg, name))
        keep = torch.zeros(1, seen, dtype=torch.long) if seen < tower.num_patches else None
    return counted(lambda: tower.forward_head(tower.forward_features(x, keep)))


def foreign_patch_embed_flops(cfg: RunConfig, name: str) -> float:
    """Forward FLOPs per sample of a timm ViT's patch embedding (0 for a tower without tokens, whose
    first convolution stays counted with the rest)."""
    tower = foreign_tower(cfg, name)
    if not tower.token_based:
        return 0.0
    with torch.device("meta"):
        x = tower._as_image(torch.zeros(1, *input_shape(cfg, name)))
    return counted(lambda: tower.trunk.patch_embed(x))


def input_shape(cfg: RunConfig, name: str) -> tuple[int, ...]:
    """One sample's input to a patch tower: ``(3, H, W)`` or ``(F, T)``."""
    t = getattr(cfg.model, name)
    return (3, t.image_size, t.image_size) if name == "image" else (t.n_mels, t.n_frames)


def patch_encoder_flops(cfg: RunConfig, name: str, seen: int) -> float:
    """Forward FLOPs per sample of a patch tower's encoder seeing ``seen`` patches, projection included,
    its patch embedding left out (counted on its own: its input needs no gradient)."""
    tower = getattr(cfg.model, name)
    if tower.kind != "native":
        return foreign_encoder_flops(cfg, name, seen) - foreign_patch_embed_flops(cfg, name)
    return (
        transformer_flops(seen + 1, tower.width, tower.depth, tower.mlp_ratio)
        + 2 * tower.width * cfg.model.embed_dim
    )


def patch_shape(cfg: RunConfig, name: str) -> tuple[int, int, int]:
    """(patches, values per patch, encoder width) of a patch tower."""
    tower = getattr(cfg.model, name)
    if tower.kind != "native":
        t = foreign_tower(cfg, name)
        return t.num_patches, (t.patch_dim if t.token_based else 0), t.width
    patch_dim = 3 * tower.patch_size**2 if name == "image" else tower.patch_freq * tower.patch_time
    return tower_tokens(cfg)[name], patch_dim, tower.width


def text_encoder_flops(cfg: RunConfig, tokens: int) -> float:
    t = cfg.model.text
    if t.kind != "native":
        return foreign_encoder_flops(cfg, "text", tokens)
    return transformer_flops(tokens, t.width, t.depth, t.mlp_ratio) + 2 * t.width * cfg.model.embed_dim


def mlm_head_flops(cfg: RunConfig, slots: int) -> float:
    t = cfg.model.text
    if t.kind == "native":
        return slots * (2 * t.width * t.width + 2 * t.width * t.vocab_size)
    tower = foreign_tower(cfg, "text")
    with torch.device("meta"):
        features = torch.zeros(1, slots, tower.width)
    return counted(lambda: tower.masked_lm_head()(features))


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
        patches, patch_dim, width = patch_shape(cfg, name)
        masked = o.masked(name)
        passes = 2 if o.unmasked_pass(name) else 1
        embed = (
            2 * patches * patch_dim * width
            if tower.kind == "native"
            else foreign_patch_embed_flops(cfg, name)
        )
        parts[f"{name}_patch_embed"] = passes * embed  # over every patch
        if masked.enabled:
            k = keep_count(patches, masked.mask_ratio)
            dw = masked.decoder_width
            decoder = 2 * k * width * dw + transformer_flops(patches, dw, masked.decoder_depth, 4.0)
            decoder += 2 * patches * dw * patch_dim
            parts[name] = patch_encoder_flops(cfg, name, k) + decoder
            parts[name] += patch_encoder_flops(cfg, name, patches) if o.unmasked_pass(name) else 0.0
        else:
            parts[name] = patch_encoder_flops(cfg, name, patches)
    if m.text is not None:
        t = m.text
        encoder = text_encoder_flops(cfg, text_tokens or t.context_length)
        parts["text"] = encoder
        if o.masked_text.enabled:
            slots = selection_slots(t.context_length, o.masked_text.select_prob)  # the head's positions
            parts["text"] += mlm_head_flops(cfg, slots)
            parts["text"] += encoder if o.unmasked_pass("text") else 0.0
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
    e = m.embed_dim
    parts: dict[str, float] = {}
    for name in o.views.enabled():
        tower, view = getattr(m, name), getattr(o.views, name)
        if tower is None:
            continue
        masked = o.masked(name).enabled and not o.unmasked_pass(name)
        if name == "text":
            width = cfg.model.text.width if tower.kind == "native" else foreign_tower(cfg, "text").width
            encoder = text_encoder_flops(cfg, text_tokens or tower.context_length) - 2 * width * e
        else:
            patches, patch_dim, width = patch_shape(cfg, name)
            parts[f"views_{name}_patch_embed"] = (
                2 * patches * patch_dim * width
                if tower.kind == "native"
                else foreign_patch_embed_flops(cfg, name)
            )
            seen = keep_count(patches, o.masked(name).mask_ratio) if masked else patches
            encoder = patch_encoder_flops(cfg, name, seen) - 2 * width * e
        dims = [width] + [view.head_width] * (view.head_layers - 1) + [view.out_dim]
        head = sum(2 * d_in * d_out for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
        parts[f"views_{name}"] = encoder + 2 * head + 2 * 2 * (2 * global_batch) * view.out_dim
    return parts


def train_flops_per_sample(cfg: RunConfig, global_batch: int, text_tokens: int | None = None) -> float:
    """Forward + backward FLOPs per training sample (the EMA teacher's pass: forward only)."""
    parts = forward_flops_per_sample(cfg, global_batch, text_tokens)

    def passes(name: str) -> float:
        return 1.0 if name.startswith("distill_teacher_") else 2.0 if name.endswith("_patch_embed") else 3.0

    return sum(passes(name) * v for name, v in parts.items())


def unmasked_tuning_config(cfg: RunConfig) -> RunConfig:
    """The run as its last ``objectives.unmasked_tuning_steps`` train it (FLIP's unmasked tuning): every
    masked objective off, so whole inputs, no decoder or MLM head, no distillation (it rides on the
    masked pass) and whole second views."""
    tuned = copy.deepcopy(cfg)
    for name in ("image", "text", "audio"):
        tuned.objectives.masked(name).enabled = False
    return tuned


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


def matmul_rate(
    matmul: Callable[[], object],
    flops: float,
    *,
    warmup: float,
    repeats: int,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The best FLOP/s of ``matmul`` (``flops`` each call). ``warmup`` seconds of calls first (at least
    three: the thread pool starts, the clock ramps up; their pace sizes the batches), then ``repeats``
    timed batches of about ``seconds / repeats`` each, and the fastest batch counts: a neighbour busy
    for a while (another rank starting up, a shared machine) slows some batches, not what the cores can
    do. One timed run, as this probe first did, read 5x low at a 2-rank start-up (MFU 450%)."""
    calls, start = 0, clock()
    while (elapsed := clock() - start) < warmup or calls < 3:
        matmul()
        calls += 1
    per_batch = max(1, round(seconds / repeats / (elapsed / calls)))
    best = math.inf
    for _ in range(repeats):
        start = clock()
        for _ in range(per_batch):
            matmul()
        best = min(best, clock() - start)
    return flops * per_batch / max(best, 1e-9)


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), so a cached peak is not reused on another host
    that shares the home directory ("x86_64" alone matched an EPYC's figure on a Xeon: MFU above 100%)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak(
    threads: int, *, cache: Path | None = None, size: int = 1024, seconds: float = 0.5, repeats: int = 5
) -> float:
    """fp32 matmul FLOP/s on ``threads`` threads (:func:`matmul_rate`), measured once per machine and
    cached (the key names the method: a figure from the single-timing probe is measured again)."""
    cache = cache or Path(os.environ.get("MMSSL_CACHE", Path.home() / ".cache" / "mmssl")) / "cpu_peak.json"
    key = f"{cpu_name()}|{os.cpu_count()}|threads={threads}|n={size}|best-of"
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
        peak = matmul_rate(lambda: a @ b, 2 * size**3, warmup=seconds / 2, repeats=repeats, seconds=seconds)
    finally:
        torch.set_num_threads(before)
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
