"""`--quick`, shared by every benchmark: the same run at tiny sizes and few repetitions, in seconds, so that CI
(`.ci/benchmarks.sh`, `make bench-quick`) notices a benchmark that no longer runs. Its figures mean nothing;
it writes no recorded results (benchmarks/RESULTS.md, benchmarks/results/).

A benchmark names its quick values once, as parser defaults: `--quick` swaps them in, and any option given on
the command line still wins, so `--quick` is the real run with small numbers, never a separate path."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def parse_args(
    parser: argparse.ArgumentParser, quick: dict[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """`parser`'s arguments plus `--quick`; with it, each option in `quick` not given defaults to its value."""
    shown = ", ".join(f"{name.replace('_', '-')} {value}" for name, value in quick.items())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"check that the benchmark runs, in seconds ({shown}); figures not meaningful, nothing recorded",
    )
    args = parser.parse_args(argv)
    unknown = set(quick) - set(vars(args))
    assert not unknown, f"quick values for options the parser lacks: {sorted(unknown)}"
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args
