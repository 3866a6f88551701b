"""`replfs bench LAYER`: benchmarks, each in its own module `bench_<layer>.py` with
`register(subparsers)`. Figures are reported as ratios against a baseline measured in
the same run, since the machines are shared and noisy."""

from __future__ import annotations

import importlib

BENCH_MODULES = ["bench_raid", "bench_txn", "bench_fs", "bench_failover"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (raid, txn, fs)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(f"replfs.tools.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"replfs.tools.{name}":
                continue
            raise
        mod.register(bsub)
