"""``fl-app export <run dir> --tier public|restricted --out DIR [--overwrite]``: release a
run's model with its model card (:mod:`fl_app.release`)."""

from __future__ import annotations

import argparse
import sys

from fl_app.release import ExportRefused, Tier, export_run
from fl_app.release.card import fmt_value

__all__ = ["export_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-app export",
        description="Export a completed run's DP-released model with its model card.",
    )
    parser.add_argument("run_dir", help="the run directory (holds summary.json)")
    parser.add_argument(
        "--tier",
        required=True,
        choices=[t.value for t in Tier],
        help="public: weights + model card; restricted: adds per-round aggregates and the ledger",
    )
    parser.add_argument("--out", required=True, help="export directory (new or empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in --out"
    )
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """``fl-app export <run dir> --tier public|restricted --out DIR [--overwrite]``.

    Exit status: 0 exported, 1 refused (the reason and the fix are printed), 2 usage error.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, usage errors are 2
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result = export_run(args.run_dir, args.tier, args.out, overwrite=args.overwrite)
    except ExportRefused as err:
        print(f"fl-app export: refused: {err.reason}", file=sys.stderr)
        print(f"  fix: {err.fix}", file=sys.stderr)
        return 1
    for line in result.warnings:
        print(f"fl-app export: WARNING: {line}", file=sys.stderr)
    priv = result.card["privacy"]
    if priv["client_level"]:
        cl = priv["client_level"]
        claim = (
            f"client-level epsilon {cl['epsilon']:.4g} (delta {cl['delta']:g}, {cl['accountant']})"
        )
    elif priv["record_level_dp"]:
        rl = priv["record_level_dp"]
        claim = f"record-level epsilon max {rl['epsilon_max']:.4g} (delta {rl['delta']:g})"
    else:
        claim = "NO differential privacy"
    if priv["client_level"] and priv["record_level_dp"]:
        claim += f"; record-level epsilon max {priv['record_level_dp']['epsilon_max']:.4g}"
    acc = result.card["evaluation"]["test_accuracy"]
    print(
        f"exported {args.run_dir} ({result.tier.value} tier) to {result.out_dir}: {claim}; "
        f"test accuracy {fmt_value(acc)}"
    )
    for name, digest in result.files.items():
        print(f"  {name}  sha256 {digest}")
    if result.audit_seq is not None:
        print(f"  audit: model.export recorded at seq {result.audit_seq}")
    return 0
