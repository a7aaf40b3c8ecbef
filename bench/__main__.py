"""`python -m bench [--quick]`: the echo ceiling, the registry over gRPC and the edge over HTTP, on this machine.

Prints a table of figures with the issue's goals (PASS/MISS) and writes them as JSON to .build/bench/results.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from bench.procs import sigterm_as_interrupt
from bench.suite import REPO, Config, run

FULL_SIZES = (1_000, 10_000, 100_000)  # the edge CPU goals are stated at 1k, GetAgent and search at 100k
QUICK_SIZES = (1_000, 5_000)


def _cpus(text: str) -> frozenset[int]:
    return frozenset(int(part) for part in text.split(",") if part.strip())


def parse(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small populations and short measurements (~1 min)")
    parser.add_argument("--sizes", help="comma-separated agent counts, ascending (default 1000,10000,100000)")
    parser.add_argument("--duration", type=float, help="seconds measured per benchmark (default 10, quick 1.5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per benchmark, excluded (default 2)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels (TCP connections) (default 4)")
    parser.add_argument("--server-cpus", default="0", help="CPUs for the echo/registry/edge processes (default 0)")
    parser.add_argument("--client-cpus", default="", help="CPUs for the load client (default: the last CPU)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-edge", action="store_true", help="skip the HTTP edge benchmarks")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "results.json")
    args = parser.parse_args(argv)

    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    if list(sizes) != sorted(set(sizes)) or sizes[0] <= 0:
        parser.error("--sizes must be positive and ascending")
    available = sorted(os.sched_getaffinity(0))
    server_cpus = client_cpus = None
    if not args.no_pin and len(available) >= 2:
        server_cpus = _cpus(args.server_cpus)
        client_cpus = _cpus(args.client_cpus) if args.client_cpus else frozenset({available[-1]})
        if not (server_cpus | client_cpus) <= set(available):
            parser.error(f"CPUs must be among {available}")
    return Config(
        quick=args.quick,
        sizes=sizes,
        warmup=args.warmup if args.warmup is not None else (0.3 if args.quick else 2.0),
        duration=args.duration if args.duration is not None else (1.5 if args.quick else 10.0),
        concurrency=args.concurrency,
        channels=args.channels,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        output=args.output,
        edge=not args.no_edge,
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    # pgserver's platformdirs complains when XDG_RUNTIME_DIR is unset (containers, CI); it falls back to /tmp.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    with sigterm_as_interrupt():
        sys.exit(run(parse()))


if __name__ == "__main__":
    main()
