"""The analytic FLOP count equals torch's FLOP counter on real forward+backward passes."""

import json
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmssl import flops
from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID, apply_overrides
from mmssl.flops import cpu_peak, gpu_peak, matmul_rate, train_flops_per_sample
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
    for modality in cfg.objectives.views.enabled():
        if modality != "text":
            batch[f"{modality}_view"] = batch[modality].clone()
    return batch


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", []),
        ("tiny_masked", []),
        ("tiny_siglip", ["objectives.contrastive.kinds.image_audio=infonce"]),
        ("tiny_masked", ["objectives.unmasked_contrastive_pass=true"]),
        (
            "tiny_masked",
            [
                'objectives.unmasked_contrastive_pass=["audio"]',
                "objectives.views.audio.enabled=true",
                "objectives.views.image.enabled=true",
            ],
        ),
        ("tiny_masked", ["objectives.masked_audio.mode=time", 'objectives.contrastive.pairs=["image_text"]']),
        ("tiny", [f"objectives.views.{m}.enabled=true" for m in ("image", "text", "audio")]),
        ("tiny_masked", [f"objectives.views.{m}.enabled=true" for m in ("image", "text", "audio")]),
        ("tiny_distill", []),
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
    cache.write_text('{"half-written')  # a torn file is measured again, not a crash
    assert cpu_peak(1, cache=cache, size=256, seconds=0.05) > 1e8 and json.loads(cache.read_text())
    assert not list(tmp_path.glob("*.tmp"))


def test_cached_peak_is_per_processor_model(tmp_path, monkeypatch):
    """A home directory shared by two hosts keeps one peak per processor model, not one per architecture."""
    cache = tmp_path / "peak.json"
    monkeypatch.setattr(flops, "cpu_name", lambda: "Slow CPU")
    cache.write_text(json.dumps({f"Slow CPU|{os.cpu_count()}|threads=1|n=256|best-of": 1.0}))
    assert cpu_peak(1, cache=cache, size=256, seconds=0.05) == 1.0
    monkeypatch.setattr(flops, "cpu_name", lambda: "Other CPU")
    assert cpu_peak(1, cache=cache, size=256, seconds=0.05) > 1e8  # probed on this host, not read back
    assert len(json.loads(cache.read_text())) == 2


def test_probe_warms_up_then_takes_the_best_of_its_timed_batches():
    """A fake clock each call advances: the warm-up's slow calls (a cold thread pool, a neighbour
    starting up) size the batches but are not timed; of the timed batches the fastest counts, not
    their mean, nor the first (the probe's old single timing)."""
    durations = iter([4.0, 4.0, 4.0] + [3.0, 0.5, 1.0, 2.0])  # warm-up, then 4 timed batches of 1 call
    now = [0.0]

    def matmul():
        now[0] += next(durations)

    rate = matmul_rate(matmul, 100.0, warmup=1.0, repeats=4, seconds=4.0, clock=lambda: now[0])
    assert rate == pytest.approx(100.0 / 0.5)
    assert next(durations, None) is None  # every timed batch ran


def test_work_counts_trimmed_text_batches_at_their_real_size():
    from mmssl.runlog import RunLog, Throughput, Work

    cfg = get_preset("tiny")
    work = Work(lambda text: train_flops_per_sample(cfg, 8, text), {"image": 16, "text": 16})
    work.add({"__key__": ["a"] * 8, "text": torch.zeros(8, 16)})
    work.add({"__key__": ["b"] * 8, "text": torch.zeros(8, 6)})  # a trimmed batch
    done = work.take()
    full, short = train_flops_per_sample(cfg, 8, 16), train_flops_per_sample(cfg, 8, 6)
    assert short < full and done["flops_done"] == pytest.approx(8 * (full + short))
    assert done == {"flops_done": done["flops_done"], "tokens_done_image": 256.0, "tokens_done_text": 176.0}
    assert work.take()["flops_done"] == 0  # counting starts afresh after each log row
    log = RunLog.__new__(RunLog)
    log.throughput = Throughput(samples_per_step=16, world_size=2, peak_flops=1e9)
    rates = log.rates(steps=1, seconds=2.0, data_wait_seconds=0.5, done=done)
    assert rates["samples_per_s"] == 8 and rates["samples_per_s_per_rank"] == 4 and rates["data_wait"] == 0.25
    assert rates["mfu"] == pytest.approx(done["flops_done"] / 2.0 / 1e9)
    assert rates["tokens_per_s_text"] == pytest.approx(176 * 2 / 2.0)


def test_unmasked_tuning_steps_count_the_whole_inputs_they_train_on():
    """FLIP's unmasked tuning trains like the unmasked preset (views and distillation on too: the second
    views go whole, the teacher rides on the masked pass), and the counter switches to that figure."""
    from mmssl.flops import unmasked_tuning_config
    from mmssl.runlog import Work

    def with_views(cfg):
        for m in ("image", "text", "audio"):
            getattr(cfg.objectives.views, m).enabled = True
        return cfg

    masked, plain = with_views(get_preset("tiny_distill")), with_views(get_preset("tiny"))
    tuned = unmasked_tuning_config(masked)
    assert train_flops_per_sample(tuned, 8) == pytest.approx(train_flops_per_sample(plain, 8))
    assert train_flops_per_sample(tuned, 8) != pytest.approx(train_flops_per_sample(masked, 8))
    assert masked.objectives.masked_image.enabled  # the run's own config is left as it was
    work = Work(
        lambda text: train_flops_per_sample(masked, 8, text),
        {},
        lambda text: train_flops_per_sample(tuned, 8, text),
    )
    work.add({"__key__": ["a"] * 8, "text": torch.zeros(8, 16)}, tuning=True)
    assert work.take()["flops_done"] == pytest.approx(8 * train_flops_per_sample(plain, 8, 16))
