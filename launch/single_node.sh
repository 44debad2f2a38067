#!/usr/bin/env bash
# Train on every accelerator of this machine (or NPROC CPU processes) with DeepSpeed's launcher.
#
#   launch/single_node.sh --preset small data.train_shards=/data/shards/train run_dir=runs/small
#
# NPROC defaults to the number of visible GPUs, or 2 CPU ranks on a machine without one. `mmssl train`
# checks the whole config and the shard paths first, then starts `deepspeed --num_gpus NPROC`; with no
# GPU, DeepSpeed runs the same code on its CPU accelerator over gloo, and each rank gets
# OMP_NUM_THREADS = cores / NPROC unless you set it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c 'import shutil,subprocess;print(len(subprocess.run(["nvidia-smi","-L"],capture_output=True,text=True).stdout.splitlines()) if shutil.which("nvidia-smi") else 0)' 2>/dev/null || echo 0)
  [ "$NPROC" -gt 0 ] || NPROC=2
fi
MMSSL=${MMSSL:-.venv/bin/mmssl}
exec "$MMSSL" train --nproc "$NPROC" "$@"
