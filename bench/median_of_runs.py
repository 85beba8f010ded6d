#!/usr/bin/env python3
"""Medians over paired runs of bench/collectives_vs_baselines.sh.

Usage: bench/median_of_runs.py run1.csv run2.csv run3.csv
Each CSV holds one run.sh output (baselines and Phalanx measured back to back). Per row the
ratio baseline_median_us / phalanx_median_us is taken within each run (a pair), then the
median over runs; prints a Markdown table (above 1: Phalanx faster).
"""
import csv
import statistics
import sys


def main(paths):
    runs = [list(csv.DictReader(open(p))) for p in paths]
    key = lambda r: (r["op"], int(r["world"]), int(r["bytes"]))
    order = ["allreduce", "allgather", "reducescatter", "alltoall", "broadcast"]
    rank = lambda op: order.index(op) if op in order else len(order)
    rows = sorted({key(r) for r in runs[0] if r["tool"] == "phalanx"}, key=lambda k: (k[1], rank(k[0]), k[2]))
    print(f"Medians of {len(runs)} paired runs.\n")
    print("| op | world | bytes | Phalanx median µs | Open MPI-TCP / Phalanx | Gloo / Phalanx | Phalanx busbw GB/s |")
    print("|---|---|---|---|---|---|---|")
    for k in rows:
        ph, mpi, gloo, bw = [], [], [], []
        for run in runs:
            mine = [r for r in run if r["tool"] == "phalanx" and key(r) == k]
            if not mine:
                continue
            p = float(mine[0]["median_us"])
            ph.append(p)
            bw.append(float(mine[0]["busbw_GBps"]))
            for tool, out in (("openmpi", mpi), ("gloo", gloo)):
                b = [r for r in run if r["tool"] == tool and r["transport"] == "tcp-loopback" and key(r) == k]
                if b:
                    out.append(float(b[0]["median_us"]) / p)
        med = lambda v, f: f.format(statistics.median(v)) if v else "-"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {med(ph, '{:.1f}')} | {med(mpi, '{:.2f}')} | {med(gloo, '{:.2f}')} | {med(bw, '{:.3f}')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
