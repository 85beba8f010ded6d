#!/usr/bin/env bash
# Phalanx p2p against one iperf3 TCP stream, same machine, same run, same network namespace
# (as ../shared/bench/baselines/run.sh measures iperf3: `-t 5 -O 1`, loopback, private netns).
# Usage: bench/p2p_vs_iperf3.sh [ROUNDS] [BYTES]   (defaults: 3 rounds, 64MiB)
# Prints one CSV row per measurement, then the median ratio (with range) per configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
BYTES="${2:-64MiB}"
BIN=target/release/phalanx
command -v iperf3 >/dev/null || { echo "p2p_vs_iperf3.sh: iperf3 missing (apt-get install iperf3)" >&2; exit 1; }
[ -x "$BIN" ] || cargo build --release --quiet
if [ -z "${P2P_IN_NETNS:-}" ]; then
  exec env P2P_IN_NETNS=1 unshare -rn sh -c "ip link set lo up && exec '$0' '$ROUNDS' '$BYTES'"
fi
out=$(mktemp)
iperf3 -s -B 127.0.0.1 -p 5201 -D --logfile /dev/null
trap 'pkill -f "iperf3 -s -B 127.0.0.1 -p 5201" || true; rm -f "$out"' EXIT
sleep 0.2
echo "config,round,GBps"
for r in $(seq "$ROUNDS"); do
  gbps=$(iperf3 -c 127.0.0.1 -B 127.0.0.1 -p 5201 -t 5 -O 1 -J | python3 -c 'import json,sys; s=json.load(sys.stdin)["end"]["sum_received"]; print("%.4f" % (s["bytes"]/s["seconds"]/1e9))')
  echo "iperf3,$r,$gbps" | tee -a "$out"
  for cfg in "tcp 1" "tcp 2" "quic 1"; do
    set -- $cfg
    row=$("$BIN" bench p2p --transport "$1" --paths "$2" --bytes "$BYTES" --iters 20 --warmup 3 --csv)
    echo "phalanx-$1-$2path,$r,$(echo "$row" | cut -d, -f7)" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
by = {}
for cfg, r, g in rows:
    by.setdefault(cfg, {})[r] = float(g)
ip = by.pop("iperf3")
print("\nconfiguration        median GB/s   ratio to iperf3 (median, range over rounds)")
print(f"{'iperf3':<20} {statistics.median(ip.values()):>10.3f}")
for cfg, vals in by.items():
    ratios = [vals[r] / ip[r] for r in vals]
    print(f"{cfg:<20} {statistics.median(vals.values()):>10.3f}   {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
PY
