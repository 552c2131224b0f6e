"""Flower's executables, their environment and command lines, and the processes we start.

Every process runs in its own session so that it and the ServerApp/ClientApp processes
it spawns are stopped together by process group, never by name. Every environment we
hand a Flower process is stripped of the simulation mark (:func:`child_env`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fl_app.deploy import DeployError
from fl_app.deploy.pki import CA_CERT, SERVER_CERT, SERVER_KEY

__all__ = [
    "INSECURE_WARNING",
    "ProcessGroup",
    "child_env",
    "deploy_env",
    "flower_bin",
    "free_port",
    "superlink_command",
    "supernode_command",
    "wait_for_port",
    "warm_clientapp_command",
    "warn_insecure",
]

INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Model updates, "
    "metrics and run configs cross the network in clear text and any process that "
    "reaches the port can join as a SuperNode. Use only on a trusted loopback for tests."
)


def warn_insecure() -> None:
    print(INSECURE_WARNING, file=sys.stderr, flush=True)


def flower_bin(name: str) -> str:
    """A Flower executable: next to this interpreter first (the venv), then PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def deploy_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: venv bin on PATH, no runtime installs, and never
    the simulation mark (:func:`child_env`)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return child_env(env)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the simulation roster secret, for every process fl-app starts for a
    deployment. The secret marks a process a simulation entry point started (its
    simulated sites sign with keys derived from it, :mod:`fl_app.secagg.signing`); a
    SuperNode or ClientApp that inherited it from a process that once simulated (a
    notebook, a CI job, LocalFederation's parent) would accept partition-<i> identities
    forged by whoever holds that secret, instead of refusing without a roster."""
    from fl_app.secagg.signing import SIMULATION_SECRET_ENV

    out = dict(env)
    out.pop(SIMULATION_SECRET_ENV, None)
    return out


def superlink_command(
    host: str,
    port: int,
    cert_dir: str | os.PathLike[str] | None,
    *,
    insecure: bool = False,
    node_auth: bool = True,
    database: str | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no runtime installs."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    else:
        if cert_dir is None:
            raise DeployError("TLS needs --certs (the folder `fl-app deploy server-cert` wrote)")
        d = Path(cert_dir)
        files = [d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DeployError(f"missing {missing}; run `fl-app deploy server-cert --out {d}`")
        cmd += [
            "--ssl-ca-certfile", str(files[0]),
            "--ssl-certfile", str(files[1]),
            "--ssl-keyfile", str(files[2]),
        ]  # fmt: skip
        if node_auth:
            cmd.append("--enable-supernode-auth")
    cmd.append("--disable-runtime-dependency-installation")
    if database:
        cmd += ["--database", database]
    return cmd


def supernode_command(
    superlink: str,
    *,
    root_certificates: str | os.PathLike[str] | None,
    private_key: str | os.PathLike[str] | None,
    node_config: str,
    port: int,
    insecure: bool = False,
    max_wait_time: float | None = None,
    isolation: str = "subprocess",
) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` with the CA pinned and its auth key.
    ``isolation="process"``: the SuperNode starts no SuperExec; a launcher started next
    to it (:func:`warm_clientapp_command`) runs its ClientApps from Runtime API ``port``."""
    if isolation not in ("subprocess", "process"):
        raise DeployError(f"isolation must be 'subprocess' or 'process', got {isolation!r}")
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if isolation == "process":
        cmd += ["--isolation", "process"]
    if insecure:
        cmd.append("--insecure")
    else:
        if root_certificates is None:
            raise DeployError("TLS needs --ca (the federation's ca.crt)")
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", node_config]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def warm_clientapp_command(runtime_port: int, parent_pid: int) -> list[str]:
    """The warm ClientApp launcher (:mod:`fl_app.deploy.warm_clientapp`) for the SuperNode
    with PID ``parent_pid`` whose Runtime API listens on loopback ``runtime_port``."""
    return [
        sys.executable, "-m", "fl_app.deploy.warm_clientapp",
        "--runtime-api-address", f"127.0.0.1:{runtime_port}",
        "--parent-pid", str(parent_pid),
    ]  # fmt: skip


@dataclass
class ProcessGroup:
    """Processes started here, each in its own session, stopped by PID (group) only."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str], cwd: Path) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # A new session: the process and the ServerApp/ClientApp processes it spawns
            # share a process group whose id is its PID, so teardown reaches them all.
            proc = subprocess.Popen(
                list(cmd),
                env=child_env(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc.pid

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived their parent still carry its group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        # SuperNodes first, the SuperLink last (reverse start order).
        for name in reversed(list(self.procs)):
            self.stop(name)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
