"""The ``fl-app`` command.

``fl-app simulate [hydra overrides...]``  run an experiment (Hydra main; ``-m`` sweeps)
``fl-app simulate --dry-run [...]``       validate and print the privacy projection only
``fl-app config [hydra overrides...]``    print the composed, validated config
``fl-app audit verify <log> ...``         check a hash-chained audit log
``fl-app report <multirun dir>``          a sweep's table (CSV/Markdown) and plots
``fl-app export <run dir> --tier ...``    release a model with its model card
``fl-app audit-privacy <run dir>``        empirical attacks on a release (MIA, inversion)
``fl-app deploy ...``                     certificates, keys, SuperLink/SuperNodes, submit, demo
``fl-app site check --node-config ...``   a SuperNode's start-up checks, by hand
``fl-app synth --out DIR --epsilon E ...`` a DP synthetic surrogate of a site's data
Each verb has its module here (:mod:`fl_app.cli.simulate`, :mod:`fl_app.cli.audit`,
:mod:`fl_app.cli.export`, :mod:`fl_app.cli.report`, :mod:`fl_app.cli.audit_privacy`,
:mod:`fl_app.cli.deploy`, :mod:`fl_app.cli.site`, :mod:`fl_app.cli.synth`); the library
modules hold no argparse code.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """usage: fl-app <command> [hydra overrides...]

commands:
  simulate   run an experiment in simulation (default: digits, 10 IID clients, 5 rounds)
             e.g. fl-app simulate strategy=fedadam dataset.partitioner=dirichlet
                  fl-app simulate experiment=digits_dirichlet
                  fl-app simulate -m strategy=fedavg,fedadam seed=1,2
             --dry-run: validate, print the planned privacy spend (epsilon the planned
             rounds would reach, rounds that fit the budget) and exit without training
             resume=<run dir> [rollback_to=<round>]: continue a run from its last
             checkpoint (same overrides as the original run), or redo rounds after one
  config     print the composed and validated config for the given overrides
  audit      verify | repair | sign | keygen: the tamper-evident audit log
             e.g. fl-app audit verify outputs/.../audit.jsonl
  report     collect a multirun (fl-app simulate -m ...) into report.csv/.md and plots
             e.g. fl-app report multirun/2026-11-23/12-00-00
  export     release a run's model: --tier public|restricted --out DIR
  audit-privacy
             membership inference (loss threshold, LiRA) and gradient inversion on a
             run's release, next to its theoretical epsilon
  deploy     ca | server-cert | node-key | roster | node-config | connection | register |
             revoke | rotate-key | superlink | supernode | submit | demo
             (see docs/deployment.md; incidents: docs/operations.md)
  site       check --node-config "..." | --site site.yaml [--key K] [--ca C]: a
             SuperNode's start-up checks (data, policy, folders, keys) by hand
  synth      --out DIR --epsilon E --state-dir S --site-name N [overrides]: a DP
             synthetic surrogate of a site's data (MST/AIM), in the site's ledger, with
             a card; --compare REAL_RUN SURROGATE_RUN: accuracy on real test rows
             (docs/synthetic-data.md)

Hydra's own flags work after `simulate` (--help, --cfg job, -m, hydra.run.dir=...).
"""


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "simulate":
        from fl_app.cli.simulate import simulate_main

        simulate_main(rest)
    elif command == "report":
        from fl_app.cli.report import report_main

        raise SystemExit(report_main(rest))
    elif command == "export":
        from fl_app.cli.export import export_main

        raise SystemExit(export_main(rest))
    elif command == "audit-privacy":
        from fl_app.cli.audit_privacy import audit_privacy_main

        raise SystemExit(audit_privacy_main(rest))
    elif command == "deploy":
        from fl_app.cli.deploy import deploy_main

        raise SystemExit(deploy_main(rest))
    elif command == "site":
        from fl_app.cli.site import site_main

        raise SystemExit(site_main(rest))
    elif command == "synth":
        from fl_app.cli.synth import synth_main

        raise SystemExit(synth_main(rest))
    elif command == "audit":
        from fl_app.cli.audit import audit_main

        raise SystemExit(audit_main(rest))
    elif command == "config":
        from fl_app.cli.simulate import print_config

        print_config(rest)
    else:
        print(f"fl-app: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
