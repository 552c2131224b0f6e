"""Unit tests for fl_app.privacy.ledger written against its surviving mutants.

``make mutate`` over ``ledger.py`` left mutants that the branch and end-to-end tests do
not see: the against-the-server ε of fixed-size (replace-one) rounds, the bound carried
across server processes when nothing was counted yet, and the ledger's argument checks
and messages. Expected values come from outside the code under test: dp-accounting's
RDP accountant composing the events written here, and the analytic Gaussian mechanism
(Balle & Wang 2018, Theorem 8) solved with scipy.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fl_app.privacy.composition import local_epsilon, unsampled_epsilon
from fl_app.privacy.history import AccountantName, AccountingError
from fl_app.privacy.ledger import FederationLedger, LedgerError
from fl_app.privacy.round_event import RoundEvent, SamplingScheme

DELTA = 1e-5


def _gaussian_rdp_epsilon(z: float, rounds: int, delta: float = DELTA) -> float:
    """dp-accounting's RDP ε of ``rounds`` Gaussian mechanisms with σ/Δ = z."""
    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(delta))


def _fixed(round_: int = 1, z: float = 4.0) -> RoundEvent:
    # 3 of 10 clients without replacement: replace-one, sensitivity 2C.
    return RoundEvent(round_, SamplingScheme.fixed, 10, 0.3, 3.0, z, 1.0, z)


def _poisson(round_: int = 1, z: float = 2.0) -> RoundEvent:
    return RoundEvent(round_, SamplingScheme.poisson, 10, 0.3, 3.0, z, 1.0, z)


# ---- ε against the server ---------------------------------------------------------------


def test_against_the_server_a_fixed_size_round_is_a_gaussian_of_sensitivity_2c() -> None:
    # Replace-one: two clipped updates differ by up to 2C, so σ/Δ = z/2 per round.
    value = unsampled_epsilon(_fixed(z=4.0), 3, DELTA, "rdp")
    assert value == pytest.approx(_gaussian_rdp_epsilon(2.0, 3), rel=2e-2)


def test_against_the_server_a_poisson_round_is_a_gaussian_of_sensitivity_c() -> None:
    value = unsampled_epsilon(_poisson(z=2.0), 3, DELTA, "rdp")
    assert value == pytest.approx(_gaussian_rdp_epsilon(2.0, 3), rel=2e-2)


@pytest.mark.parametrize("rounds", [0, -1])
def test_no_rounds_spend_nothing(rounds: int) -> None:
    assert unsampled_epsilon(_poisson(), rounds, DELTA, "rdp") == 0.0
    assert local_epsilon(2.0, rounds, DELTA, "rdp") == 0.0


def test_server_epsilons_before_any_cohort_is_counted_are_empty() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp, (_poisson(),))
    assert ledger.server_epsilons() == {}
    assert FederationLedger(DELTA, AccountantName.rdp).server_epsilons() == {}


def test_a_new_process_reports_the_earlier_processes_bound_under_its_own_key() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp, (_poisson(z=2.0),))
    resumed = ledger.add_participation(["7"]).add_participation(["7"]).new_participation_session()
    assert resumed.server_epsilons() == {
        "(earlier processes)": pytest.approx(_gaussian_rdp_epsilon(2.0, 2), rel=2e-2)
    }


def test_a_new_session_of_a_ledger_without_cohorts_carries_nothing() -> None:
    fresh = FederationLedger(DELTA, AccountantName.rdp).new_participation_session()
    assert fresh.participation_carried == 0
    assert fresh.most_participation() == 0


# ---- persistence ------------------------------------------------------------------------


def test_duplicate_keys_are_refused_naming_the_ledger() -> None:
    text = FederationLedger(DELTA, AccountantName.rdp).to_json()
    doubled = text.replace('"delta":', '"delta": 0.1, "delta":', 1)
    with pytest.raises(LedgerError) as info:
        FederationLedger.from_json(doubled)
    assert str(info.value) == "ledger: duplicate key 'delta'"


def test_ledger_json_round_trips_a_fixed_round() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp, (_fixed(),))
    assert FederationLedger.from_json(ledger.to_json()) == ledger
    assert json.loads(ledger.to_json())["events"][0]["sampling"] == "fixed"


# ---- dp-accounting events ---------------------------------------------------------------


def test_dp_events_are_the_documented_dp_accounting_events() -> None:
    assert _poisson(z=2.0).dp_event() == dp_accounting.PoissonSampledDpEvent(
        0.3, dp_accounting.GaussianDpEvent(2.0)
    )
    everyone = RoundEvent(1, SamplingScheme.fixed, 10, 1.0, 10.0, 2.5, 1.0, 2.5)
    assert everyone.dp_event() == dp_accounting.PoissonSampledDpEvent(
        1.0, dp_accounting.GaussianDpEvent(2.5)
    )
    assert _fixed(z=4.0).dp_event() == dp_accounting.SampledWithoutReplacementDpEvent(
        10, 3, dp_accounting.GaussianDpEvent(2.0)
    )


def test_a_distributed_round_has_no_dp_accounting_event() -> None:
    ddg = _ddg()
    with pytest.raises(AccountingError) as info:
        ddg.dp_event()
    assert str(info.value) == (
        "dp-accounting has no event for the distributed discrete Gaussian; "
        "its RDP bound is computed by fl_app.privacy.distributed.ddg_epsilon"
    )


# ---- local DP ---------------------------------------------------------------------------


def test_local_releases_are_counted_per_client() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp, local_noise_multiplier=2.0)
    ledger = ledger.add_local(["a", "b"]).add_local(["a", 3])  # type: ignore[list-item]
    assert ledger.local == (("3", 1), ("a", 2), ("b", 1))
    assert ledger.delta == DELTA and ledger.local_noise_multiplier == 2.0


def test_local_releases_need_a_local_noise_multiplier() -> None:
    with pytest.raises(ValueError) as info:
        FederationLedger(DELTA, AccountantName.rdp).add_local(["a"])
    assert str(info.value) == ("this ledger has no local_noise_multiplier (privacy.mode!=local)")
    assert FederationLedger(DELTA, AccountantName.rdp, local=(("a", 1),)).local_epsilons() == {}


def test_local_epsilons_are_gaussians_of_sensitivity_2c_per_client() -> None:
    # Any two clipped updates differ by up to 2C: σ/Δ = z/2 per release, no amplification.
    ledger = FederationLedger(1e-6, AccountantName.rdp, local_noise_multiplier=4.0)
    ledger = ledger.add_local(["a", "b"]).add_local(["a"])
    values = ledger.local_epsilons()
    assert set(values) == {"a", "b"}
    assert values["a"] == pytest.approx(_gaussian_rdp_epsilon(2.0, 2, 1e-6), rel=2e-2)
    assert values["b"] == pytest.approx(_gaussian_rdp_epsilon(2.0, 1, 1e-6), rel=2e-2)
    assert local_epsilon(4.0, 1, 1e-6, "rdp") == values["b"]


def test_local_epsilon_names_a_bad_noise_multiplier() -> None:
    with pytest.raises(ValueError, match=r"^noise_multiplier must be finite, > 0; found -1\.0$"):
        local_epsilon(-1.0, 2, DELTA, "rdp")


# ---- the persisted ledger, field by field -------------------------------------------------


def test_ledger_json_is_canonical() -> None:
    ledger = FederationLedger(
        1e-5,
        AccountantName.rdp,
        local_noise_multiplier=2.0,
        local=(("b", 1), ("a", 2)),
        participation=(("1", 3),),
    )
    assert ledger.to_json() == (
        '{\n "accountant": "rdp",\n "delta": 1e-05,\n "events": [],\n "local": {\n  "a": 2,\n'
        '  "b": 1\n },\n "local_noise_multiplier": 2.0,\n "participation": {\n  "1": 3\n },\n'
        ' "version": 1\n}'
    )


def test_ledger_json_never_writes_a_non_finite_number() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp, local_noise_multiplier=math.inf)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        ledger.to_json()


def test_a_resumed_local_dp_ledger_keeps_its_noise_and_counts() -> None:
    # Losing local_noise_multiplier on read would make local_epsilons() empty: a budget
    # that rewinds on every resume.
    ledger = FederationLedger(DELTA, AccountantName.rdp, local_noise_multiplier=4.0)
    ledger = ledger.add_local(["a", "b"]).add_local(["a"])
    again = FederationLedger.from_json(ledger.to_json())
    assert again == ledger
    assert again.local_noise_multiplier == 4.0 and again.local == (("a", 2), ("b", 1))


def _ledger_dict() -> dict[str, object]:
    return json.loads(FederationLedger(DELTA, AccountantName.rdp, (_poisson(),)).to_json())


def test_zero_counts_and_events_without_the_optional_fields_are_read() -> None:
    raw = _ledger_dict()
    raw["participation"] = {"1": 0}
    raw["local"] = {"a": 0}
    event = raw["events"][0]  # type: ignore[index]
    for name in ("mechanism", "ddg_tau", "ddg_dimension", "branch_delta", "encoding_slack"):
        del event[name]
    ledger = FederationLedger.from_json(json.dumps(raw))
    assert ledger.participation == (("1", 0),) and ledger.local == (("a", 0),)
    assert ledger.events == (_poisson(),)


_BAD_FIELDS: list[tuple[str, object, str]] = [
    ("participation", [], "participation must be an object"),
    ("participation", {"1": -1}, "participation['1']: expected a count >= 0, found -1"),
    ("participation", {"1": True}, "participation['1']: expected a count >= 0, found True"),
    ("participation", {"1": 1.0}, "participation['1']: expected a count >= 0, found 1.0"),
    ("version", 2, "version: unsupported ledger version 2"),
    ("events", {}, "events must be a list and local an object"),
    ("local", [], "events must be a list and local an object"),
    ("local", {"a": -1}, "local['a']: expected a count >= 0, found -1"),
    ("local", {"a": False}, "local['a']: expected a count >= 0, found False"),
    ("local", {"a": "1"}, "local['a']: expected a count >= 0, found '1'"),
]


@pytest.mark.parametrize("index", range(len(_BAD_FIELDS)))
def test_a_bad_field_is_refused_naming_it(index: int) -> None:
    field, value, message = _BAD_FIELDS[index]
    raw = _ledger_dict()
    raw[field] = value
    with pytest.raises(LedgerError) as info:
        FederationLedger.from_json(json.dumps(raw))
    assert str(info.value) == message


def test_malformed_ledgers_are_refused_with_the_reason() -> None:
    with pytest.raises(LedgerError, match=r"^ledger: not valid JSON \(Expecting property name"):
        FederationLedger.from_json("{")
    with pytest.raises(LedgerError) as info:
        FederationLedger.from_json("[]")
    assert str(info.value) == "ledger: expected a JSON object"
    with pytest.raises(LedgerError) as info:
        FederationLedger.from_json('{"version": 1}')
    assert str(info.value) == (
        "ledger: expected keys ['accountant', 'delta', 'events', 'local', "
        "'local_noise_multiplier', 'version'], found ['version']"
    )
    fields = sorted(RoundEvent.__dataclass_fields__)
    for item in (3, {"round": 1}):
        raw = _ledger_dict()
        raw["events"] = [item]
        with pytest.raises(LedgerError) as info:
            FederationLedger.from_json(json.dumps(raw))
        assert str(info.value) == f"events[0]: expected an object with keys {fields}"


def test_full_participation_is_never_amplified_by_the_informational_rate() -> None:
    # Fixed-size sampling of all 10 clients: q = 1 whatever sample_rate says.
    everyone = RoundEvent(1, SamplingScheme.fixed, 10, 0.5, 10.0, 2.5, 1.0, 2.5)
    assert everyone.dp_event() == dp_accounting.PoissonSampledDpEvent(
        1.0, dp_accounting.GaussianDpEvent(2.5)
    )


def test_the_ledger_refuses_a_round_it_already_has() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp)
    for round_ in (1, 2, 5):
        ledger = ledger.add(_poisson(round_))
    for again in (5, 4):
        with pytest.raises(ValueError) as info:
            ledger.add(_poisson(again))
        assert str(info.value) == (
            f"round {again} is not after the ledger's last round 5: the ledger is append-only"
        )


def test_projection_uses_the_accountant_asked_for() -> None:
    pld_ledger = FederationLedger(DELTA, AccountantName.pld, (_poisson(1),))
    value = pld_ledger.project([_poisson(2)], "rdp")
    acc = RdpAccountant()
    acc.compose(_poisson().dp_event(), 2)
    assert value == pytest.approx(acc.get_epsilon(DELTA), rel=2e-2)
    rdp_ledger = FederationLedger(DELTA, AccountantName.rdp, (_poisson(1),))
    assert value == rdp_ledger.project([_poisson(2)])


# ---- composing the ledger -------------------------------------------------------------------


def test_rounds_with_different_noise_are_composed_each_with_its_own() -> None:
    # z = 5 then z = 1: merging the second into the first block would account 2 rounds
    # at z = 5 (far less than the truth).
    ledger = FederationLedger(DELTA, AccountantName.rdp, (_poisson(1, 5.0), _poisson(2, 1.0)))
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(5.0)))
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(1.0)))
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=2e-2)


def _ddg(round_: int = 1) -> RoundEvent:
    return RoundEvent(
        round_,
        SamplingScheme.poisson,
        10,
        0.3,
        3.0,
        2.0,
        1.0,
        2.0,
        mechanism="ddg",
        ddg_tau=0.0,
        ddg_dimension=8,
    )


_UNCOMPOSABLE: list[tuple[tuple[RoundEvent, ...], AccountantName, str]] = [
    (
        (_ddg(1), _poisson(2)),
        AccountantName.rdp,
        "the ledger mixes distributed-DP rounds with central-DP rounds; no accountant "
        "composes the two here. Keep privacy.mode fixed within a run",
    ),
    (
        (_ddg(1),),
        AccountantName.pld,
        "distributed DP is accounted only by the RDP bound of Kairouz et al. (not 'pld'); "
        "set privacy.accountant=rdp",
    ),
    (
        (_fixed(1), _poisson(2)),
        AccountantName.rdp,
        "the ledger mixes fixed-size rounds (replace-one) with Poisson/full-participation "
        "rounds (add/remove); no accountant composes the two relations. Keep "
        "strategy.sampling and strategy.fraction_train fixed within a run",
    ),
    (
        (_fixed(1),),
        AccountantName.prv,
        "fixed-size sampling without replacement is supported only by dp-accounting's RDP "
        "accountant, not 'prv'; set privacy.accountant=rdp or strategy.sampling=poisson",
    ),
]


@pytest.mark.parametrize("index", range(len(_UNCOMPOSABLE)))
def test_ledgers_no_accountant_composes_are_refused_saying_what_to_fix(index: int) -> None:
    events, accountant, message = _UNCOMPOSABLE[index]
    with pytest.raises(AccountingError) as info:
        FederationLedger(DELTA, accountant, events).epsilon()
    assert str(info.value) == message


class _FixedRdp:
    """Stands in for dp-accounting's replace-one RDP accountant, returning ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def compose(self, event: object, count: int = 1) -> None:
        pass

    def get_epsilon(self, delta: float) -> float:
        return self.value


@pytest.mark.parametrize("index", [0, 1, 2])
def test_an_unusable_replace_one_epsilon_is_refused(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    from fl_app.privacy import composition as ledger_module

    value = [math.inf, math.nan, -1.0][index]
    monkeypatch.setattr(ledger_module, "_replace_one_rdp", lambda: _FixedRdp(value))
    with pytest.raises(AccountingError) as info:
        FederationLedger(DELTA, AccountantName.rdp, (_fixed(),)).epsilon()
    assert str(info.value) == f"rdp accountant returned epsilon={value!r} for this ledger"


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_a_small_replace_one_epsilon_is_reported_as_it_is(
    monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    from fl_app.privacy import composition as ledger_module

    monkeypatch.setattr(ledger_module, "_replace_one_rdp", lambda: _FixedRdp(value))
    assert FederationLedger(DELTA, AccountantName.rdp, (_fixed(),)).epsilon() == value


# ---- the ledger's own fields ------------------------------------------------------------------


def test_an_empty_ledger_has_spent_nothing() -> None:
    ledger = FederationLedger(DELTA, AccountantName.rdp)
    assert ledger.epsilon() == 0.0 and ledger.project([]) == 0.0


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_delta_outside_the_open_unit_interval_is_refused(index: int) -> None:
    delta, message = [
        (1.0, "delta must lie in (0, 1), found 1.0"),
        (1.5, "delta must be finite, > 0 and <= 1.0; found 1.5"),
        (0.0, "delta must be finite, > 0 and <= 1.0; found 0.0"),
        ("1e-5", "delta must be a number, found '1e-5'"),
    ][index]
    with pytest.raises(ValueError) as info:
        FederationLedger(delta, AccountantName.rdp)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_the_ledger_normalises_its_fields() -> None:
    ledger = FederationLedger(
        DELTA,
        "rdp",  # type: ignore[arg-type]
        [_poisson(1)],  # type: ignore[arg-type]
        local=(("b", 1), ("a", 2)),
        participation=(("9", 1), ("10", 2)),
    )
    assert ledger.accountant is AccountantName.rdp
    assert type(ledger.events) is tuple and ledger.events == (_poisson(1),)
    assert ledger.local == (("a", 2), ("b", 1))
    assert ledger.participation == (("10", 2), ("9", 1))
    with pytest.raises(TypeError) as info:
        FederationLedger(DELTA, AccountantName.rdp, (_poisson(1), "round 2"))  # type: ignore[arg-type]
    assert str(info.value) == "events[1]: expected a RoundEvent, found str"


# ---- RoundEvent's checks, field by field ---------------------------------------------------------

_GOOD = dict(
    round=1, sampling="poisson", population=10, sample_rate=0.3, cohort=3.0,
    noise_multiplier=2.0, clip=1.0, update_noise_multiplier=2.0,
)  # fmt: skip
_DDG = dict(mechanism="ddg", ddg_tau=0.0, ddg_dimension=8)

_BAD_EVENTS: list[tuple[dict[str, object], str]] = [
    ({"round": True}, "round must be an integer >= 1, found True"),
    ({"round": 0}, "round must be an integer >= 1, found 0"),
    ({"round": 1.0}, "round must be an integer >= 1, found 1.0"),
    ({"population": True}, "population must be an integer >= 1, found True"),
    ({"population": 0}, "population must be an integer >= 1, found 0"),
    ({"population": 10.0}, "population must be an integer >= 1, found 10.0"),
    ({"sample_rate": "0.3"}, "sample_rate must be a number, found '0.3'"),
    ({"sample_rate": 0}, "sample_rate must be finite, > 0 and <= 1; found 0"),
    ({"sample_rate": 1.5}, "sample_rate must be finite, > 0 and <= 1; found 1.5"),
    ({"cohort": 0.0}, "cohort must be finite, > 0; found 0.0"),
    ({"clip": -1.0}, "clip must be finite, > 0; found -1.0"),
    ({"clipped_count_std": 0.0}, "clipped_count_std must be finite, > 0; found 0.0"),
    (
        {"sampling": "fixed", "cohort": 2.5},
        "fixed-size cohort must be an integer <= population 10, found 2.5",
    ),
    (
        {"sampling": "fixed", "cohort": 11.0},
        "fixed-size cohort must be an integer <= population 10, found 11.0",
    ),
    ({"branch_delta": True}, "branch_delta must be a finite number, found True"),
    ({"branch_delta": math.nan}, "branch_delta must be a finite number, found nan"),
    ({"branch_delta": 1.5}, "branch_delta must lie in [0, 1], found 1.5"),
    ({"branch_delta": -0.1}, "branch_delta must lie in [0, 1], found -0.1"),
    ({"encoding_slack": -1.0}, "encoding_slack must be >= 0, found -1.0"),
    ({"mechanism": "laplace"}, "mechanism must be 'gaussian', 'ddg', 'tree' or 'tree_once', "
     "found 'laplace'"),
    ({"mechanism": "ddg", "ddg_tau": 0.0}, "ddg_tau and ddg_dimension are set exactly for "
     "mechanism='ddg'"),
    ({"ddg_tau": 0.0, "ddg_dimension": 8}, "ddg_tau and ddg_dimension are set exactly for "
     "mechanism='ddg'"),
    ({**_DDG, "ddg_tau": -1.0}, "ddg_tau must be a finite number >= 0, found -1.0"),
    ({**_DDG, "ddg_tau": math.inf}, "ddg_tau must be a finite number >= 0, found inf"),
    ({**_DDG, "ddg_tau": True}, "ddg_tau must be a finite number >= 0, found True"),
    ({**_DDG, "ddg_dimension": 0}, "ddg_dimension must be an int >= 1, found 0"),
    ({**_DDG, "ddg_dimension": True}, "ddg_dimension must be an int >= 1, found True"),
    ({**_DDG, "ddg_dimension": 8.0}, "ddg_dimension must be an int >= 1, found 8.0"),
    (
        {**_DDG, "sampling": "fixed"},
        "distributed DP is accounted for Poisson sampling or full participation only",
    ),
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(_BAD_EVENTS)))
def test_a_bad_round_event_is_refused_naming_the_field(index: int) -> None:
    change, message = _BAD_EVENTS[index]
    with pytest.raises(ValueError) as info:
        RoundEvent(**{**_GOOD, **change})  # type: ignore[arg-type]
    assert str(info.value) == message


def test_round_events_at_the_edges_are_accepted_and_normalised() -> None:
    one = RoundEvent(**{**_GOOD, "population": 1, "cohort": 1, "sample_rate": 1})  # type: ignore[arg-type]
    assert type(one.cohort) is float and type(one.sample_rate) is float
    edge = RoundEvent(**{**_GOOD, **_DDG, "ddg_tau": 0, "ddg_dimension": 1, "branch_delta": 1})  # type: ignore[arg-type]
    assert type(edge.ddg_tau) is float and edge.branch_delta == 1.0
    adaptive = RoundEvent(**{**_GOOD, "clipped_count_std": 2})  # type: ignore[arg-type]
    assert adaptive.clipped_count_std == 2.0 and type(adaptive.clipped_count_std) is float
    with pytest.raises(ValueError, match="participation_carried"):
        FederationLedger(DELTA, AccountantName.rdp, participation_carried=True)
