"""``fl-app report <multirun dir> [--out DIR]``: a sweep's table and plots
(:mod:`fl_app.release.report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_app.release.report import collect_jobs, unsuccessful_jobs, write_report

__all__ = ["report_main"]


def report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-app report", description="Collect a Hydra multirun into a table and plots."
    )
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the multirun dir")
    args = parser.parse_args(argv)
    try:
        jobs = collect_jobs(args.multirun_dir)
    except FileNotFoundError as err:
        print(f"fl-app report: {err}", file=sys.stderr)
        return 2
    if not jobs:
        print(f"fl-app report: no job directories under {args.multirun_dir}", file=sys.stderr)
        return 2
    paths = write_report(jobs, args.out or args.multirun_dir)
    print((args.out or args.multirun_dir).joinpath("report.md").read_text(), end="")
    bad = unsuccessful_jobs(jobs)
    if bad:
        print(f"\n{len(bad)} of {len(jobs)} jobs did not succeed:")
        for line in bad:
            print(f"  {line}")
    for p in paths:
        print(f"wrote {p}")
    return 0
