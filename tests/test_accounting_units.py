"""Unit tests for fl_app.privacy.accounting written against its surviving mutants.

``make mutate`` over ``accounting.py`` left mutants that the end-to-end comparisons in
``tests/test_accounting.py`` cannot see: PLD calibration's search (its doubling, shrink
and bisection branches were never all reached), the PRV grid estimate behind the
refusal to hang, the exact Opacus defaults behind ``prv``, the checks on what an
accountant returns, and the messages that name the field and the fix. Expected values
come from outside the code under test: the analytic Gaussian mechanism (Balle & Wang
2018, Theorem 8) solved with scipy, Opacus' own ``PRVAccountant``/``RDPAccountant``
and PRV domain, and literal JSON written by hand.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
from scipy.optimize import brentq
from scipy.stats import norm

from fl_app.privacy import accounting, calibration
from fl_app.privacy.accounting import epsilon
from fl_app.privacy.calibration import calibrate_noise_multiplier
from fl_app.privacy.history import AccountingError, DpSgdEvent, HistoryError, PrivacyHistory

DELTA = 1e-5


def _gaussian_epsilon(z: float, delta: float = DELTA) -> float:
    """Exact ε of one Gaussian mechanism with σ/Δ = z (Balle & Wang 2018, Thm 8):
    δ(ε) = Φ(1/(2z) − εz) − e^ε·Φ(−1/(2z) − εz), solved for ε."""

    def gap(eps: float) -> float:
        return norm.cdf(0.5 / z - eps * z) - math.exp(eps) * norm.cdf(-0.5 / z - eps * z) - delta

    return float(brentq(gap, 0.0, 50.0, xtol=1e-12))


def _assert_in_calibration_window(z: float, target: float) -> None:
    # PLD's pessimistic discretisation (interval 1e-4) may sit a little above the exact
    # ε, never below it; the search stops within 1 % below the target.
    exact = _gaussian_epsilon(z)
    assert exact <= target
    assert exact >= 0.99 * target - 2e-4


# ---- PLD calibration: every branch of the search --------------------------------------


def test_pld_calibration_from_the_rdp_start_lands_in_the_window() -> None:
    # One unsampled step (q = 1): the bisection between 0.8·z_rdp and z_rdp.
    z = calibrate_noise_multiplier(0.1, DELTA, 1.0, 1, "pld")
    _assert_in_calibration_window(z, 0.1)


def test_pld_calibration_doubles_from_twenty_when_rdp_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ε(z = 20) ≈ 0.16 > 0.14 > ε(40): one doubling, then bisection on [20, 40]. A
    # bracket whose low end is not over budget (tripling, low = 2·high) cannot converge.
    def no_rdp(*_args: object) -> float:
        raise ValueError("RDP cannot reach it")

    monkeypatch.setattr(calibration, "_opacus_noise_multiplier", no_rdp)
    assert _gaussian_epsilon(20.0) > 0.14 > _gaussian_epsilon(30.0) > _gaussian_epsilon(40.0)
    z = calibrate_noise_multiplier(0.14, DELTA, 1.0, 1, "pld")
    _assert_in_calibration_window(z, 0.14)


def test_pld_calibration_shrinks_a_far_too_large_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # A feasible start ten times the answer: the 0.8-steps come down to a bracket whose
    # low end is over budget before bisecting (not start/2, which is still feasible).
    answer = brentq(lambda z: _gaussian_epsilon(z) - 0.1, 10.0, 100.0)

    def far_start(*_args: object) -> float:
        return 10.0 * answer

    monkeypatch.setattr(calibration, "_opacus_noise_multiplier", far_start)
    z = calibrate_noise_multiplier(0.1, DELTA, 1.0, 1, "pld")
    _assert_in_calibration_window(z, 0.1)


def test_pld_calibration_that_cannot_converge_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "_MAX_BISECTIONS", 0)
    with pytest.raises(
        AccountingError,
        match="^calibration with pld failed: PLD calibration did not converge to within "
        r"0.001 of target_epsilon=0.1$",
    ):
        calibrate_noise_multiplier(0.1, DELTA, 1.0, 1, "pld")


# ---- Opacus calibration and the final check -------------------------------------------


def test_rdp_calibration_stops_within_one_percent_of_a_small_target() -> None:
    # Opacus' own default tolerance is 0.01 absolute (3 % of this target): it would stop
    # at 0.972·target here.
    target = 0.3
    z = calibrate_noise_multiplier(target, DELTA, 0.05, 10, "rdp")
    rdp = RDPAccountant()
    rdp.history = [(z, 0.05, 10)]
    assert 0.99 * target <= rdp.get_epsilon(DELTA) <= target


def _fixed_start(value: float) -> Callable[..., float]:
    def start(*_args: object) -> float:
        return value

    return start


def test_calibration_accepts_a_noise_multiplier_exactly_at_the_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calibration, "_opacus_noise_multiplier", _fixed_start(3.0))
    monkeypatch.setattr(calibration, "epsilon", lambda *_args: 1.5)
    assert calibrate_noise_multiplier(1.5, DELTA, 0.1, 10, "rdp") == 3.0


def test_calibration_refuses_an_over_budget_noise_multiplier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calibration, "_opacus_noise_multiplier", _fixed_start(3.0))
    monkeypatch.setattr(calibration, "epsilon", lambda *_args: 1.5000001)
    with pytest.raises(AccountingError, match=r"^calibrated noise_multiplier=3\.0 gives epsilon="):
        calibrate_noise_multiplier(1.5, DELTA, 0.1, 10, "rdp")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_calibration_failures_are_accounting_errors_naming_the_accountant(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    error = [ValueError("boom"), RuntimeError("boom"), ArithmeticError("boom")][index]

    def failing(*_args: object) -> float:
        raise error

    monkeypatch.setattr(calibration, "_opacus_noise_multiplier", failing)
    with pytest.raises(AccountingError, match=r"^calibration with rdp failed: boom$"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, "rdp")


def test_opacus_budget_too_low_is_reported_as_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def too_low(*_args: object) -> float:
        raise ValueError("The privacy budget is too low.")

    monkeypatch.setattr(calibration, "_opacus_noise_multiplier", too_low)
    with pytest.raises(ValueError, match="raise the budget or lower the number of steps") as info:
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, "rdp")
    assert str(info.value).startswith("target_epsilon=1.0 at delta=1e-05 is unreachable for 10")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, DELTA, 0.1, 10), r"^target_epsilon: expected a finite number in \(0, inf\)"),
        ((1.0, DELTA, 1.5, 10), r"^sample_rate: expected a finite number in \(0, 1\]"),
        ((1.0, DELTA, 1.0000001, 10), r"^sample_rate: expected a finite number in \(0, 1\]"),
        ((1.0, DELTA, 0.1, 0), r"^steps: expected an integer >= 1, found 0$"),
    ],
)
def test_calibration_argument_errors_start_with_the_field(
    args: tuple[float, float, float, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate_noise_multiplier(*args, "rdp")


# ---- PRV: exactly Opacus' defaults, and the grid estimate behind the refusal ------------


def test_prv_is_opacus_prv_accountant_with_its_defaults() -> None:
    history = PrivacyHistory((DpSgdEvent(1.1, 0.01, 300), DpSgdEvent(1.3, 0.02, 200)))
    reference = PRVAccountant()
    reference.history = [(1.1, 0.01, 300), (1.3, 0.02, 200)]
    assert epsilon(history, DELTA, "prv") == reference.get_epsilon(DELTA)


def test_prv_grid_estimate_is_opacus_domain_size() -> None:
    # Opacus' domain floors/ceils its ends to the mesh and rounds up to an even size.
    blocks, delta = ((1.0, 0.01, 1000),), 1e-5
    history = PrivacyHistory(tuple(DpSgdEvent(*b) for b in blocks))
    prvs = [PoissonSubsampledGaussianPRV(q, z) for z, q, _ in blocks]
    domain = PRVAccountant()._get_domain(
        prvs, [n for *_, n in blocks], eps_error=0.01, delta_error=delta / 1000
    )
    points = accounting._prv_grid_points(history, delta / 1000)
    assert abs(points - domain.size) <= 5


# ---- what an accountant returns, and its messages --------------------------------------


def _five_blocks() -> PrivacyHistory:
    return PrivacyHistory(tuple(DpSgdEvent(1.0 + i, 0.5, i + 1) for i in range(5)))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_unusable_accountant_results_are_refused(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    value = [math.inf, math.nan, -0.5][index]
    monkeypatch.setitem(accounting._BACKENDS, accounting.AccountantName.rdp, lambda *_: value)
    with pytest.raises(AccountingError) as info:
        epsilon(_five_blocks(), DELTA, "rdp")
    assert str(info.value) == (
        f"rdp accountant returned epsilon={value!r} for [(z=1, q=0.5, steps=1), "
        "(z=2, q=0.5, steps=2), (z=3, q=0.5, steps=3) and 2 more blocks] at delta=1e-05: "
        "not a usable bound (numerical overflow); choose another accountant explicitly "
        "('prv' or 'pld')"
    )


def test_a_zero_epsilon_from_the_accountant_is_a_valid_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(accounting._BACKENDS, accounting.AccountantName.pld, lambda *_: 0.0)
    assert epsilon(_five_blocks(), DELTA, "pld") == 0.0


def test_a_failing_accountant_is_named_with_the_ledger_and_the_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(*_args: object) -> float:
        raise OverflowError("math range error")

    monkeypatch.setitem(accounting._BACKENDS, accounting.AccountantName.prv, failing)
    history = PrivacyHistory((DpSgdEvent(0.5, 0.25, 4), DpSgdEvent(2.0, 0.5, 3)))
    with pytest.raises(AccountingError) as info:
        epsilon(history, DELTA, "prv")
    assert str(info.value) == (
        "prv accountant failed on [(z=0.5, q=0.25, steps=4), (z=2, q=0.5, steps=3)] at "
        "delta=1e-05: OverflowError: math range error; choose another accountant "
        "explicitly ('rdp' or 'pld')"
    )


@pytest.mark.parametrize(("blocks", "tail"), [(3, "] at delta"), (4, " and 1 more blocks] at")])
def test_three_blocks_are_described_then_a_count(
    monkeypatch: pytest.MonkeyPatch, blocks: int, tail: str
) -> None:
    def failing(*_args: object) -> float:
        raise ValueError("x")

    monkeypatch.setitem(accounting._BACKENDS, accounting.AccountantName.rdp, failing)
    history = PrivacyHistory(tuple(DpSgdEvent(1.0 + i, 0.5, 1) for i in range(blocks)))
    with pytest.raises(AccountingError) as info:
        epsilon(history, DELTA, "rdp")
    assert f"(z=3, q=0.5, steps=1){tail}" in str(info.value)


def test_epsilon_refuses_a_non_history_naming_its_type() -> None:
    with pytest.raises(TypeError, match=r"^history: expected a PrivacyHistory, found list$"):
        epsilon([], DELTA, "rdp")  # type: ignore[arg-type]


class _PlainEnum(enum.Enum):
    """An Enum that is not a str: only its ``.value`` names an accountant."""

    rdp = "rdp"


def test_accountant_may_be_any_enum_whose_value_names_one() -> None:
    history = PrivacyHistory((DpSgdEvent(1.5, 0.01, 20),))
    assert epsilon(history, DELTA, _PlainEnum.rdp) == epsilon(history, DELTA, "rdp")  # type: ignore[arg-type]


def test_unknown_accountant_lists_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        epsilon(PrivacyHistory(), DELTA, "moments")
    assert str(info.value) == "accountant: expected one of 'prv', 'rdp', 'pld', found 'moments'"


# ---- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.0", 0.1, 1), "noise_multiplier: expected a number, found '1.0' (str)"),
        ((True, 0.1, 1), "noise_multiplier: expected a number, found True (bool)"),
        ((10**400, 0.1, 1), "noise_multiplier: expected a finite number in (0, inf), found 1"),
        ((-1.0, 0.1, 1), "noise_multiplier: expected a finite number in (0, inf), found -1.0"),
        ((1.0, 2.0, 1), "sample_rate: expected a finite number in (0, 1], found 2.0"),
        ((1.0, 0.1, 1.0), "steps: expected an integer, found 1.0 (float)"),
        ((1.0, 0.1, False), "steps: expected an integer, found False (bool)"),
        ((1.0, 0.1, -2), "steps: expected an integer >= 1, found -2"),
    ],
)
def test_event_messages_name_the_field_and_the_value(
    args: tuple[object, ...], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        DpSgdEvent(*args)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_edge_values_are_accepted() -> None:
    event = DpSgdEvent(1e-300, 1.0, 1)
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (1e-300, 1.0, 1)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_delta_messages(index: int) -> None:
    delta, message = [
        (True, "delta: expected a number in (0, 1), found True"),
        ("1e-5", "delta: expected a number in (0, 1), found '1e-5'"),
        (0.0, "delta: expected a number in (0, 1), found 0.0; use δ well below 1/n"),
        (1.0, "delta: expected a number in (0, 1), found 1.0; use δ well below 1/n"),
    ][index]
    with pytest.raises(ValueError) as info:
        epsilon(PrivacyHistory(), delta, "rdp")  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_history_refuses_a_non_event_naming_its_position() -> None:
    with pytest.raises(TypeError, match=r"^events\[1\]: expected a DpSgdEvent, found tuple$"):
        PrivacyHistory((DpSgdEvent(1.0, 0.1, 1), (1.0, 0.1, 1)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^event: expected a DpSgdEvent, found tuple$"):
        PrivacyHistory().add((1.0, 0.1, 1))  # type: ignore[arg-type]


# ---- JSON ------------------------------------------------------------------------------


def test_history_json_is_canonical() -> None:
    history = PrivacyHistory((DpSgdEvent(1.1, 0.01, 3), DpSgdEvent(2.0, 0.5, 1)))
    assert history.to_json() == (
        '{"events": [{"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 3}, '
        '{"noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 1}], "version": 1}'
    )


def test_history_json_never_writes_a_non_finite_number() -> None:
    event = DpSgdEvent(1.0, 0.1, 1)
    object.__setattr__(event, "noise_multiplier", math.inf)  # bypassing the checks
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        PrivacyHistory((event,)).to_json()


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_from_json_messages(index: int) -> None:
    text, message = [
        (b"{}", "history: expected a JSON string, found bytes"),
        ('{"version": 1, "version": 1, "events": []}', "history: duplicate key 'version'"),
        ("[]", "history: expected a JSON object, found list"),
        ('{"version": 1, "events": {}}', "events: expected a list, found dict"),
        ('{"version": 1, "events": [3]}', "events[0]: expected an object, found int"),
    ][index]
    with pytest.raises(HistoryError) as info:
        PrivacyHistory.from_json(text)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_from_json_reads_what_to_json_wrote_by_hand() -> None:
    text = json.dumps(
        {"version": 1, "events": [{"noise_multiplier": 1.5, "sample_rate": 1, "steps": 2}]}
    )
    assert PrivacyHistory.from_json(text) == PrivacyHistory((DpSgdEvent(1.5, 1.0, 2),))


def test_events_and_histories_are_normalised_for_exact_equality_and_json() -> None:
    event = DpSgdEvent(np.float32(2.0), np.int64(1), np.int64(3))  # type: ignore[arg-type]
    assert [type(v) for v in (event.noise_multiplier, event.sample_rate, event.steps)] == [
        float,
        float,
        int,
    ]
    history = PrivacyHistory([event])  # type: ignore[arg-type]
    assert type(history.events) is tuple and history == PrivacyHistory((event,))
    assert '"sample_rate": 1.0' in history.to_json()
