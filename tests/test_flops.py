"""The analytic FLOP count equals torch's FLOP counter on real forward+backward passes."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID, apply_overrides
from mmssl.flops import cpu_peak, gpu_peak, train_flops_per_sample
from mmssl.presets import get_preset
from mmssl.task import Task


def batch_for(cfg, b: int) -> dict:
    m = cfg.model
    text = torch.randint(1, 40000, (b, m.text.context_length))
    text[:, 0], text[:, -1] = SOT_TOKEN_ID, EOT_TOKEN_ID
    batch = {"image": torch.randn(b, 3, m.image.image_size, m.image.image_size), "text": text}
    if m.audio is not None:
        batch["audio"] = torch.randn(b, m.audio.n_mels, m.audio.n_frames)
    batch["present"] = {k: torch.ones(b, dtype=torch.bool) for k in batch}
    return batch


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", []),
        ("tiny_masked", []),
        ("tiny_masked", ["objectives.unmasked_contrastive_pass=true"]),
        ("tiny_masked", ["objectives.masked_audio.mode=time", 'objectives.contrastive.pairs=["image_text"]']),
    ],
)
def test_count_matches_torch_flop_counter(preset, overrides):
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset(preset), overrides)
    task = Task(cfg)
    b = 8
    # the math attention kernel decomposes into matmuls that the counter sees
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        task(batch_for(cfg, b))["loss"].backward()
    measured = counter.get_total_flops() / b
    assert train_flops_per_sample(cfg, b) == pytest.approx(measured, rel=2e-3)


def test_peaks(tmp_path):
    assert gpu_peak("NVIDIA H100 80GB HBM3") == 989e12 and gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak("Some Future GPU") is None
    cache = tmp_path / "peak.json"
    first = cpu_peak(1, cache=cache, size=256, seconds=0.05)
    assert first > 1e8 and cache.is_file()
    assert cpu_peak(1, cache=cache, size=256, seconds=0.05) == first  # cached, not re-measured
