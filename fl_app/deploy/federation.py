"""A SuperLink and its SuperNodes on one machine: ``fl-app deploy demo``, tests, benchmark.

Everything lives under one work folder (PKI, an isolated ``~/.flwr``, logs, state)
and every process is stopped by process group on exit, even when the run fails.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fl_app.deploy import DeployError
from fl_app.deploy.flwr_cli import (
    list_nodes,
    register_node,
    run_logs,
    run_verdict,
    submit_run,
    write_connection,
)
from fl_app.deploy.pki import CA_CERT, create_ca, create_node_key, create_server_cert
from fl_app.deploy.procs import (
    ProcessGroup,
    deploy_env,
    free_port,
    superlink_command,
    supernode_command,
    wait_for_port,
    warm_clientapp_command,
    warn_insecure,
)
from fl_app.deploy.site import format_node_config, load_sites
from fl_app.server.layout import SUMMARY_FILE

__all__ = ["Federation", "app_root", "run_demo"]


@dataclass
class Federation:
    """A SuperLink and its SuperNodes on one machine, everything under ``workdir``."""

    workdir: Path
    num_nodes: int = 3
    insecure: bool = False
    host: str = "127.0.0.1"
    connection: str = "fed"
    # SuperNodes with --isolation process, each with a warm ClientApp launcher
    # (fl_app.deploy.warm_clientapp: torch imported once, a fork per message); False:
    # Flower's default, a fresh flwr-clientapp process (and its imports) per message.
    warm_clientapps: bool = True
    group: ProcessGroup = field(init=False)
    port: int = field(init=False, default=0)
    env: dict[str, str] = field(init=False, default_factory=dict)
    node_keys: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.insecure:
            warn_insecure()
        self.workdir = Path(self.workdir).resolve()
        self.group = ProcessGroup(self.workdir / "logs")
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        # Isolated ~/.flwr: connections, installed FABs and the SuperLink's state.
        self.env = deploy_env(HOME=str(home), FLWR_HOME=str(home / ".flwr"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / CA_CERT

    def prepare(self) -> None:
        """CA, SuperLink certificate, one key pair per site, the CLI connection."""
        if not self.insecure:
            create_ca(self.workdir / "pki", force=True)
            create_server_cert(
                self.workdir / "pki",
                self.workdir / "superlink",
                [self.host, "localhost"],
                force=True,
            )
            self.node_keys = [
                create_node_key(self.workdir / f"site-{i}", f"site-{i}", force=True)[0]
                for i in range(self.num_nodes)
            ]

    def start_superlink(self, timeout: float = 60.0) -> int:
        self.port = free_port(self.host)
        cmd = superlink_command(
            self.host,
            self.port,
            None if self.insecure else self.workdir / "superlink",
            insecure=self.insecure,
            database=str(self.workdir / "superlink" / "state.db"),
        )
        pid = self.group.start("superlink", cmd, self.env, self.workdir)
        wait_for_port(self.host, self.port, timeout, self.group.procs["superlink"])
        write_connection(
            self.connection,
            self.address,
            None if self.insecure else self.ca,
            insecure=self.insecure,
            home=Path(self.env["FLWR_HOME"]),
        )
        return pid

    def register_all(self) -> list[int]:
        """Register every site's public key (in parallel: each ``flwr`` call takes ~2 s)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.node_keys))) as pool:
            return list(
                pool.map(
                    lambda k: register_node(f"{k}.pub", self.connection, self.env), self.node_keys
                )
            )

    def start_supernode(
        self,
        name: str,
        node_config: str,
        *,
        private_key: Path | None,
        tls: bool = True,
        max_wait_time: float | None = None,
    ) -> int:
        runtime_port = free_port("127.0.0.1")
        cmd = supernode_command(
            self.address,
            root_certificates=self.ca if tls and not self.insecure else None,
            private_key=private_key,
            node_config=node_config,
            port=runtime_port,
            insecure=self.insecure or not tls,
            max_wait_time=max_wait_time,
            isolation="process" if self.warm_clientapps else "subprocess",
        )
        pid = self.group.start(name, cmd, self.env, self.workdir)
        if self.warm_clientapps:
            # Named under the SuperNode so wait_online supervises it with its node; it
            # exits with the SuperNode (--parent-pid).
            launcher = warm_clientapp_command(runtime_port, pid)
            self.group.start(f"{name}-clientapps", launcher, self.env, self.workdir)
        return pid

    def node_config(self, i: int, **extra: Any) -> str:
        """Site ``i``'s ``--node-config`` as a string (see :meth:`site_config`)."""
        return format_node_config(self.site_config(i, **extra))

    def site_config(self, i: int, **extra: Any) -> dict[str, Any]:
        """Default site ``i``: simulated partition ``i`` with its own DP-SGD state folder."""
        state = self.workdir / f"site-{i}" / "dp-state"
        state.mkdir(parents=True, exist_ok=True)
        return {
            "partition-id": i,
            "num-partitions": self.num_nodes,
            "dp-state-dir": str(state),
            **extra,
        }

    def check_sites(
        self, configs: Sequence[dict[str, Any]], labels: Sequence[str] | None = None
    ) -> None:
        """Each site's start-up checks (:func:`fl_app.deploy.site_check.check_site`, as
        ``fl-app deploy supernode`` runs them) with its node key and the CA, before any
        SuperNode starts. Raises :class:`DeployError` naming every failing site and why."""
        from fl_app.deploy.site_check import check_site

        failures = []
        for i, config in enumerate(configs):
            checks = check_site(
                config,
                key=None if self.insecure else str(self.node_keys[i]),
                ca=None if self.insecure else str(self.ca),
            )
            bad = [c.line() for c in checks if not c.ok]
            if bad:
                label = labels[i] if labels is not None else f"site-{i}"
                failures.append(f"site {label}:\n  " + "\n  ".join(bad))
        if failures:
            raise DeployError(
                "start-up checks failed, no SuperNode was started (fix the site, or run "
                "`fl-app site check --site <yaml>` for the full report):\n" + "\n".join(failures)
            )

    def start_supernodes(self, node_configs: Sequence[str] | None = None) -> list[int]:
        configs = (
            list(node_configs)
            if node_configs
            else [self.node_config(i) for i in range(self.num_nodes)]
        )
        return [
            self.start_supernode(
                f"supernode-{i}",
                configs[i],
                private_key=None if self.insecure else self.node_keys[i],
            )
            for i in range(self.num_nodes)
        ]

    def wait_online(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            nodes = list_nodes(self.connection, self.env)
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return nodes
            for name, proc in self.group.procs.items():
                # Our own nodes must stay up; others (e.g. ones expected to be refused) may exit.
                if (
                    name == "superlink" or name.startswith("supernode-")
                ) and proc.poll() is not None:
                    raise DeployError(
                        f"{name} exited ({proc.returncode}): {self.group.log(name)[-2000:]}"
                    )
            time.sleep(1.0)
        raise DeployError(f"only {nodes!r} after {timeout:.0f}s; wanted {count} online")

    def submit(
        self, app_dir: Path, overrides: Sequence[str], run_dir: Path, **kw: Any
    ) -> tuple[int, str]:
        return submit_run(
            app_dir, self.connection, self.env, overrides=overrides, run_dir=run_dir,
            config_file_dir=self.workdir, log_file=self.group.log_dir / "runs.log", **kw,
        )  # fmt: skip

    def close(self) -> None:
        self.group.stop_all()

    @contextlib.contextmanager
    def running(
        self,
        sites: Sequence[dict[str, Any]] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Iterator[Federation]:
        """Prepare, check every site, start SuperLink (+ register) and SuperNodes; stop
        all on exit. ``sites``: one node config per SuperNode (default: :meth:`site_config`
        of each); a site failing its start-up checks stops this before any process starts.
        """
        try:
            self.prepare()
            configs = list(sites) if sites else [self.site_config(i) for i in range(self.num_nodes)]
            if len(configs) != self.num_nodes:
                raise DeployError(f"{len(configs)} site configs for {self.num_nodes} SuperNodes")
            self.check_sites(configs, labels)
            self.start_superlink()
            if not self.insecure:
                self.register_all()
            self.start_supernodes([format_node_config(c) for c in configs])
            self.wait_online(self.num_nodes)
            yield self
        finally:
            self.close()


def app_root() -> Path:
    """The Flower App Bundle folder (the project root holding pyproject.toml)."""
    here = Path(__file__).resolve().parents[2]
    if not (here / "pyproject.toml").is_file():
        raise DeployError(f"no pyproject.toml in {here}; pass --app with the bundle folder")
    return here


def run_demo(
    workdir: Path | None,
    overrides: Sequence[str],
    *,
    insecure: bool = False,
    app_dir: Path | None = None,
    out: TextIO = sys.stdout,
    site_files: Sequence[str | Path] = (),
) -> int:
    """Loopback demo: 1 SuperLink + 3 SuperNodes (or one per site YAML in ``site_files``),
    one run, teardown by PID. Sites named twice, or failing their start-up checks, stop
    the demo before any process starts (:class:`DeployError` naming the sites).
    ``workdir`` None: a new temporary folder, made once the sites are read."""
    sites = load_sites(site_files) if site_files else None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="fl-demo-"))
    fed = Federation(workdir, num_nodes=len(sites) if sites else 3, insecure=insecure)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = {
        "num_rounds": "2",
        "dataset.num_partitions": str(fed.num_nodes),
        # Every site in every round (secure aggregation needs the whole cohort).
        "strategy.min_available_nodes": str(fed.num_nodes),
        "federated_eval_every": "0",
    }
    overrides = [*(f"{k}={v}" for k, v in defaults.items() if k not in given), *overrides]
    run_dir = Path(workdir).resolve() / "run"
    t0 = time.perf_counter()
    labels = [str(f) for f in site_files] if sites else None
    with fed.running(sites, labels):
        pid = fed.group.procs["superlink"].pid
        up = time.perf_counter() - t0
        print(f"SuperLink {fed.address} (pid {pid}); {fed.num_nodes} SuperNodes online after "
              f"{up:.1f}s", file=out)  # fmt: skip
        run_id, status = fed.submit(
            app_dir or app_root(),
            overrides,
            run_dir,
            progress=lambda line: print(f"  {line}", file=out, flush=True),
        )
        print(f"run {run_id}: {status}; run directory {run_dir}", file=out)
        print(run_verdict(status, run_dir), file=out, flush=True)
        if status != "finished:completed":
            print(run_logs(run_id, fed.connection, fed.env)[-4000:], file=out)
            return 1
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        s = json.loads(summary.read_text())
        print(json.dumps({k: s.get(k) for k in ("status", "accuracy", "rounds")}), file=out)
    return 0
