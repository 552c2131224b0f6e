"""``fl-app site check (--node-config STR | --site YAML) [--key K] [--ca C]``.

A SuperNode's start-up checks run by hand (:mod:`fl_app.deploy.site_check`): exit 0
when every check passes, 1 when one fails, 2 when the node config cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["site_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-app site check",
        description="Run a SuperNode's start-up checks (site data, policy, folders, keys).",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--node-config", help='as given to flower-supernode: "data-path=... ..."')
    g.add_argument("--site", help="site YAML (as for `fl-app deploy supernode --site`)")
    p.add_argument("--key", help="the SuperNode's private key (fl-app deploy node-key)")
    p.add_argument("--ca", help="the CA certificate the SuperNode pins")
    return p


def site_main(argv: Sequence[str]) -> int:
    """``fl-app site check ...``; returns the exit status."""
    args = list(argv)
    if not args or args[0] != "check":
        print("usage: fl-app site check (--node-config STR | --site YAML) [--key K] [--ca C]",
              file=sys.stderr)  # fmt: skip
        return 2
    ns = _parser().parse_args(args[1:])
    from fl_app.deploy import DeployError
    from fl_app.deploy.site import load_site, parse_node_config
    from fl_app.deploy.site_check import check_site

    try:
        node_config = load_site(ns.site) if ns.site else parse_node_config(ns.node_config)
    except (DeployError, ValueError) as err:
        print(f"fl-app site check: {err}", file=sys.stderr)
        return 2
    checks = check_site(node_config, key=ns.key, ca=ns.ca)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(
        f"{len(failed)} of {len(checks)} checks failed: fix them before starting the SuperNode"
        if failed
        else f"all {len(checks)} checks passed"
    )
    return 1 if failed else 0
