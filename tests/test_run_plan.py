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


# (overrides, sampling, planned train cohort on dataset.num_partitions=10) by hand:
# fixed-size sampling takes round(q*N) in [1, N] (Python's round: 2.5 -> 2), Poisson the
# expected q*N.
_COHORTS: list[tuple[list[str], str, float]] = [
    (["strategy.fraction_train=0.3"], "fixed", 3.0),
    (["strategy.fraction_train=0.25"], "fixed", 2.0),
    (["strategy.fraction_train=0.01"], "fixed", 1.0),
    (["strategy.sampling=poisson", "strategy.fraction_train=0.25"], "poisson", 2.5),
]


@pytest.mark.parametrize("index", range(len(_COHORTS)))
def test_plan_holds_the_drivers_cohort(index: int) -> None:
    overrides, sampling, cohort = _COHORTS[index]
    cfg = compose_config(
        "config",
        [
            "dataset.num_partitions=10",
            "strategy.min_available_nodes=1",
            "strategy.min_train_replies=1",
            *overrides,
        ],
    )
    d = resolve(cfg).driver
    assert (d.sampling.value, d.train_cohort, d.federation_size) == (sampling, cohort, 10)
    assert (d.min_available_nodes, d.min_train_replies) == (1, 1)
    if sampling == "fixed":
        from strategies.sampling import FixedSizeSampler

        # The sampler draws the cohort the plan states.
        assert FixedSizeSampler(d.fraction_train, 0).cohort_size(10) == cohort


def test_plan_says_when_sampling_is_secret_and_evaluation_runs() -> None:
    """Secret (keyed) sampling exactly where ε counts amplification by sampling; no
    evaluation sampler when federated evaluation is off."""
    central = resolve(
        compose_config("config", ["privacy=central", "privacy.threat_model=trusted_server"])
    ).driver
    assert central.secret_sampling is True
    distributed = resolve(
        compose_config("config", ["privacy=distributed", "secagg=secaggplus"])
    ).driver
    assert distributed.secret_sampling is True
    local = resolve(compose_config("config", ["privacy=local"])).driver
    assert local.secret_sampling is False
    seeded = resolve(
        compose_config(
            "config",
            ["privacy=central", "privacy.threat_model=trusted_server", "privacy.secure_mode=false"],
        )
    ).driver
    assert seeded.secret_sampling is False
    plain = resolve(compose_config("config", ["federated_eval_every=0"])).driver
    assert plain.secret_sampling is False
    assert (plain.fraction_evaluate, plain.federated_eval_every) == (0.0, 0)
    every = resolve(
        compose_config(
            "config",
            [
                "federated_eval_every=2",
                "strategy.fraction_evaluate=0.5",
                "strategy.min_available_nodes=3",
                "strategy.min_train_replies=2",
            ],
        )
    ).driver
    assert (every.fraction_evaluate, every.federated_eval_every) == (0.5, 2)
    assert (every.min_available_nodes, every.min_train_replies) == (3, 2)


def test_the_driver_takes_sampling_and_minimums_from_the_plan() -> None:
    from strategies.factory import build_driver
    from strategies.sampling import FixedSizeSampler

    plan = resolve(compose_config("config", ["strategy.fraction_train=1.0"]))
    mine = dataclasses.replace(
        plan.driver,
        fraction_train=0.5,
        fraction_evaluate=0.0,
        min_available_nodes=4,
        min_train_replies=3,
        federated_eval_every=0,
    )
    driver = build_driver(
        dataclasses.replace(plan, driver=mine),
        train_config={},
        evaluate_config={},
        evaluate_fn=None,
    )
    assert driver.train_sampler == FixedSizeSampler(0.5, plan.cfg.seed)
    assert driver.evaluate_sampler is None
    s = driver.settings
    assert (s.min_available_nodes, s.min_train_replies, s.federated_eval_every) == (4, 3, 0)


def test_default_evaluation_every_round_keeps_its_fraction() -> None:
    d = resolve(
        compose_config("config", ["federated_eval_every=1", "strategy.fraction_evaluate=0.5"])
    ).driver
    assert (d.fraction_evaluate, d.federated_eval_every) == (0.5, 1)


def test_client_dp_refusals_become_plan_errors_naming_their_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the client-level settings are built: a ring too narrow for the noised sum
    names ``secagg.bits`` and its value, an accountant's refusal names ``privacy`` and
    the mode; the source's message is the fix, whole. A ConfigError passes unchanged."""
    from fl_app.config.client_dp import ClientDpSettings
    from fl_app.config.errors import ConfigRangeError
    from fl_app.privacy.ddg_encoding import DdpConfigError

    cfg = compose_config("config", ["privacy=central", "privacy.threat_model=trusted_server"])
    cases: list[tuple[Exception, str]] = [
        (
            DdpConfigError("ring too narrow"),
            "config error in `secagg.bits` (found 32): ring too narrow",
        ),
        (
            ValueError("no such epsilon"),
            "config error in `privacy` (found 'central'): no such epsilon",
        ),
    ]
    for raised, message in cases:

        def refuse(*args: Any, exc: Exception = raised) -> None:
            raise exc

        monkeypatch.setattr(ClientDpSettings, "from_config", refuse)
        with pytest.raises(ConfigPlanError) as info:
            resolve(dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, bits=32)))
        assert str(info.value) == message
        assert info.value.__cause__ is raised
    own = ConfigRangeError("privacy.delta", 2, "must lie in (0, 1)")

    def typed(*args: Any) -> None:
        raise own

    monkeypatch.setattr(ClientDpSettings, "from_config", typed)
    with pytest.raises(ConfigRangeError) as passed:
        resolve(cfg)
    assert passed.value is own
