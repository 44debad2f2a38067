#!/usr/bin/env bash
# The GPU check: what this CPU-only project cannot test here, in one go on one CUDA GPU, under 10 minutes,
# with no network. Run from anywhere, as is:
#
#     benchmarks/gpu_check.sh                  # PYTHON=/path/to/python to use another interpreter
#
# 1. the tests marked `cuda` (tests/test_cuda.py): bf16 against the fp32 loss trajectory, FusedAdam,
#    the SDPA flash kernel, pinned-memory batches, NCCL 1-rank init;
# 2. 200 steps of the `base` preset in bf16 on the demo shards (built locally: scikit-learn's digits and
#    espeak-ng), its samples/s and MFU;
# 3. the image-text `base` towers against open_clip_train at equal work (benchmarks/bench_vs_open_clip.py:
#    text trimming off, the same crop on both sides), both in bf16. It needs open_clip_train's own
#    environment (runs/open_clip_venv); creating it needs the network, so it is made beforehand, once:
#    python benchmarks/bench_vs_open_clip.py --setup-only   (without it this row says so and is skipped).
# Then one table. Every log is kept under runs/gpu_check/<time>/. Knobs: MICRO (micro-batch, 64), STEPS
# (200), SKIP_BENCH=1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python)
MICRO=${MICRO:-64}
STEPS=${STEPS:-200}
OUT=runs/gpu_check/$(date +%Y%m%d-%H%M%S)
SHARDS=data/demo
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" || exit 1
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "== 1/3 tests marked cuda (log: $OUT/cuda_tests.log)"
timeout 300 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" \
    >"$OUT/cuda_tests.log" 2>&1

echo "== 2/3 base, bf16, $STEPS steps, micro-batch $MICRO (log: $OUT/base.log)"
"$PY" -c "from data_pipelines.demo import build_spoken_digits; build_spoken_digits('$SHARDS')" >"$OUT/shards.log" 2>&1
timeout 360 "$PY" -m mmssl.cli train --preset base --nproc 1 --run-dir "$OUT/base" \
    "data.train_shards=$SHARDS/train" data.eval_shards= train.eval_at_end=false engine.precision=bf16 \
    "optim.micro_batch_size=$MICRO" "train.steps=$STEPS" train.log_every=20 "train.ckpt_every=$STEPS" \
    optim.warmup_steps=20 >"$OUT/base.log" 2>&1

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    echo "== 3/3 base towers vs open_clip_train at equal work (log: $OUT/bench.log)"
    timeout 300 "$PY" benchmarks/bench_vs_open_clip.py --device cuda --no-install --models base \
        --context-length 77 --batch "$MICRO" --repeats 1 --warmup 20 --steps 40 --log-every 10 \
        --baseline-workers 4 --baseline-compile off --mmssl-workers 4 --mmssl-compile off \
        --shards "$SHARDS" --out "$OUT/bench" \
        >"$OUT/bench.log" 2>&1
fi

"$PY" - "$OUT" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rows = []
xml = out / "cuda_tests.xml"
if xml.is_file():
    for case in ET.parse(xml).iter("testcase"):
        kids = {k.tag: k for k in case}
        status = next((t for t in ("failure", "error", "skipped") if t in kids), "passed")
        why = (kids[status].get("message") or "")[:70] if status != "passed" else ""
        rows.append((f"test {case.get('name')}", status.upper() if status != "passed" else "ok", why))
else:
    rows.append(("tests marked cuda", "NOT RUN", f"see {out / 'cuda_tests.log'}"))
summary = out / "base" / "summary.json"
if summary.is_file():
    s = json.loads(summary.read_text())
    mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "- (GPU not in mmssl.flops' peak table)"
    num = lambda x, spec: format(x, spec) if isinstance(x, (int, float)) else "-"
    rows.append(("base bf16 samples/s", num(s.get("samples_per_s"), ".0f"),
                 f"{s['steps']} steps, loss {num(s.get('first_logged_loss'), '.3f')} -> {num(s.get('final_loss'), '.3f')}"))
    rows.append(("base bf16 MFU", mfu, f"data wait {num(s.get('data_wait'), '.0%')}"))
else:
    rows.append(("base bf16 run", "FAILED", f"see {out / 'base.log'}"))
results = sorted((out / "bench").glob("*/results.json"))
if results:
    for name, r in json.loads(results[-1].read_text())["models"].items():
        s = r["summary"]
        pct = lambda x: f"MFU {x:.1%}" if x is not None else "MFU -"
        rows.append((f"{name}: open_clip_train samples/s", f"{s['median_open_clip']:.0f}", pct(s.get("median_mfu_open_clip"))))
        rows.append((f"{name}: mmssl samples/s, equal work", f"{s['median_mmssl']:.0f}", pct(s.get("median_mfu_mmssl"))))
        rows.append((f"{name}: mmssl / open_clip_train, equal work", f"{s['median_ratio']:.2f}x", "no text trimming, no ZeRO"))
        if "median_default_ratio" in s:
            rows.append((f"{name}: mmssl / open_clip_train, defaults", f"{s['median_default_ratio']:.2f}x", "as users run each"))
else:
    log = out / "bench.log"
    last = log.read_text().strip().splitlines()[-1][:90] if log.is_file() and log.read_text().strip() else "skipped"
    rows.append(("base vs open_clip_train", "NOT RUN", last))
width = max(len(r[0]) for r in rows)
print(f"\n{'check':<{width}}  {'result':<10}  note")
for name, result, note in rows:
    print(f"{name:<{width}}  {result:<10}  {note}")
print(f"\nlogs: {out}")
sys.exit(1 if any(r[1] in ("FAILED", "FAILURE", "ERROR", "SKIPPED") for r in rows) else 0)  # a skip on a GPU is a fault
EOF
