#!/usr/bin/env bash
# Phalanx's collectives against the baselines (Open MPI over TCP, Gloo), same machine, same run:
# runs ../shared/bench/baselines/run.sh with Phalanx's rows as its EXTRA_BENCH, then prints the
# ratio baseline_median_us / phalanx_median_us per row (above 1: Phalanx is faster).
# Usage: bench/collectives_vs_baselines.sh [out.csv]   (run ../shared/bench/baselines/setup.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-$(mktemp)}"
BASE="${BASELINES_DIR:-../shared/bench/baselines}"
[ -x target/release/phalanx ] || cargo build --release --quiet
EXTRA_BENCH="bench/phalanx_rows.sh" "$BASE/run.sh" > "$OUT"
python3 - "$OUT" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
key = lambda r: (r["op"], r["world"], r["bytes"])
ph = {key(r): float(r["median_us"]) for r in rows if r["tool"] == "phalanx"}
print(f"{'op':<10} {'world':>5} {'bytes':>10} {'phalanx us':>12} {'vs openmpi-tcp':>15} {'vs gloo':>9} {'busbw GB/s':>11}")
for r in rows:
    if r["tool"] != "phalanx":
        continue
    k = key(r)
    def ratio(tool):
        b = [float(x["median_us"]) for x in rows if x["tool"] == tool and x["transport"] == "tcp-loopback" and key(x) == k]
        return f"{b[0] / ph[k]:.2f}" if b else "-"
    print(f"{k[0]:<10} {k[1]:>5} {k[2]:>10} {ph[k]:>12.1f} {ratio('openmpi'):>15} {ratio('gloo'):>9} {float(r['busbw_GBps']):>11.3f}")
PY
