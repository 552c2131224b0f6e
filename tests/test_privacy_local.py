"""Local DP as a unit (fl_app.privacy.local): accounting, budget, persistence order, noise.

Expected ε comes from dp-accounting directly: one local-DP release is a Gaussian
mechanism of replace-one sensitivity 2C with noise z*C, i.e. GaussianDpEvent(z / 2),
composed over the client's releases (dp-accounting's RDP accountant; the PLD path is
checked end to end in test_local_dp_state.py and costs seconds per call).
"""

from __future__ import annotations

from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fl_app.privacy.local import add_gaussian_noise, begin_release, releases_seen
from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal
from fl_app.privacy.state import LocalDpState, PrivacyStateError

DELTA = 1e-5


def _rdp_epsilon(z: float, releases: int) -> float:
    ref = RdpAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(z / 2), releases)
    return float(ref.get_epsilon(DELTA))


class _Store:
    """An in-memory release store that records the order of calls."""

    def __init__(self, releases: int = 0, calls: list[str] | None = None, fail: bool = False):
        self.state = LocalDpState(releases=releases, noise_multiplier=2.0) if releases else None
        self.calls = calls if calls is not None else []
        self.fail = fail
        self.seen_arg: int | None = None
        self.z_arg: float | None = None
        self.site_epsilon: float | None = None

    def load(self, noise_multiplier: float, releases_seen_by_server: int = 0) -> LocalDpState:
        self.calls.append("load")
        self.seen_arg = releases_seen_by_server
        self.z_arg = noise_multiplier
        if self.fail:
            raise PrivacyStateError("the state file was lost")
        return self.state or LocalDpState(releases=0, noise_multiplier=noise_multiplier)

    def save(self, state: LocalDpState) -> None:
        self.calls.append("save")
        self.state = state


def _release(store: _Store, **kw: Any) -> Any:
    def account_site(eps: float, spent_before: bool) -> None:
        store.calls.append(f"site:{spent_before}")
        store.site_epsilon = eps

    args: dict[str, Any] = dict(
        noise_multiplier=2.0,
        clip_norm=0.5,
        delta=DELTA,
        accountant="rdp",
        max_epsilon=None,
        seen_by_server=0,
        account_site=account_site,
    )
    args.update(kw)
    return begin_release(lambda: store, **args)


def test_epsilon_is_the_composition_of_gaussian_releases_at_half_z() -> None:
    store = _Store(releases=2)
    release = _release(store, seen_by_server=2)
    assert release.releases == 3
    assert release.epsilon == pytest.approx(_rdp_epsilon(2.0, 3), rel=1e-9)
    assert store.seen_arg == 2
    # The store checks the z its file was written for; the site ledger gets this ε.
    assert store.z_arg == 2.0
    assert store.site_epsilon == release.epsilon
    assert store.state == LocalDpState(releases=3, noise_multiplier=2.0)
    # The site's ledger learns the run already spent before this release.
    assert store.calls == ["load", "site:True", "save"]
    assert release.noise_std == pytest.approx(1.0)  # z * C = 2 * 0.5
    assert release.public_metrics(7) == {
        "dp-local-epsilon": release.epsilon,
        "dp-local-releases": 3,
        "dp-partition-id": 7,
    }


def test_first_release_tells_the_site_nothing_was_spent_before() -> None:
    store = _Store()
    release = _release(store)
    assert release.releases == 1
    assert release.epsilon == pytest.approx(_rdp_epsilon(2.0, 1), rel=1e-9)
    assert store.calls == ["load", "site:False", "save"]


def test_one_release_before_counts_as_spent() -> None:
    store = _Store(releases=1)
    assert _release(store, seen_by_server=1).releases == 2
    assert store.calls == ["load", "site:True", "save"]


def test_an_accountant_failure_is_a_refusal_naming_it() -> None:
    store = _Store()
    with pytest.raises(PrivacyRefusal, match=r"^local DP accounting: "):
        _release(store, accountant="no-such-accountant")
    assert store.calls == ["load"]


def test_budget_refusal_saves_nothing_and_skips_the_site_ledger() -> None:
    after = _rdp_epsilon(2.0, 3)
    store = _Store(releases=2)
    with pytest.raises(BudgetRefusal, match="local DP budget exhausted") as err:
        _release(store, max_epsilon=after * 0.999)
    assert "2 releases" in str(err.value)
    assert store.calls == ["load"]
    assert store.state == LocalDpState(releases=2, noise_multiplier=2.0)
    # Just above ε after the release, and exactly at it: allowed (the budget is inclusive).
    assert _release(_Store(releases=2), max_epsilon=after * 1.001).releases == 3
    exact = _release(_Store(releases=2)).epsilon
    assert _release(_Store(releases=2), max_epsilon=exact).releases == 3


def test_lost_state_is_a_refusal_before_anything_is_spent() -> None:
    store = _Store(fail=True)
    with pytest.raises(PrivacyRefusal, match=r"^local DP state: the state file was lost"):
        _release(store)
    assert store.calls == ["load"]


def test_a_site_ledger_refusal_stops_the_save() -> None:
    store = _Store()

    def site_refuses(eps: float, spent_before: bool) -> None:
        raise RuntimeError("site budget")

    with pytest.raises(RuntimeError, match="site budget"):
        _release(store, account_site=site_refuses)
    assert store.calls == ["load"]
    assert store.state is None


_BAD_COUNTS: list[object] = [-1, 1.0, True, "2", None]


@pytest.mark.parametrize("i", range(len(_BAD_COUNTS)))
def test_releases_seen_must_be_a_non_negative_int(i: int) -> None:
    with pytest.raises(PrivacyRefusal, match="'k' must be an integer >= 0"):
        releases_seen(_BAD_COUNTS[i], "k")


def test_releases_seen_passes_a_valid_count() -> None:
    assert releases_seen(0, "k") == 0
    assert releases_seen(5, "k") == 5


def test_noise_is_added_in_float64_and_cast_back() -> None:
    update: dict[str, np.ndarray] = {
        "w": np.ones((2, 3), dtype=np.float32),
        "b": np.zeros(0, dtype=np.float64),
    }
    asked: list[tuple[float, int]] = []

    def normal(std: float, n: int) -> np.ndarray:
        asked.append((std, n))
        return np.arange(n, dtype=np.float64) * std

    out = add_gaussian_noise(update, 0.25, normal)
    assert asked == [(0.25, 6), (0.25, 0)]
    assert out["w"].dtype == np.float32 and out["w"].shape == (2, 3)
    np.testing.assert_array_equal(out["w"].ravel(), 1.0 + 0.25 * np.arange(6))
    assert out["b"].shape == (0,)


def test_noise_stage_draws_gaussian_noise_of_std_z_times_c() -> None:
    # 40,000 draws: the sample std of N(0, 1) has sd ~ 1/sqrt(2n) = 0.0035, so the
    # 3 % window is > 8 sd wide (false-failure rate < 1e-15).
    release = _release(_Store())
    noise = release.noise_stage()({"x": np.zeros(40_000, dtype=np.float64)})["x"]
    assert float(np.std(noise)) == pytest.approx(1.0, rel=0.03)
    assert abs(float(np.mean(noise))) < 0.03
    # A fresh key per stage: two stages never draw the same noise.
    other = release.noise_stage()({"x": np.zeros(8)})["x"]
    again = release.noise_stage()({"x": np.zeros(8)})["x"]
    assert not np.array_equal(other, again)
