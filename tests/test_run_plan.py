"""The run's plan is built once and is what the server side runs with.

``resolve(cfg)`` builds the secure-aggregation settings with the rest of the plan
(docs/architecture.md, Configuration); the round driver takes them from the plan, and a
``fl-app simulate`` run resolves its config once in its process (preflight, the Hydra
job, the ServerApp and the run session share that one plan).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from fl_app.config import plan as plan_module
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigPlanError
from fl_app.config.plan import resolve
from fl_app.secagg.params import GraphMode, ServerModel
from fl_app.secagg.settings import SecAggSettings


def test_plan_holds_the_secagg_settings_of_the_config() -> None:
    """Each field read from ``secagg.*`` (and the federation size from
    ``dataset.num_partitions``), values written out by hand, not rebuilt by the code."""
    cfg = compose_config(
        "config",
        [
            "secagg=secagg",
            "secagg.clip=2.5",
            "secagg.bits=40",
            "secagg.dropout_tolerance=0.25",
            "secagg.corrupt_fraction=0.15",
            "secagg.stage_timeout_s=7",
            "secagg.max_weight=500",
            "secagg.key_rounds=3",
            "dataset.num_partitions=12",
        ],
    )
    plan = resolve(cfg)
    assert plan.secagg == SecAggSettings(
        mode=GraphMode.secagg,
        bits=40,
        dropout_tolerance=0.25,
        corrupt_fraction=0.15,
        stage_timeout_s=7.0,
        clip=2.5,
        max_weight=500.0,
        key_rounds=3,
        server_model=ServerModel.honest_but_curious,
        federation_size=12,
    )
    assert resolve(compose_config("config", [])).secagg is None


def test_the_driver_takes_secagg_settings_from_the_plan() -> None:
    """The driver's secure aggregation runs with the plan's settings object itself: a
    plan carrying other settings than its config would give is what the driver uses."""
    from strategies.factory import build_driver

    plan = resolve(compose_config("config", ["secagg=secaggplus", "secagg.clip=1"]))
    own = SecAggSettings(mode=GraphMode.secagg, clip=3.0, bits=20, key_rounds=1)
    driver = build_driver(
        dataclasses.replace(plan, secagg=own),
        train_config={},
        evaluate_config={},
        evaluate_fn=None,
    )
    assert driver.secagg is not None and driver.secagg.settings is own
    off = build_driver(
        dataclasses.replace(plan, secagg=None),
        train_config={},
        evaluate_config={},
        evaluate_fn=None,
    )
    assert off.secagg is None


def test_a_settings_refusal_is_a_plan_error_naming_secagg(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal only the settings object makes reaches the caller as a typed config
    error naming the ``secagg`` group, the mode found and the settings' own message."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("secagg.clip must be > 0, found -1")

    cfg = compose_config("config", [])
    monkeypatch.setattr(SecAggSettings, "from_config", refuse)
    with pytest.raises(ConfigPlanError) as info:
        resolve(cfg)
    assert info.value.field == "secagg"
    assert info.value.found == "off"
    assert str(info.value) == (
        "config error in `secagg` (found 'off'): secagg.clip must be > 0, found -1"
    )


def test_a_simulate_run_resolves_its_plan_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fl-app simulate`` (in-process backend, one round) runs ``resolve`` once: the
    preflight's plan goes to the Hydra job, the ServerApp and the run session (three
    resolves before, each calibrating and counting the model's parameters)."""
    from fl_app.cli import main as cli_main

    calls: list[object] = []
    validate = plan_module.validate_config

    def counting(cfg: Any) -> None:
        calls.append(cfg)
        validate(cfg)

    monkeypatch.setattr(plan_module, "validate_config", counting)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    try:
        cli_main(
            [
                "simulate",
                "runtime=inprocess",
                "dataset.num_partitions=2",
                "federated_eval_every=0",
                "num_rounds=1",
                f"hydra.run.dir={run}",
            ]
        )
    except SystemExit as done:
        assert not done.code, done.code
    assert (run / "summary.json").is_file()
    assert len(calls) == 1
