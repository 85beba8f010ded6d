#!/usr/bin/env bash
# Prints Phalanx rows in the baselines' 8 CSV columns (no header) for the ops, worlds and sizes
# that ../shared/bench/baselines/run.sh measures. Used as its EXTRA_BENCH (see
# collectives_vs_baselines.sh). Env: BASELINES_SIZES (as run.sh), PHALANX_ITERS (default 100 below 16 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/phalanx
SIZES="${BASELINES_SIZES:-4096 65536 1048576 16777216 67108864}"
for n in 2 4; do
  for op in allreduce allgather alltoall; do
    for b in $SIZES; do
      # The baselines' counts (mpi_bench.c, gloo_bench.py): 100 timed after 10 warm-up, 20
      # after 3 from 16 MiB.
      iters="${PHALANX_ITERS:-100}" warmup=10
      [ "$b" -ge 16777216 ] && iters=20 warmup=3
      "$BIN" bench "$op" --world "$n" --bytes "$b" --iters "$iters" --warmup "$warmup" --csv
    done
  done
done
