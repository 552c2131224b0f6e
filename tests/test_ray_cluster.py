"""``runtime.ray_address`` joins an existing Ray cluster instead of starting a private one.

The test starts its own single-node Ray head (``ray start --head --block`` from the
venv, a free port, 2 CPUs, its own temp dir, in its own session), runs a tiny
simulation (3 clients, 1 round, Ray backend, one ClientApp actor) in a subprocess with
``runtime.ray_address=127.0.0.1:<port>``, and checks two things:

* the run completed (its ``summary.json`` says so);
* it ran *on that cluster*: Ray writes each driver's core-worker log into the logs
  directory of the session it attached to, named ``python-core-driver-<job>_<pid>.log``,
  so the simulation process's pid appears in *our* cluster's temp dir, and its
  ClientApp actors' worker logs are there too. A private cluster would write under
  its own temp dir instead.

Teardown kills the head's whole session (GCS, raylet, workers): never ``ray stop``,
which would stop every Ray instance on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # zombies are gone already
            pids.append(int(entry))
    return pids


def _stop_session(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the session leader, so it does not linger as a zombie
            if not _session_pids(proc.pid):
                break
            time.sleep(0.2)
        if not _session_pids(proc.pid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A private Ray head on a free port: yields (address, temp dir)."""
    ray = Path(sys.executable).parent / "ray"
    if not ray.is_file():
        pytest.skip(f"no ray executable next to {sys.executable}")
    port = _free_port()
    # Short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    log = open(temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed in teardown
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {_tail(temp_dir)}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1),
            ):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head not up after {_START_TIMEOUT_S:.0f} s: {_tail(temp_dir)}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop_session(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tail(temp_dir: Path) -> str:
    path = temp_dir / "ray-start.log"
    return path.read_text(errors="replace")[-800:] if path.is_file() else ""


_SIMULATE = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from pathlib import Path
    from fl_app.config.compose import compose_config
    from fl_app.runtime.simulation import run_simulation_experiment

    cfg = compose_config("config", sys.argv[2:])
    summary = run_simulation_experiment(cfg, Path(sys.argv[1]))
    print("RESULT " + json.dumps({"pid": os.getpid(), "status": summary.get("status")}))
    """
)


@pytest.mark.slow
def test_simulation_joins_the_ray_cluster_named_by_ray_address(
    ray_head: tuple[str, Path], tmp_path: Path
) -> None:
    address, temp_dir = ray_head
    overrides = [
        "runtime=simulation",
        f"runtime.ray_address={address}",
        # One ClientApp actor on the 2-CPU head: each actor imports torch and fl-app
        # first (~8 CPU-s), and a second one only slows a shared 2-core machine down.
        "runtime.client_num_cpus=2",
        "dataset.num_partitions=3",
        "dataset.val_fraction=0",
        "federated_eval_every=0",
        "strategy.min_available_nodes=2",
        "num_rounds=1",
        "experiment_name=ray_cluster_test",
    ]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="1")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _SIMULATE, str(tmp_path / "run"), *overrides],
        cwd=_REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["status"] == "completed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"

    logs = temp_dir / "session_latest" / "logs"
    drivers = sorted(p.name for p in logs.glob("python-core-driver-*.log"))
    assert any(name.endswith(f"_{result['pid']}.log") for name in drivers), (
        f"the simulation (pid {result['pid']}) left no driver log in the cluster's "
        f"session {logs}: it did not attach to {address}; found {drivers}"
    )
    # Its ClientApp actors ran on the cluster's raylet too.
    assert list(logs.glob("python-core-worker-*.log"))
