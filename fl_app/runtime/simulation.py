"""Run a validated experiment on one machine (or a Ray cluster).

Backends (``runtime.backend``):

* ``ray``: Flower's simulation engine (``flwr.simulation.run_simulation``) with
  explicit client resources; ``runtime.ray_address`` joins an existing Ray cluster
  to scale past one machine. ``run_simulation`` is deprecated in Flower 1.41 but is
  the only in-Python entry point to the simulation runtime; its replacement (``flwr
  run`` against a local SuperLink) is documented in the README and works with this
  same app.
* ``inprocess``: fl-app's :class:`~fl_app.runtime.inprocess.InProcessGrid` runs the real
  ClientApp handlers in this process; no Ray start-up, the fastest way to simulate
  many small clients.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fl_app.config.plan import RunPlan, resolve
from fl_app.config.schema import AppConfig, SecAggMode, SimulationBackend
from fl_app.server.layout import RunLayout

__all__ = ["SimulationFailed", "backend_config", "run_simulation_experiment"]


class SimulationFailed(RuntimeError):
    """The ServerApp did not complete (its summary says why)."""


def backend_config(cfg: AppConfig) -> dict[str, Any]:
    """Flower's ``backend_config`` for the Ray backend."""
    r = cfg.runtime
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "ignore_reinit_error": True,
        "logging_level": "error",
        "log_to_driver": True,
    }
    # "local" (Ray's own keyword) starts a private instance and never attaches to a
    # cluster someone else started on this machine; anything else joins that cluster.
    init_args["address"] = r.ray_address
    if r.ray_address == "local" and r.ray_num_cpus is not None:
        init_args["num_cpus"] = r.ray_num_cpus
    return {
        "client_resources": {"num_cpus": r.client_num_cpus, "num_gpus": r.client_num_gpus},
        "init_args": init_args,
    }


def run_simulation_experiment(
    run: AppConfig | RunPlan, run_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Run a config with its configured backend; return the run's summary.

    ``run`` is the config or, better, the plan the caller already resolved from it: the
    plan is resolved at most once here and handed to the ServerApp, which runs in this
    process with either backend (Ray runs only the clients elsewhere).

    The summary's ``status`` may be ``failed`` (no round updated the model) or
    ``degraded``: check it. Raises :class:`SimulationFailed` only when the ServerApp
    wrote no summary at all.

    Local data files are read and checked first (:func:`fl_app.data.check_local_data`):
    a bad file raises :class:`~fl_app.data.DataError` before round 1 and before Ray
    starts, instead of every client refusing in round 1. So is the hardware
    (:func:`fl_app.config.validate_device.check_simulation_hardware`): a ``train.device``
    or GPU share this machine lacks raises
    :class:`~fl_app.device.DeviceUnavailableError` naming the field. With Ray, each client
    gets ``runtime.client_num_gpus`` of a GPU (fractions share one); the in-process
    backend trains every client on ``train.device`` directly.
    """
    from fl_app.client.app import app as client_app
    from fl_app.config.validate_device import check_simulation_hardware
    from fl_app.data import check_local_data

    cfg = run.cfg if isinstance(run, RunPlan) else run
    check_local_data(cfg.dataset, cfg.seed)
    # train.device and the GPU shares exist here (a deployed server never checks this).
    check_simulation_hardware(cfg)
    plan = run if isinstance(run, RunPlan) else resolve(run)
    from fl_app.server.app import configure_logging, run_experiment

    configure_logging(cfg)
    num_nodes = cfg.dataset.num_partitions
    if cfg.secagg.mode is not SecAggMode.off and cfg.secagg.server_model.value == "malicious":
        # Simulated sites sign with keys derived from this process's roster secret
        # (fl_app.secagg.signing.SimulationRoster). Drawing it marks the process tree as
        # a simulation (a deployed SuperNode has no such mark and must bring its own
        # key and roster); drawn before Ray starts, so every worker inherits it.
        from fl_app.secagg.signing import start_simulation_roster

        start_simulation_roster()
    if cfg.runtime.backend is SimulationBackend.inprocess:
        from fl_app.runtime.inprocess import InProcessGrid

        grid = InProcessGrid(client_app, num_nodes, seed=cfg.seed, copy_messages=True)
        return run_experiment(grid, plan, run_dir)

    # Ray workers inherit the environment: keep torch single-threaded per actor
    # unless the user asked otherwise, and keep Ray's own chatter out of the way.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fl_app.server.app import make_server_app

    run_simulation(
        server_app=make_server_app(plan, run_dir),
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_name="ray",
        backend_config=backend_config(cfg),
    )
    summary_path = RunLayout(Path(run_dir)).summary
    if not summary_path.is_file():
        raise SimulationFailed(f"the ServerApp wrote no summary in {run_dir}")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    # A run that ended (completed, degraded or failed: its summary's ``status`` and
    # ``status_reason`` say which) is returned like the in-process backend's; the
    # caller (``fl-app simulate``) turns a failed status into a non-zero exit.
    return summary
