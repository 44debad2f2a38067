#!/usr/bin/env bash
# Train across the nodes of a DeepSpeed hostfile, started from the first node over ssh (pdsh).
#
#   HOSTFILE=launch/hostfile.example launch/multi_node.sh --preset base data.train_shards=/data/train run_dir=/shared/runs/b
#
# Expects: the same checkout and .venv on every node (a shared filesystem is simplest), password-less
# ssh between nodes, the shards and run_dir on a filesystem every node sees (checkpoints are written
# by every rank). MASTER_ADDR defaults to this host. `mmssl train` checks the config and the shard
# paths here, once, before any node starts a rank.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-launch/hostfile}
MMSSL=${MMSSL:-.venv/bin/mmssl}
exec "$MMSSL" train --hostfile "$HOSTFILE" --master-addr "${MASTER_ADDR:-$(hostname)}" "$@"
