"""What the masked objectives cost and what they buy, in one run on the same data and preset.

1. Step time (forward + backward + AdamW step, on batches already in memory) of
   (a) contrastive only, unmasked towers;
   (b) contrastive + MAE image + MLM text + AudioMAE audio, one shared masked pass per tower;
   (c) as (b) plus a second, unmasked pass for the contrastive loss;
   (d) as (a) plus the view objectives of every tower (a second image / clip view from the loader, a
       second dropout pass of each caption, model.text.dropout=0.1);
   (e) as (b) plus the view objectives (each second view masked like the first);
   (f) as (b) plus self-distillation from an EMA teacher (``{preset}_distill``: one teacher forward
       without gradients per tower, light decoders, and the fused EMA update after the optimizer step,
       timed on its own too);
   (g) as (a) with SigLIP's sigmoid loss on every pair instead of InfoNCE (``{preset}_siglip``).
   Variants alternate round by round; medians are compared: b/a and c/a (target b/a <= 1.0), what
   the views cost: d/a and e/b, what distillation costs: f/b and the EMA update's share, and SigLIP: g/a.
2. Linear-probe accuracy of frozen embeddings (logistic regression on the demo labels, train split ->
   test split) after the same number of training steps for every variant: with and without the masked
   objectives, (c) with them but contrasting unmasked inputs, (d, e) with view objectives.

    .venv/bin/python benchmarks/bench_masked.py --preset small --probe-steps 300
    .venv/bin/python benchmarks/bench_masked.py --preset tiny --rounds 1 --steps 2 --probe-steps 0  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipelines.demo import build_spoken_digits
from mmssl import data, engine
from mmssl.config import RunConfig, apply_overrides
from mmssl.eval.embeddings import embed_all
from mmssl.eval.probe import score_probe
from mmssl.presets import get_preset
from mmssl.task import Task

VIEWS = [f"objectives.views.{m}.enabled=true" for m in ("image", "text", "audio")] + [
    "model.text.dropout=0.1"
]
VARIANTS = {
    "a: contrastive only": ("{preset}", []),
    "b: + masked, one pass": ("{preset}_masked", []),
    "c: + masked, extra unmasked pass": ("{preset}_masked", ["objectives.unmasked_contrastive_pass=true"]),
    "d: + views": ("{preset}", VIEWS),
    "e: + masked, one pass, + views": ("{preset}_masked", VIEWS),
    "f: + masked, one pass, + distill": ("{preset}_distill", []),
    "g: SigLIP instead of InfoNCE": ("{preset}_siglip", []),
}


def config(preset: str, overrides: list[str], shards: Path, batch: int) -> RunConfig:
    cfg = apply_overrides(get_preset(preset), overrides)
    cfg.data.train_shards, cfg.data.eval_shards = str(shards / "train"), str(shards / "test")
    cfg.optim.micro_batch_size = batch
    return cfg.validate()


def step_times(
    cfgs: dict[str, RunConfig], batches: list[dict], rounds: int, steps: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per step of each variant, and of the EMA teacher's update alone (the distill variant's,
    run after its optimizer step as the engine runs it, and counted in its step too)."""
    torch.manual_seed(0)
    setups = {}
    for name, cfg in cfgs.items():
        task = Task(cfg)
        setups[name] = (task, engine.build_optimizer(task, cfg))  # mmssl's AdamW (fused on CPU)
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    ema: list[float] = []
    bar = tqdm(total=rounds * len(cfgs), desc="step time", unit="round")
    for r in range(rounds):
        for name, (task, optimizer) in setups.items():
            for i in range(steps + 2):  # 2 warm-up steps per round
                start = time.perf_counter()
                loss = task(batches[i % len(batches)], step=r * steps + i)["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if task.teacher is not None:
                    ema_start = time.perf_counter()
                    task.teacher.update(task.teacher.student_parameters(task.model))
                    if i >= 2:
                        ema.append(time.perf_counter() - ema_start)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
            bar.update(1)
    bar.close()
    return times, ema


def train_and_probe(cfg: RunConfig, steps: int, desc: str) -> dict:
    torch.manual_seed(cfg.train.seed)
    task = Task(cfg)
    optimizer = engine.build_optimizer(task, cfg)
    batches = iter(data.loader(cfg, train=True))
    for step in tqdm(range(steps), desc=desc, unit="step"):
        lr = cfg.optim.lr * min(1.0, (step + 1) / max(1, cfg.optim.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = task(next(batches), step=step)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    device = torch.device("cpu")
    train = embed_all(task.model, data.loader(cfg, train=False, shards=cfg.data.train_shards), device=device)
    test = embed_all(task.model, data.loader(cfg, train=False), device=device)
    return score_probe(train, test, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="tiny or small (its *_masked twin is used for b and c)")
    p.add_argument(
        "--shards", type=Path, default=Path("data/demo"), help="spoken-digits build (made if missing)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    p.add_argument("--probe-steps", type=int, default=300, help="0: step times only, no probes")
    p.add_argument("--out", type=Path, default=Path("runs/bench_masked.json"))
    args = p.parse_args()
    build_spoken_digits(args.shards, progress=True)
    cfgs = {
        name: config(preset.format(preset=args.preset), o, args.shards, args.batch)
        for name, (preset, o) in VARIANTS.items()
    }

    first = next(iter(cfgs.values()))
    loader = iter(data.loader(cfgs["e: + masked, one pass, + views"], train=True))  # with second views
    batches = [next(loader) for _ in range(4)]
    del loader
    times, ema = step_times(cfgs, batches, args.rounds, args.steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["a: contrastive only"]

    probes = {}
    for name in cfgs if args.probe_steps else ():  # c: does a gap between a and b come from masked inputs?
        probes[name] = train_and_probe(cfgs[name], args.probe_steps, desc=f"train {name[:1]}")

    print(f"\npreset {args.preset}, batch {args.batch}, {torch.get_num_threads()} threads, fp32 CPU")
    print(f"{'variant':<36}{'ms/step':>10}{'vs a':>8}")
    for name, median in medians.items():
        print(f"{name:<36}{1000 * median:>10.1f}{median / base:>8.2f}")
    b_a = medians["b: + masked, one pass"] / base
    c_a = medians["c: + masked, extra unmasked pass"] / base
    print(f"b/a = {b_a:.2f} (target <= 1.0: {'met' if b_a <= 1.0 else 'missed'}), c/a = {c_a:.2f}")
    d_a = medians["d: + views"] / base
    e_b = medians["e: + masked, one pass, + views"] / medians["b: + masked, one pass"]
    print(f"views cost: d/a = {d_a:.2f} (contrastive only), e/b = {e_b:.2f} (masked, one pass)")
    distill = medians["f: + masked, one pass, + distill"]
    f_b = distill / medians["b: + masked, one pass"]
    ema_ms = 1000 * statistics.median(ema)
    teacher = sum(p.numel() for p in Task(cfgs["f: + masked, one pass, + distill"]).teacher.parameters())
    print(
        f"distillation cost: f/b = {f_b:.2f}; its EMA update (one fused lerp over {teacher / 1e6:.2f}M "
        f"teacher parameters) {ema_ms:.2f} ms/step = {ema_ms / (1000 * distill):.1%} of its step"
    )
    g_a = medians["g: SigLIP instead of InfoNCE"] / base
    print(f"SigLIP on every pair instead of InfoNCE: g/a = {g_a:.2f}")
    if probes:
        print(f"\nlinear probe after {args.probe_steps} steps (top-1 on the test split)")
        modalities = sorted(next(iter(probes.values())))
        print(f"{'variant':<36}" + "".join(f"{m:>10}" for m in modalities))
        for name, result in probes.items():
            print(f"{name:<36}" + "".join(f"{result[m]['top1']:>10.3f}" for m in modalities))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "preset": first.preset,
                "step_seconds": medians,
                "b/a": b_a,
                "c/a": c_a,
                "d/a": d_a,
                "e/b": e_b,
                "f/b": f_b,
                "g/a": g_a,
                "ema_update_ms": ema_ms,
                "probe": probes,
            },  # fmt: skip
            indent=2,
        )
    )
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
