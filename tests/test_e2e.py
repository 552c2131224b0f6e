"""End-to-end: the README's commands as a user runs them (slow: Ray, Flower's SuperLink).

Few and marked ``slow``; CI still runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    # As after `source .venv/bin/activate`: `flwr run` launches `flower-superlink` from PATH.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _fl_app(*args: str, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fl-app"), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_fl_app_simulate_default_on_ray_reaches_90_percent(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _fl_app("simulate", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["accuracy"] >= 0.90
    out = proc.stdout + proc.stderr
    for rnd in range(1, 6):  # progress per round, each line once (no double logging)
        assert out.count(f"[round {rnd}/5]") == 1, out[-3000:]
    rounds = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rounds) == 5
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.slow
def test_bad_config_fails_before_any_client_starts(tmp_path: Path) -> None:
    proc = _fl_app(
        "simulate",
        "strategy.fraction_train=1.5",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "strategy.fraction_train" in proc.stderr and "(0, 1]" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    assert "[round" not in proc.stdout


@pytest.mark.slow
def test_hydra_multirun_sweeps_strategies(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _fl_app(
        "simulate",
        "-m",
        "runtime=inprocess",
        "num_rounds=1",
        "federated_eval_every=0",
        "strategy=fedavg,fedadam",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    assert all(s["status"] == "completed" for s in summaries)
    assert len({s["config_hash"] for s in summaries}) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_flwr_run_with_local_simulation_connection(tmp_path: Path) -> None:
    """`flwr run .` (the README's one-time set-up) runs the same default experiment."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink.local]\naddress = ":local:"\n')
    port = _free_port()
    env = _env(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
    )
    run_dir = tmp_path / "run"
    try:
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "local",
                "--stream",
                "--federation-config",
                "num-supernodes=10 client-resources-num-cpus=1",
                "--run-config",
                f"run-dir='{run_dir}'",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        # `--stream` exits 0 even when the ServerApp fails: ask the SuperLink.
        ls = subprocess.run(
            [str(BIN / "flwr"), "ls", "local", "--format", "json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        runs = json.loads(ls.stdout)["runs"]
        assert runs and all(r["status"] == "finished:completed" for r in runs), ls.stdout
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["accuracy"] >= 0.90
    finally:
        _stop_local_superlink(home)


def _stop_local_superlink(home: Path) -> None:
    """`flwr run` leaves its auto-started SuperLink running: stop it by PID."""
    found = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and subprocess.run(
            ["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        time.sleep(0.2)
