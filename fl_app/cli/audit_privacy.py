"""``fl-app audit-privacy <run dir>``: empirical attacks on a release, beside its ε.

What is attacked, what is written and which client data appears in it:
:mod:`fl_app.privacy_audit.run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["audit_privacy_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-app audit-privacy",
        description="Membership inference and gradient inversion on a run's release, "
        "beside its theoretical epsilon.",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: <run dir>/privacy_audit")
    p.add_argument("--quick", action="store_true", help="few shadows, batch of one (tests)")
    p.add_argument("--seed", type=int, default=None, help="attack seed (default: the run's seed)")
    p.add_argument(
        "--canaries",
        type=int,
        default=None,
        metavar="K",
        help="also plant K canaries in a re-run of the run's config and report a lower "
        "bound on epsilon (one-run audit); exit 3 if it exceeds the accounted epsilon",
    )
    p.add_argument(
        "--client-canaries",
        type=int,
        default=None,
        metavar="K",
        help="also replay K canary clients through the run's recorded client-level "
        "mechanism and bound epsilon from the released model and from the server's view; "
        "exit 3 if a bound exceeds the epsilon it is compared with",
    )
    p.add_argument(
        "--no-images",
        action="store_true",
        help="do not write inversion.png (it shows true client records)",
    )
    return p


def audit_privacy_main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-app audit-privacy``; returns the exit status."""
    args = _parser().parse_args(argv)
    # torch and the attacks load only once the arguments parse (`--help` stays fast).
    from fl_app.privacy_audit.one_run import AccountingBugSuspected
    from fl_app.privacy_audit.report import print_audit
    from fl_app.privacy_audit.run import AuditError, audit_run_dir
    from fl_app.runtime.simulation import run_simulation_experiment

    run_dir: Path = args.run_dir
    out_dir: Path = args.out or run_dir / "privacy_audit"
    try:
        doc = audit_run_dir(
            run_dir,
            out_dir,
            quick=args.quick,
            seed=args.seed,
            images=not args.no_images,
            canaries=args.canaries,
            rerun=run_simulation_experiment,
            client_canaries=args.client_canaries,
        )
    except AccountingBugSuspected as err:
        print(f"fl-app audit-privacy: AUDIT FAILED: {err}", file=sys.stderr)
        return 3
    except (AuditError, FileNotFoundError, ValueError) as err:
        print(f"fl-app audit-privacy: {err}", file=sys.stderr)
        return 2
    print_audit(doc, out_dir)
    return 0
