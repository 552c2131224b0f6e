"""The ``flwr`` CLI, wrapped: connection file, node registration, runs, status and logs.

``flwr run --stream`` exits 0 even when the ServerApp fails, so :func:`submit_run`
takes a run's outcome from the SuperLink (``flwr ls``), and follows the run's log with
one idle ``flwr log --stream`` rather than polling (each ``flwr`` call costs CPU the
run needs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_app.deploy import DeployError
from fl_app.deploy.procs import child_env, flower_bin
from fl_app.server.layout import SUMMARY_FILE

__all__ = [
    "flwr_home",
    "list_nodes",
    "register_node",
    "run_logs",
    "run_status",
    "run_verdict",
    "submit_run",
    "unregister_node",
    "write_connection",
]


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("FLWR_HOME"):
        return Path(env["FLWR_HOME"])
    return Path(env.get("HOME", str(Path.home()))) / ".flwr"


def write_connection(
    name: str,
    address: str,
    root_certificates: str | os.PathLike[str] | None,
    insecure: bool = False,
    home: Path | None = None,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.

    With TLS the CA certificate is pinned (absolute path; Flower requires one).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DeployError(f"connection name {name!r} must be letters, digits, '_' or '-'")
    if insecure == (root_certificates is not None):
        raise DeployError("give exactly one of root_certificates (TLS) and insecure")
    import tomllib

    path = (home or flwr_home()) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix it first") from err
    # Drop an existing section of that name (up to the next table header).
    header = f"[superlink.{name}]"
    lines, skip = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skip = stripped == header
        if not skip:
            lines.append(line)
    body = [header, f"address = {json.dumps(address)}"]
    if insecure:
        body.append("insecure = true")
    else:
        ca = Path(str(root_certificates)).resolve()
        if not ca.is_file():
            raise DeployError(f"root certificate {str(ca)!r} does not exist")
        body.append(f"root-certificates = {json.dumps(str(ca))}")
    new = "\n".join([*lines, "", *body]).strip() + "\n"
    tomllib.loads(new)
    path.write_text(new)
    return path


def _flwr(
    args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [flower_bin("flwr"), *args],
        env=child_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed (other lines may precede it)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
    start = text.find("{")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(text[start:])
            if isinstance(obj, dict):
                return obj
    raise DeployError(f"no JSON in flwr output: {text[-1500:]!r}")


def register_node(
    public_key: str | os.PathLike[str], connection: str, env: Mapping[str, str]
) -> int:
    """``flwr supernode register``; returns the node id the SuperLink assigned."""
    proc = _flwr(["supernode", "register", str(public_key), connection, "--format", "json"], env)
    out = proc.stdout + proc.stderr
    try:
        res = _last_json(proc.stdout)
    except DeployError:
        res = {}
    if proc.returncode != 0 or not res.get("success"):
        raise DeployError(f"registering {public_key} failed (rc={proc.returncode}): {out[-1500:]}")
    return int(res["node-id"])


def unregister_node(node_id: int, connection: str, env: Mapping[str, str]) -> None:
    """``flwr supernode unregister NODE_ID`` (Flower unregisters by node id, not by key)."""
    proc = _flwr(["supernode", "unregister", str(node_id), connection, "--format", "json"], env)
    try:
        res = _last_json(proc.stdout)
    except DeployError:
        res = {}
    if proc.returncode != 0 or not res.get("success"):
        out = proc.stdout + proc.stderr
        raise DeployError(
            f"unregistering node {node_id} failed (rc={proc.returncode}): {out[-1500:]}"
        )


def list_nodes(connection: str, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The SuperLink's node list (``flwr supernode ls --format json``)."""
    proc = _flwr(["supernode", "ls", connection, "--format", "json"], env)
    res = _last_json(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0 or not res.get("success"):
        raise DeployError(f"flwr supernode ls failed: {(proc.stdout + proc.stderr)[-1500:]}")
    return list(res.get("nodes", []))


def run_status(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    proc = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env)
    res = _last_json(proc.stdout) if proc.stdout.strip() else {}
    runs = res.get("runs") or []
    if proc.returncode != 0 or not runs:
        raise DeployError(
            f"flwr ls --run-id {run_id} failed: {(proc.stdout + proc.stderr)[-1500:]}"
        )
    return str(runs[0]["status"])


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _start_run(
    app_dir: str | os.PathLike[str],
    connection: str,
    env: Mapping[str, str],
    config_name: str,
    overrides: Sequence[str],
    run_dir: str | os.PathLike[str] | None,
    config_file_dir: Path | None,
) -> int:
    """``flwr run`` with the run config in a TOML file (overrides hold spaces and quotes);
    returns the run id the SuperLink assigned."""
    lines = [
        f"hydra-config-name = {_toml_str(config_name)}",
        f"hydra-overrides = {_toml_str(' '.join(overrides))}",
    ]
    if run_dir is not None:
        lines.append(f"run-dir = {_toml_str(str(Path(run_dir).resolve()))}")
    with tempfile.TemporaryDirectory(dir=config_file_dir) as tmp:
        cfg = Path(tmp) / "run-config.toml"
        cfg.write_text("\n".join(lines) + "\n")
        proc = _flwr(
            ["run", str(Path(app_dir).resolve()), connection, "--run-config", str(cfg),
             "--format", "json"],
            env,
            cwd=Path(app_dir),
            timeout=300,
        )  # fmt: skip
    try:
        res = _last_json(proc.stdout)
    except DeployError:
        res = {}
    if proc.returncode != 0 or not res.get("run-id"):
        raise DeployError(
            f"flwr run failed (rc={proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"
        )
    return int(res["run-id"])


def submit_run(
    app_dir: str | os.PathLike[str],
    connection: str,
    env: Mapping[str, str],
    *,
    config_name: str = "config",
    overrides: Sequence[str] = (),
    run_dir: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
    poll: float = 2.0,
    config_file_dir: Path | None = None,
    log_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """``flwr run`` the bundle, follow its log until it ends, then ask ``flwr ls``.

    ``flwr run --stream`` exits 0 even when the ServerApp fails, so the status comes
    from the SuperLink (the ServerApp raises when no round updated the model, so such a
    run ends ``finished:failed``). Returns (run id, final status, e.g.
    ``"finished:completed"``). Run config goes through a TOML file: overrides hold
    spaces and quotes. ``progress`` receives the ServerApp's progress lines as they
    arrive (one per round: clients accepted, ε, accuracy, seconds; then its verdict).
    """
    run_id = _start_run(app_dir, connection, env, config_name, overrides, run_dir, config_file_dir)
    deadline = time.monotonic() + timeout
    # Follow the run with one idle `flwr log --stream` (it returns when the run ends)
    # rather than polling: every `flwr` call costs ~1-2 s of CPU that the run needs.
    with open(log_file, "ab") if log_file is not None else open(os.devnull, "wb") as sink:
        _follow_log(
            [flower_bin("flwr"), "log", str(run_id), connection, "--stream"],
            env, sink, deadline, progress,
        )  # fmt: skip
    status = "pending"
    while True:
        status = run_status(run_id, connection, env)
        if status.startswith("finished"):
            return run_id, status
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    raise DeployError(f"run {run_id} still {status!r} after {timeout:.0f}s")


# The ServerApp's own progress lines (fl_app.server.progress.ProgressPrinter and the run's end),
# which Flower mirrors from its stdout into the run log.
_PROGRESS = re.compile(r"(\[round \d+/\d+\]|run (FAILED|DEGRADED):|done: |stopped early: )")


def _follow_log(
    cmd: list[str],
    env: Mapping[str, str],
    sink: Any,
    deadline: float,
    progress: Callable[[str], None] | None,
) -> None:
    """Copy ``flwr log --stream`` into ``sink`` until the run ends (or ``deadline``),
    handing the ServerApp's progress lines to ``progress`` as they arrive."""
    import threading

    proc = subprocess.Popen(
        cmd, env=child_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    timer = threading.Timer(max(1.0, deadline - time.monotonic()), proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            sink.write(raw)
            if progress is not None:
                line = raw.decode("utf-8", "replace").rstrip()
                found = _PROGRESS.search(line)
                if found:
                    progress(line[found.start() :])
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_verdict(status: str, run_dir: Path | None) -> str:
    """One line saying how a deployed run ended: the SuperLink's status, and, where the
    run directory is on this machine, its summary's status and reason."""
    summary_path = run_dir / SUMMARY_FILE if run_dir is not None else None
    if summary_path is not None and summary_path.is_file():
        try:
            s = json.loads(summary_path.read_text())
        except ValueError:
            s = {}
        acc = s.get("accuracy")
        shown = f", accuracy {acc:.4f}" if isinstance(acc, float) else ""
        reason = f": {s['status_reason']}" if s.get("status_reason") else ""
        return (
            f"verdict: {str(s.get('status', '?')).upper()} ({status}; "
            f"{s.get('rounds_model_updated', '?')} of {s.get('rounds_planned', '?')} rounds "
            f"updated the model{shown}){reason}"
        )
    ok = status == "finished:completed"
    return f"verdict: {'COMPLETED' if ok else 'FAILED'} ({status})"


def run_logs(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    proc = _flwr(["log", str(run_id), connection, "--show"], env, timeout=60)
    return proc.stdout + proc.stderr
