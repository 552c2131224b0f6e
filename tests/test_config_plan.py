"""resolve(cfg): typed errors by kind, one plan, one guarantee.

The error kinds are what a caller may rely on instead of the message text; the plan is
built once per resolve and handed to the factory; the guarantee names, per party, the
summary.json key that states its epsilon (docs/architecture.md, Configuration).
"""

from __future__ import annotations

import pytest

from fl_app.config.compose import compose_config
from fl_app.config.errors import (
    ConfigConflictError,
    ConfigError,
    ConfigPlanError,
    ConfigRangeError,
)
from fl_app.config.plan import resolve
from fl_app.privacy.round_event import fixed_cohort_size
from strategies.sampling import FixedSizeSampler

# (overrides, error kind, field): one case per kind and per place that raises it.
_KINDS = [
    (["num_rounds=0"], ConfigRangeError, "num_rounds"),
    (["strategy.fraction_train=1.5"], ConfigRangeError, "strategy.fraction_train"),
    (
        ["privacy=central", "privacy.noise_multiplier=-1"],
        ConfigRangeError,
        "privacy.noise_multiplier",
    ),
    (["secagg=secagg", "secagg.clip=1", "secagg.bits=65"], ConfigRangeError, "secagg.bits"),
    (["privacy.mode=central"], ConfigConflictError, "privacy.threat_model"),
    (["privacy=central", "secagg.mode=secaggplus"], ConfigConflictError, "privacy.clip_side"),
    # Raised while the plan is built (ClientDpSettings), typed at the source: no longer
    # a ValueError whose message text decided the field.
    (
        ["privacy=central_adaptive", "privacy.clipped_count_stddev=0.4"],
        ConfigConflictError,
        "privacy.clipped_count_stddev",
    ),
    (
        [
            "privacy=distributed",
            "secagg=secaggplus",
            "privacy.noise_multiplier=0.5",
            "privacy.max_epsilon=1",
        ],
        ConfigPlanError,
        "privacy.max_epsilon",
    ),
    (
        ["privacy=distributed", "secagg=secaggplus", "secagg.bits=8"],
        ConfigPlanError,
        "secagg.bits",
    ),
    (
        [
            "privacy=central",
            "privacy.threat_model=honest_but_curious",
            "privacy.clip_side=client",
            "secagg=secaggplus",
            "strategy.sampling=poisson",
            "strategy.fraction_train=0.3",
            "dataset.num_partitions=10",
            "num_rounds=5",
        ],
        ConfigPlanError,
        "privacy.delta",
    ),
]


@pytest.mark.parametrize("index", range(len(_KINDS)))
def test_each_refusal_has_its_kind_and_field(index: int) -> None:
    overrides, kind, field = _KINDS[index]
    with pytest.raises(ConfigError) as info:
        compose_config("config", overrides)
    assert type(info.value) is kind, (type(info.value).__name__, str(info.value))
    assert info.value.field == field
    assert str(info.value).startswith(f"config error in `{field}`")


def test_plan_carries_the_settings_the_factory_uses() -> None:
    """The factory builds the aggregator from the plan's settings object, not a rebuild."""
    from strategies.factory import build_aggregator

    cfg = compose_config("config", ["privacy=central", "privacy.threat_model=trusted_server"])
    plan = resolve(cfg)
    assert plan.client_dp is not None
    aggregator = build_aggregator(plan)
    assert getattr(aggregator, "settings", None) is plan.client_dp
    none = resolve(compose_config("config", []))
    assert none.client_dp is None and none.guarantee.epsilon == ()


def test_guarantee_names_the_epsilon_of_each_party() -> None:
    """Distributed DP states epsilon against outsiders and, separately, against the
    server (which picks the cohorts); central DP states none against the server; local
    DP's epsilon covers the server; DP-SGD adds each institution's records."""

    def keys(*overrides: str) -> list[str]:
        plan = resolve(compose_config("config", list(overrides)))
        return [e.summary_key for e in plan.guarantee.epsilon]

    assert keys("privacy=distributed", "secagg=secaggplus") == [
        "privacy.epsilon",
        "privacy.epsilon_against_server",
    ]
    central = resolve(compose_config("config", ["privacy=central"])).guarantee
    assert [e.party for e in central.epsilon] == ["outsiders"]
    local = resolve(compose_config("config", ["privacy=local"])).guarantee
    assert "server" in local.epsilon[0].party
    assert keys("privacy=dpsgd") == ["privacy.record_level_epsilon_max"]


def test_dry_run_prints_the_guarantee() -> None:
    from fl_app.cli.simulate import privacy_plan

    lines = privacy_plan(
        resolve(compose_config("config", ["privacy=distributed", "secagg=secaggplus"]))
    )
    assert lines[0].startswith("guarantee (distributed_dp): distributed DP:")
    assert lines[1].startswith("the server sees: only the masked sum")
    assert lines[2] == (
        "epsilon per party: outsiders: privacy.epsilon; the server (it picks the "
        "cohorts): privacy.epsilon_against_server"
    )


@pytest.mark.parametrize(
    ("fraction", "population", "expected"),
    [(0.3, 10, 3), (0.01, 10, 1), (1.0, 7, 7), (0.25, 10, 2), (0.35, 10, 4), (0.5, 1, 1)],
)
def test_fixed_cohort_size_is_the_samplers(fraction: float, population: int, expected: int) -> None:
    """One definition of the fixed cohort: round(q*N) (half to even) within [1, N], the
    size the sampler draws and the replace-one accountant counts."""
    assert fixed_cohort_size(fraction, population) == expected
    assert FixedSizeSampler(fraction, 0).cohort_size(population) == expected


_RANGE_CASES = [
    # (helper, value, allow_zero, accepted): edges worked out from "(0, 1]" / "[0, 1]" / "> 0".
    ("positive", 1e-300, None, True),
    ("positive", 0.0, None, False),
    ("positive", -1.0, None, False),
    ("positive", float("inf"), None, False),
    ("positive", float("nan"), None, False),
    ("fraction", 1.0, False, True),
    ("fraction", 0.0, False, False),
    ("fraction", 0.0, True, True),
    ("fraction", 1.0000001, True, False),
    ("fraction", -1e-12, True, False),
    ("fraction", float("nan"), True, False),
]


@pytest.mark.parametrize("index", range(len(_RANGE_CASES)))
def test_range_helpers_accept_exactly_their_interval(index: int) -> None:
    from fl_app.config.errors import require_fraction, require_positive

    helper, value, allow_zero, accepted = _RANGE_CASES[index]

    def call() -> None:
        if helper == "positive":
            require_positive(value, "a.b")
        else:
            require_fraction(value, "a.b", allow_zero=bool(allow_zero))

    if accepted:
        call()
        return
    with pytest.raises(ConfigRangeError) as info:
        call()
    bound = "must be a finite number > 0"
    if helper == "fraction":
        bound = "must lie in [0, 1]" if allow_zero else "must lie in (0, 1]"
    assert str(info.value) == f"config error in `a.b` (found {value!r}): {bound}"
    assert (info.value.field, info.value.fix) == ("a.b", bound)


def test_require_raises_the_kind_asked_for() -> None:
    from fl_app.config.errors import require, require_in

    require(True, "x", 1, "fix")
    with pytest.raises(ConfigConflictError):
        require(False, "x", 1, "fix")
    with pytest.raises(ConfigPlanError):
        require(False, "x", 1, "fix", ConfigPlanError)
    with pytest.raises(ConfigRangeError) as info:
        require_in(False, "x", 2, "must be >= 3")
    assert info.value.found == 2 and isinstance(info.value, ValueError)
    assert str(info.value) == "config error in `x` (found 2): must be >= 3"
