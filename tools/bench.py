"""`replfs bench LAYER`: benchmarks, each in its own module `bench_<layer>.py` with
`register(subparsers)`. Figures are reported as ratios against a baseline measured in
the same run, since the machines are shared and noisy."""

from __future__ import annotations

BENCH_MODULES = ["bench_raid", "bench_txn", "bench_fs", "bench_failover"]


def register(sub) -> None:
    from replfs.tools.cli import register_modules

    p = sub.add_parser("bench", help="run a benchmark (raid, txn, fs, failover)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    register_modules(bsub, BENCH_MODULES)
