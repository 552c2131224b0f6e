"""``fl-app deploy <command> ...``: certificates, node keys, SuperLink/SuperNodes, runs.

The command line of :mod:`fl_app.deploy` (one handler per command below); what each
party runs, step by step, is docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fl_app.deploy import DeployError
from fl_app.deploy.federation import app_root, run_demo
from fl_app.deploy.flwr_cli import (
    register_node,
    run_logs,
    run_verdict,
    submit_run,
    write_connection,
)
from fl_app.deploy.pki import (
    CA_CERT,
    DEFAULT_SANS,
    create_ca,
    create_node_key,
    create_server_cert,
    create_signing_key,
    write_roster,
)
from fl_app.deploy.procs import (
    deploy_env,
    superlink_command,
    supernode_command,
    warm_clientapp_command,
    warn_insecure,
)
from fl_app.deploy.site import format_node_config, load_site, parse_node_config

__all__ = ["deploy_main"]


def _parser() -> argparse.ArgumentParser:
    # long: one flat table of every command's flags, read top to bottom
    p = argparse.ArgumentParser(prog="fl-app deploy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ca", help="create the federation's CA (coordinator; keep ca.key offline)")
    s.add_argument("--out", required=True)
    s.add_argument("--common-name", default="fl-app federation CA")
    s.add_argument("--days", type=int, default=3650)
    s.add_argument("--force", action="store_true")

    s = sub.add_parser("server-cert", help="issue the SuperLink's TLS certificate")
    s.add_argument("--ca-dir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--san", action="append", help="address clients dial (repeat); default loopback")
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--force", action="store_true")

    s = sub.add_parser(
        "node-key", help="create a SuperNode's auth key pair and its Ed25519 signing pair (site)"
    )
    s.add_argument("--out", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--force", action="store_true")

    s = sub.add_parser("roster", help="write the federation roster from sites' .sign.pub files")
    s.add_argument("--out", required=True)
    s.add_argument("entries", nargs="+", metavar="SITE=PUBFILE")

    s = sub.add_parser("node-config", help="print the --node-config for a site YAML")
    s.add_argument("site")
    s.add_argument("--json", action="store_true", help="print the dict as JSON instead")

    s = sub.add_parser("connection", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    s.add_argument("--name", required=True)
    s.add_argument("--address", required=True)
    s.add_argument("--ca")
    s.add_argument("--insecure", action="store_true")

    s = sub.add_parser("register", help="register a SuperNode public key (coordinator)")
    s.add_argument("public_key")
    s.add_argument("--connection", required=True)

    s = sub.add_parser(
        "revoke", help="unregister a SuperNode: its key is refused from now on (coordinator)"
    )
    s.add_argument("node_id", help="the id `register` printed for the site")
    s.add_argument("--connection", required=True)

    s = sub.add_parser(
        "rotate-key", help="register a site's new public key, then unregister its old node"
    )
    s.add_argument("public_key", help="the site's new .pub from `node-key`")
    s.add_argument("--old-node-id", required=True, help="the node id of the key it replaces")
    s.add_argument("--connection", required=True)

    s = sub.add_parser("superlink", help="run flower-superlink (TLS + node auth) in the foreground")
    s.add_argument("--certs", help="folder with ca.crt, server.pem, server.key")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9093)
    s.add_argument("--database", help="SQLite file: registrations and runs survive restarts")
    s.add_argument("--insecure", action="store_true")
    s.add_argument("--print", action="store_true", help="print the command, do not run it")

    s = sub.add_parser("supernode", help="run flower-supernode in the foreground (site)")
    s.add_argument("--superlink", required=True, help="host:port")
    s.add_argument("--ca")
    s.add_argument("--key", help="private key from `fl-app deploy node-key`")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--site", help="site YAML (turned into --node-config)")
    g.add_argument("--node-config", default="")
    s.add_argument("--port", type=int, default=9094, help="local ClientApp API port")
    s.add_argument("--insecure", action="store_true")
    s.add_argument(
        "--warm-clientapps", action="store_true",
        help="--isolation process with a warm ClientApp launcher beside the SuperNode "
        "(torch imported once, a fork per message; docs/performance.md)",
    )  # fmt: skip
    s.add_argument("--print", action="store_true", help="print the command, do not run it")

    s = sub.add_parser("submit", help="flwr run the bundle and wait for its real status")
    s.add_argument("--connection", required=True)
    s.add_argument("--app", help="bundle folder (default: this project)")
    s.add_argument("--config-name", default="config")
    s.add_argument("--run-dir")
    s.add_argument("--timeout", type=float, default=3600.0)
    s.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. privacy=dpsgd num_rounds=2")

    s = sub.add_parser("demo", help="loopback: 1 SuperLink + 3 SuperNodes, one run, teardown")
    s.add_argument("--workdir", help="default: a new temporary folder")
    s.add_argument("--insecure", action="store_true")
    s.add_argument(
        "--site",
        action="append",
        default=[],
        help="a site YAML (repeat, one SuperNode each); default: 3 simulated partitions",
    )
    s.add_argument("overrides", nargs="*")
    return p


def _exec(cmd: list[str]) -> int:
    env = deploy_env()
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover (exec does not return)


def deploy_main(argv: Sequence[str]) -> int:
    """``fl-app deploy <command> ...``; returns the exit status."""
    args = _parser().parse_args(list(argv))
    if getattr(args, "insecure", False) and args.cmd != "demo":  # Federation warns itself
        warn_insecure()
    try:
        return _COMMANDS[args.cmd](args)
    except DeployError as err:
        print(f"fl-app deploy {args.cmd}: {err}", file=sys.stderr)
        return 2


def _ca(args: argparse.Namespace) -> int:
    cert, key = create_ca(args.out, args.common_name, args.days, args.force)
    print(f"{cert}\n{key}  (secret: keep offline, mode 0600)")
    return 0


def _server_cert(args: argparse.Namespace) -> int:
    cert, key = create_server_cert(
        args.ca_dir, args.out, args.san or list(DEFAULT_SANS), args.days, args.force
    )
    print(f"{cert}\n{key}  (secret: SuperLink host only)\n{Path(args.out) / CA_CERT}")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    priv, pub = create_node_key(args.out, args.name, args.force)
    print(f"{priv}  (secret: this site only)\n{pub}  (send to the coordinator)")
    sign, sign_pub = create_signing_key(args.out, args.name, args.force)
    print(
        f"{sign}  (secret: this site only; node config signing-key-path)\n"
        f"{sign_pub}  (the site's roster entry: share with every site out of band)"
    )
    return 0


def _roster(args: argparse.Namespace) -> int:
    entries = []
    for item in args.entries:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DeployError(f"roster entry {item!r} must be SITE=PUBFILE")
        entries.append((name, path))
    print(write_roster(args.out, entries))  # refuses a site named twice, naming both files
    return 0


def _node_config(args: argparse.Namespace) -> int:
    cfg = load_site(args.site)
    print(json.dumps(cfg, indent=2) if args.json else format_node_config(cfg))
    return 0


def _connection(args: argparse.Namespace) -> int:
    print(write_connection(args.name, args.address, args.ca, insecure=args.insecure))
    return 0


def _register(args: argparse.Namespace) -> int:
    node_id = register_node(args.public_key, args.connection, deploy_env())
    print(f"registered node {node_id}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fl_app.deploy.revoke import revoke_node

    node_id = revoke_node(args.node_id, args.connection, deploy_env())
    print(f"unregistered node {node_id}: the SuperLink refuses its key from now on")
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    from fl_app.deploy.revoke import rotate_node_key

    done = rotate_node_key(args.public_key, args.old_node_id, args.connection, deploy_env())
    print(f"registered node {done.new_node_id}\nunregistered node {done.old_node_id}")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    cmd = superlink_command(
        args.host, args.port, args.certs, insecure=args.insecure, database=args.database
    )
    if args.print:
        print(shlex.join(cmd))
        return 0
    return _exec(cmd)


def _supernode(args: argparse.Namespace) -> int:
    node_config = format_node_config(load_site(args.site)) if args.site else args.node_config
    if not args.insecure and not args.key:
        raise DeployError("--key is required (SuperNode authentication); see node-key")
    cmd = supernode_command(
        args.superlink,
        root_certificates=None if args.insecure else args.ca,
        private_key=args.key,
        node_config=node_config,
        port=args.port,
        insecure=args.insecure,
        isolation="process" if args.warm_clientapps else "subprocess",
    )
    if args.print:
        print(shlex.join(cmd))
        if args.warm_clientapps:
            launcher = warm_clientapp_command(args.port, 0)
            print(shlex.join([*launcher[:-1], "<supernode-pid>"]))
        return 0
    # The SuperNode's start-up checks (`fl-app site check`): a bad data file, policy
    # or key stops it here, not as a refusal in every round of every run.
    from fl_app.deploy.site_check import check_site

    checks = check_site(parse_node_config(node_config), key=args.key, ca=args.ca)
    failed = [c for c in checks if not c.ok]
    for check in checks:
        print(check.line(), file=sys.stderr if failed else sys.stdout, flush=True)
    if failed:
        print(
            f"fl-app deploy supernode: {len(failed)} start-up check(s) failed; "
            "the SuperNode was not started",
            file=sys.stderr,
        )
        return 1
    if args.warm_clientapps:
        from fl_app.deploy.warm_clientapp import supervise

        return supervise(cmd, lambda pid: warm_clientapp_command(args.port, pid), deploy_env())
    return _exec(cmd)


def _submit(args: argparse.Namespace) -> int:
    app = Path(args.app) if args.app else app_root()
    run_id, status = submit_run(
        app,
        args.connection,
        deploy_env(),
        config_name=args.config_name,
        overrides=args.overrides,
        run_dir=args.run_dir,
        timeout=args.timeout,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps({"run-id": run_id, "status": status}))
    print(
        run_verdict(status, Path(args.run_dir) if args.run_dir else None),
        file=sys.stderr,
        flush=True,
    )
    if status != "finished:completed":
        print(run_logs(run_id, args.connection, deploy_env())[-4000:], file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else None  # None: a new temporary folder
    return run_demo(workdir, args.overrides, insecure=args.insecure, site_files=args.site)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ca": _ca,
    "server-cert": _server_cert,
    "node-key": _node_key,
    "roster": _roster,
    "node-config": _node_config,
    "connection": _connection,
    "register": _register,
    "revoke": _revoke,
    "rotate-key": _rotate_key,
    "superlink": _superlink,
    "supernode": _supernode,
    "submit": _submit,
    "demo": _demo,
}
