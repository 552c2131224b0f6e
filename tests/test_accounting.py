"""Guarantees of the record-level privacy ledger (fl_app.privacy.accounting).

The central one: ε of a ledger built round by round equals an *independent*
composition of the same mechanisms in dp-accounting (PLD and RDP), built here from
dp-accounting's own event objects, not from our code.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from functools import cache

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fl_app.config.schema import Accountant
from fl_app.privacy.accounting import epsilon, project_epsilon
from fl_app.privacy.calibration import calibrate_noise_multiplier
from fl_app.privacy.history import (
    HISTORY_VERSION,
    AccountantName,
    AccountingError,
    DpSgdEvent,
    HistoryError,
    PrivacyHistory,
)

DELTA = 1e-5


def _sampled_gaussian(z: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


@dataclass(frozen=True)
class Setting:
    """A run as per-round (noise_multiplier, sample_rate, steps) blocks, and the same
    mechanism written independently as one dp-accounting event."""

    rounds: tuple[tuple[float, float, int], ...]
    reference: dp_accounting.DpEvent
    delta: float = DELTA

    def history(self) -> PrivacyHistory:
        history = PrivacyHistory()
        for z, q, steps in self.rounds:  # one add per round, as a client does
            history = history.add(DpSgdEvent(z, q, steps))
        return history


_ABADI_Q = 256 / 60000
_ABADI_STEPS = int(60 / _ABADI_Q)  # 60 epochs
_FED_Q = 16 / 130
_FED_ROUND = 3 * round(1 / _FED_Q)  # 3 local epochs of Poisson batches per round

SETTINGS = {
    # Abadi et al. 2016, MNIST: q = 256/60000, z = 1.1, 60 epochs.
    "abadi": Setting(
        ((1.1, _ABADI_Q, _ABADI_STEPS),),
        dp_accounting.SelfComposedDpEvent(_sampled_gaussian(1.1, _ABADI_Q), _ABADI_STEPS),
    ),
    "q0.01-z1-1000": Setting(
        ((1.0, 0.01, 1000),),
        dp_accounting.SelfComposedDpEvent(_sampled_gaussian(1.0, 0.01), 1000),
    ),
    # Federated: 5 rounds x 3 local epochs, added to the ledger one round at a time.
    "fed-5-rounds": Setting(
        ((1.1, _FED_Q, _FED_ROUND),) * 5,
        dp_accounting.SelfComposedDpEvent(_sampled_gaussian(1.1, _FED_Q), 5 * _FED_ROUND),
    ),
    # Federated with a noise schedule: 2 rounds at z = 1.1, then 3 at z = 1.3.
    "fed-schedule": Setting(
        ((1.1, _FED_Q, _FED_ROUND),) * 2 + ((1.3, _FED_Q, _FED_ROUND),) * 3,
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(_sampled_gaussian(1.1, _FED_Q), 2 * _FED_ROUND),
                dp_accounting.SelfComposedDpEvent(_sampled_gaussian(1.3, _FED_Q), 3 * _FED_ROUND),
            ]
        ),
    ),
}


@cache
def reference_pld(name: str) -> float:
    accountant = PLDAccountant()
    accountant.compose(SETTINGS[name].reference)
    return float(accountant.get_epsilon(SETTINGS[name].delta))


@cache
def reference_rdp(name: str) -> float:
    accountant = RdpAccountant()
    accountant.compose(SETTINGS[name].reference)
    return float(accountant.get_epsilon(SETTINGS[name].delta))


@cache
def ours(name: str, accountant: AccountantName) -> float:
    return epsilon(SETTINGS[name].history(), SETTINGS[name].delta, accountant)


# ---- epsilon equals an independent composition --------------------------------------


@pytest.mark.parametrize("name", SETTINGS)
def test_prv_matches_independent_pld_within_1_percent(name: str) -> None:
    assert ours(name, AccountantName.prv) == pytest.approx(reference_pld(name), rel=0.01)


@pytest.mark.parametrize("name", SETTINGS)
def test_rdp_matches_independent_rdp_within_1_percent(name: str) -> None:
    assert ours(name, AccountantName.rdp) == pytest.approx(reference_rdp(name), rel=0.01)


@pytest.mark.parametrize("name", SETTINGS)
def test_pld_equals_independent_pld(name: str) -> None:
    assert ours(name, AccountantName.pld) == pytest.approx(reference_pld(name), rel=1e-9)


def test_abadi_reference_values() -> None:
    # Published figures for MNIST DP-SGD (q=256/60000, z=1.1, 60 epochs, δ=1e-5).
    assert reference_pld("abadi") == pytest.approx(2.38, abs=0.01)
    assert reference_rdp("abadi") == pytest.approx(2.60, abs=0.01)
    assert ours("abadi", AccountantName.pld) == pytest.approx(2.38, abs=0.01)
    assert ours("abadi", AccountantName.rdp) == pytest.approx(2.60, abs=0.01)


def test_upper_bounds_are_ordered() -> None:
    # RDP is looser than the numerical accountants; PRV reports estimate + eps_error.
    for name in SETTINGS:
        assert ours(name, AccountantName.pld) <= ours(name, AccountantName.prv)
        assert ours(name, AccountantName.prv) < ours(name, AccountantName.rdp)


def test_ledger_built_per_round_merges_to_one_block() -> None:
    history = SETTINGS["fed-5-rounds"].history()
    assert history.events == (DpSgdEvent(1.1, _FED_Q, 5 * _FED_ROUND),)
    assert len(SETTINGS["fed-schedule"].history().events) == 2


def test_split_and_merged_ledgers_give_the_same_epsilon() -> None:
    merged = PrivacyHistory((DpSgdEvent(1.5, 0.02, 200),))
    split = PrivacyHistory((DpSgdEvent(1.5, 0.02, 50), DpSgdEvent(1.5, 0.02, 150)))
    assert epsilon(split, DELTA, "rdp") == pytest.approx(epsilon(merged, DELTA, "rdp"), rel=1e-9)
    for accountant in ("prv", "pld"):
        assert epsilon(split, DELTA, accountant) == pytest.approx(
            epsilon(merged, DELTA, accountant), rel=2e-3
        )


# ---- basic properties ------------------------------------------------------------


@pytest.mark.parametrize("accountant", list(AccountantName))
def test_empty_history_spends_nothing(accountant: AccountantName) -> None:
    assert epsilon(PrivacyHistory(), DELTA, accountant) == 0.0


@pytest.mark.parametrize("accountant", list(AccountantName))
def test_more_steps_spend_more(accountant: AccountantName) -> None:
    values = [
        epsilon(PrivacyHistory((DpSgdEvent(1.5, 0.02, n),)), DELTA, accountant)
        for n in (1, 10, 100)
    ]
    assert all(a < b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("accountant", list(AccountantName))
def test_more_noise_spends_less(accountant: AccountantName) -> None:
    values = [
        epsilon(PrivacyHistory((DpSgdEvent(z, 0.02, 100),)), DELTA, accountant)
        for z in (1.2, 2.0, 4.0)
    ]
    assert all(a > b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("accountant", list(AccountantName))
def test_project_epsilon_is_epsilon_after_adding(accountant: AccountantName) -> None:
    history = PrivacyHistory((DpSgdEvent(1.5, 0.02, 50),))
    planned = DpSgdEvent(2.0, 0.04, 20)
    projected = project_epsilon(history, planned, DELTA, accountant)
    assert projected == epsilon(history.add(planned), DELTA, accountant)
    assert projected > epsilon(history, DELTA, accountant)


def test_accepts_schema_enum_and_strings() -> None:
    assert {a.value for a in AccountantName} == {a.value for a in Accountant}
    history = PrivacyHistory((DpSgdEvent(1.5, 0.01, 20),))
    for member in Accountant:
        assert epsilon(history, DELTA, member) == epsilon(history, DELTA, member.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"accountant": "moments"}, "accountant"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
    ],
)
def test_epsilon_rejects_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "history": PrivacyHistory((DpSgdEvent(1.0, 0.01, 10),)),
        "delta": DELTA,
        "accountant": "rdp",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        epsilon(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_ten_thousand_steps_take_well_under_two_seconds(accountant: str) -> None:
    history = PrivacyHistory((DpSgdEvent(1.0, 0.01, 10_000),))
    # CPU time, not wall time: a loaded CI machine must not make this flaky.
    start = time.process_time()
    value = epsilon(history, DELTA, accountant)
    assert time.process_time() - start < 2.0
    assert 6.0 < value < 7.0


def test_prv_refuses_instead_of_overflowing() -> None:
    # z = 0.05 at q = 0.5: Opacus' PRV would return inf after seconds of work.
    history = PrivacyHistory((DpSgdEvent(0.05, 0.5, 10),))
    with pytest.raises(AccountingError, match="accountant='pld'"):
        epsilon(history, DELTA, "prv")
    assert math.isfinite(epsilon(history, DELTA, "rdp"))


# ---- DpSgdEvent and PrivacyHistory -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0.0, 0.1, 1), "noise_multiplier"),
        ((-1.0, 0.1, 1), "noise_multiplier"),
        ((float("inf"), 0.1, 1), "noise_multiplier"),
        (("1.0", 0.1, 1), "noise_multiplier"),
        ((True, 0.1, 1), "noise_multiplier"),
        ((1.0, 0.0, 1), "sample_rate"),
        ((1.0, 1.5, 1), "sample_rate"),
        ((1.0, float("nan"), 1), "sample_rate"),
        ((1.0, 0.1, 0), "steps"),
        ((1.0, 0.1, 2.0), "steps"),
        ((1.0, 0.1, True), "steps"),
    ],
)
def test_event_rejects_bad_values_naming_the_field(args: tuple[object, ...], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DpSgdEvent(*args)  # type: ignore[arg-type]


def test_event_normalises_numpy_scalars() -> None:
    event = DpSgdEvent(np.float32(1.5), np.float64(0.25), np.int64(7))  # type: ignore[arg-type]
    assert event == DpSgdEvent(1.5, 0.25, 7)
    assert type(event.noise_multiplier) is float and type(event.steps) is int


def test_add_merges_only_with_an_identical_last_block() -> None:
    a, b = DpSgdEvent(1.0, 0.1, 3), DpSgdEvent(2.0, 0.1, 5)
    empty = PrivacyHistory()
    one = empty.add(a)
    assert empty.events == ()  # add returns a new ledger
    assert one.add(a).events == (DpSgdEvent(1.0, 0.1, 6),)
    assert one.add(b).events == (a, b)
    assert one.add(b).add(a).events == (a, b, a)  # only the last block merges
    assert one.add(b).add(a).total_steps == 11
    assert PrivacyHistory().total_steps == 0
    with pytest.raises(TypeError, match="event"):
        one.add((1.0, 0.1, 3))  # type: ignore[arg-type]


def test_history_json_round_trip_is_exact() -> None:
    history = (
        PrivacyHistory()
        .add(DpSgdEvent(1.1, 16 / 130, 24))
        .add(DpSgdEvent(0.1 + 0.2, 1 / 3, 10**9))
        .add(DpSgdEvent(1.1, 16 / 130, 1))
    )
    text = history.to_json()
    assert PrivacyHistory.from_json(text) == history
    assert json.loads(text)["version"] == HISTORY_VERSION
    assert PrivacyHistory.from_json(PrivacyHistory().to_json()) == PrivacyHistory()


def _doc(events: object = None, **top: object) -> str:
    body: dict[str, object] = {
        "version": HISTORY_VERSION,
        "events": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}]
        if events is None
        else events,
    }
    body.update(top)
    return json.dumps(body)


def _event(**fields: object) -> str:
    item: dict[str, object] = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}
    item.update(fields)
    return _doc([{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}, item])


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("not json", "history"),
        ("[1, 2]", "history"),
        ('{"version": 1, "events": [' * 5000, "history"),
        ('{"version": 1, "events": [{"steps": ' + "9" * 5000 + "}]}", "history"),
        ('{"version": 1, "version": 1, "events": []}', "duplicate key 'version'"),
        ('{"events": []}', "history.version"),
        (_doc(version=2), "version"),
        (_doc(version="1"), "version"),
        (_doc(version=True), "version"),
        (_doc(extra=1), "history.extra"),
        (_doc(events={"a": 1}), "events"),
        (_doc(events=[5]), r"events\[0\]"),
        (_event(noise_multiplier=-1.0), r"events\[1\]\.noise_multiplier"),
        (_event(noise_multiplier="1.0"), r"events\[1\]\.noise_multiplier"),
        (_event(noise_multiplier=None), r"events\[1\]\.noise_multiplier"),
        (_event(noise_multiplier=10**400), r"events\[1\]\.noise_multiplier"),
        (_event(sample_rate=0), r"events\[1\]\.sample_rate"),
        (_event(sample_rate=1.01), r"events\[1\]\.sample_rate"),
        (_event(steps=-3), r"events\[1\]\.steps"),
        (_event(steps=2.5), r"events\[1\]\.steps"),
        (_event(steps=False), r"events\[1\]\.steps"),
        (_event(clip=1.0), r"events\[1\]\.clip"),
        (_doc([{"noise_multiplier": 1.0, "sample_rate": 0.1}]), r"events\[0\]\.steps"),
    ],
)
def test_from_json_rejects_garbage_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(HistoryError, match=field):
        PrivacyHistory.from_json(text)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_from_json_rejects_non_finite_numbers(constant: str) -> None:
    text = (
        '{"version": 1, "events": '
        f'[{{"noise_multiplier": {constant}, "sample_rate": 0.1, "steps": 5}}]}}'
    )
    with pytest.raises(HistoryError, match=r"events\[0\]\.noise_multiplier"):
        PrivacyHistory.from_json(text)


def test_from_json_rejects_non_text() -> None:
    with pytest.raises(HistoryError, match="history"):
        PrivacyHistory.from_json(b'{"version": 1, "events": []}')  # type: ignore[arg-type]


def test_history_error_is_a_value_error() -> None:
    # Callers (fl_app.privacy.state) catch ValueError for any unreadable ledger.
    assert issubclass(HistoryError, ValueError)


# ---- calibration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [
        # Cheap settings for the numerical accountants (PLD's cost grows as z falls).
        ("prv", 0.3, 0.01, 100),
        ("pld", 0.3, 0.01, 100),
        ("rdp", 0.3, 0.01, 100),
        ("rdp", 2.0, _ABADI_Q, _ABADI_STEPS),
        ("rdp", 8.0, _FED_Q, 5 * _FED_ROUND),
    ],
)
def test_calibrated_noise_meets_the_target_closely(
    accountant: str, target: float, q: float, steps: int
) -> None:
    z = calibrate_noise_multiplier(target, DELTA, q, steps, accountant)
    reached = epsilon(PrivacyHistory((DpSgdEvent(z, q, steps),)), DELTA, accountant)
    assert 0.98 * target <= reached <= target


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_unreachable_target_raises_value_error(accountant: str) -> None:
    # q = 1 and many steps: ε stays above 1e-9 for every z <= 1e6.
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(1e-9, DELTA, 1.0, 10_000, accountant)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0.0, DELTA, 0.1, 10), "target_epsilon"),
        ((1.0, 2.0, 0.1, 10), "delta"),
        ((1.0, DELTA, 0.0, 10), "sample_rate"),
        ((1.0, DELTA, 0.1, 0), "steps"),
    ],
)
def test_calibration_rejects_bad_arguments(
    args: tuple[float, float, float, int], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        calibrate_noise_multiplier(*args, "rdp")
