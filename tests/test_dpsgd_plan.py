"""A client's DP-SGD round planned as a unit (fl_app.privacy.dpsgd_plan).

Expected ε is composed independently with dp-accounting's RDP accountant:
SelfComposed(PoissonSampled(q, Gaussian(z)), steps) per round, with ``q`` and the
steps worked out by hand from the record count (Opacus' Poisson loader: q = batch / n,
ceil(n / batch) steps per epoch). The code's RDP backend is Opacus', whose orders
differ slightly (measured 7e-5 relative here), hence rel=1e-3.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fl_app.config.schema import Accountant, ClientTrainConfig, DpSgdConfig, GradSampleModeName
from fl_app.privacy.dpsgd_plan import plan_round, project_sizes, train_round
from fl_app.privacy.dpsgd_settings import GradSampleMode
from fl_app.privacy.history import DpSgdEvent, PrivacyHistory
from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal
from fl_app.privacy.state import (
    ROUNDS_SEEN_KEY,
    STEPS_SEEN_KEY,
    DpSgdState,
    PrivacyStateError,
)

DELTA = 1e-5
# 1,000 records, batch 100, 2 local epochs: q = 0.1 and 2 * 10 = 20 steps a round.
N, BATCH, EPOCHS, Q, STEPS = 1000, 100, 2, 0.1, 20


def _rdp_epsilon(z: float, steps: int, q: float = Q) -> float:
    ref = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    ref.compose(event, steps)
    return float(ref.get_epsilon(DELTA))


class _Store:
    def __init__(self, state: DpSgdState | None = None, fail: bool = False) -> None:
        self.state = state or DpSgdState(history=PrivacyHistory())
        self.fail = fail
        self.calls: list[str] = []
        self.seen_arg: int | None = None
        self.site_epsilon: float | None = None

    def load(self, steps_seen_by_server: int = 0) -> DpSgdState:
        self.calls.append("load")
        self.seen_arg = steps_seen_by_server
        if self.fail:
            raise PrivacyStateError("the state file was lost")
        return self.state

    def save(self, state: DpSgdState) -> None:
        self.calls.append("save")
        self.state = state


def _plan(store: _Store, dp: DpSgdConfig, **kw: Any) -> Any:
    def account_site(eps: float, spent_before: bool) -> None:
        store.calls.append(f"site:{spent_before}")
        store.site_epsilon = eps

    args: dict[str, Any] = dict(
        num_examples=N,
        batch_size=BATCH,
        local_epochs=EPOCHS,
        num_rounds=3,
        secure_mode=True,
        steps_seen=0,
        rounds_seen=0,
        account_site=account_site,
    )
    args.update(kw)
    return plan_round(dp, lambda: store, **args)


def _dp(**kw: Any) -> DpSgdConfig:
    return DpSgdConfig(
        noise_multiplier=kw.pop("noise_multiplier", 1.1),
        delta=DELTA,
        accountant=Accountant.rdp,
        **kw,
    )


def test_first_round_is_planned_from_the_record_count_and_saved_before_training() -> None:
    store = _Store()
    plan = _plan(store, _dp())
    assert (plan.steps, plan.sample_rate, plan.total_steps) == (STEPS, Q, STEPS)
    assert plan.epsilon == pytest.approx(_rdp_epsilon(1.1, STEPS), rel=1e-3)
    assert plan.settings.noise_multiplier == 1.1 and plan.settings.secure_mode is True
    assert store.calls == ["load", "site:False", "save"]
    assert store.site_epsilon == plan.epsilon
    assert store.state.history.events == (DpSgdEvent(1.1, Q, STEPS),)
    assert store.state.noise_multiplier == 1.1
    assert plan.public_metrics(4) == {
        "dp-epsilon": plan.epsilon,
        "dp-delta": DELTA,
        "dp-steps": STEPS,
        "dp-rounds": 1,
        "dp-sample-rate": Q,
        "dp-noise-multiplier": 1.1,
        "dp-partition-id": 4,
    }


def test_the_training_settings_are_the_specs() -> None:
    # The site's opt-in to seeded noise, the clip norm and the per-sample engine reach
    # the trainer as asked (nothing silently replaced by a default).
    dp = _dp(max_grad_norm=0.7, grad_sample_mode=GradSampleModeName.ghost)
    plan = _plan(_Store(), dp, secure_mode=False)
    assert plan.settings.secure_mode is False
    assert plan.settings.max_grad_norm == 0.7
    assert plan.settings.grad_sample_mode is GradSampleMode.ghost


def test_later_round_composes_the_history_and_keeps_the_stored_z() -> None:
    # The stored z wins over the spec's: a run must not change its noise mid-way.
    history = PrivacyHistory((DpSgdEvent(1.3, Q, STEPS),))
    store = _Store(DpSgdState(history=history, noise_multiplier=1.3))
    plan = _plan(store, _dp(noise_multiplier=0.7), steps_seen=STEPS)
    assert plan.settings.noise_multiplier == 1.3
    assert plan.total_steps == 2 * STEPS
    assert plan.public_metrics(0)["dp-rounds"] == 2
    assert plan.epsilon == pytest.approx(_rdp_epsilon(1.3, 2 * STEPS), rel=1e-3)
    assert store.calls == ["load", "site:True", "save"]


def test_server_counts_bound_the_history_it_must_hold() -> None:
    # Rounds seen (secure aggregation hides the steps) count as rounds * steps.
    store = _Store()
    _plan(store, _dp(), steps_seen=5, rounds_seen=2)
    assert store.seen_arg == 2 * STEPS
    store = _Store()
    _plan(store, _dp(), steps_seen=3 * STEPS, rounds_seen=1)
    assert store.seen_arg == 3 * STEPS


def test_target_epsilon_calibrates_z_for_every_planned_round() -> None:
    target, rounds = 3.0, 3
    store = _Store()
    plan = _plan(store, _dp(noise_multiplier=None, target_epsilon=target), num_rounds=rounds)
    z = plan.settings.noise_multiplier
    # All planned rounds stay within the target, and not far below it (Opacus'
    # calibration tolerance is 0.01 in ε).
    all_rounds = _rdp_epsilon(z, rounds * STEPS)
    assert target - 0.05 < all_rounds <= target * 1.001
    assert store.state.noise_multiplier == z


def test_one_step_spent_before_counts_as_spent() -> None:
    # The site's ledger must learn the run already spent, even one step.
    store = _Store(DpSgdState(history=PrivacyHistory((DpSgdEvent(1.1, Q, 1),))))
    _plan(store, _dp())
    assert store.calls == ["load", "site:True", "save"]


def test_budget_refusal_spends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    after = _rdp_epsilon(1.1, STEPS)
    store = _Store()
    with (
        caplog.at_level(logging.WARNING, logger="fl_app.client"),
        pytest.raises(BudgetRefusal, match="privacy budget exhausted: epsilon would reach"),
    ):
        _plan(store, _dp(max_epsilon=after * 0.99))
    assert store.calls == ["load"]
    assert store.state.history.total_steps == 0
    # The steps stay in the site's own log (they give the record count), not the refusal.
    site_log = [r.getMessage() for r in caplog.records if r.name == "fl_app.client"]
    assert [m[:38] for m in site_log] == ["DP-SGD budget exhausted: 0 steps spent"]
    assert _plan(_Store(), _dp(max_epsilon=after * 1.01)).total_steps == STEPS
    # The budget is inclusive: reaching it exactly is allowed.
    exact = _plan(_Store(), _dp()).epsilon
    assert _plan(_Store(), _dp(max_epsilon=exact)).epsilon == exact


def test_lost_state_and_bad_accounting_are_refusals() -> None:
    store = _Store(fail=True)
    with pytest.raises(PrivacyRefusal, match=r"^privacy state: the state file was lost"):
        _plan(store, _dp())
    store = _Store()
    with pytest.raises(PrivacyRefusal, match=r"^privacy accounting: "):
        _plan(store, _dp(noise_multiplier=-1.0))
    assert store.calls == ["load"]


_BAD: list[tuple[str, str, object]] = [
    ("steps_seen", STEPS_SEEN_KEY, -1),
    ("steps_seen", STEPS_SEEN_KEY, True),
    ("rounds_seen", ROUNDS_SEEN_KEY, 1.5),
    ("rounds_seen", ROUNDS_SEEN_KEY, None),
]


@pytest.mark.parametrize("i", range(len(_BAD)))
def test_server_counts_must_be_non_negative_ints(i: int) -> None:
    arg, key, value = _BAD[i]
    store = _Store()
    with pytest.raises(PrivacyRefusal, match="must be an integer >= 0") as err:
        _plan(store, _dp(), **{arg: value})
    assert str(err.value).startswith(f"'{key}' ")
    assert store.calls == []


def _tiny_data() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 2)), x, y


def test_train_round_takes_exactly_the_planned_steps(caplog: pytest.LogCaptureFixture) -> None:
    # 40 records, batch 10, 1 epoch: q = 0.25 and 4 steps.
    model, x, y = _tiny_data()
    train = ClientTrainConfig(local_epochs=1, batch_size=10, lr=0.1, momentum=0.0)
    plan = _plan(_Store(), _dp(), num_examples=40, batch_size=10, local_epochs=1)
    assert (plan.steps, plan.sample_rate) == (4, 0.25)
    stats = train_round(plan, model, x, y, train, torch.Generator().manual_seed(0))
    assert stats.steps == 4 and stats.num_examples == 40
    # A step count other than the one accounted is refused, and only the site logs it.
    wrong = dataclasses.replace(plan, steps=5)
    with (
        caplog.at_level(logging.ERROR, logger="fl_app.client"),
        pytest.raises(RuntimeError, match="different number of steps than it accounted"),
    ):
        train_round(wrong, model, x, y, train, torch.Generator().manual_seed(0))
    site_log = [r.getMessage() for r in caplog.records if r.name == "fl_app.client"]
    assert site_log == ["DP-SGD took 4 steps, accounted 5"]


def test_projection_over_institutions_takes_the_largest_epsilon() -> None:
    # 1,000 records: q = 0.1, 20 steps a round; 200 records: q = 0.5, 2 * 2 = 4 steps.
    first, planned = project_sizes(
        [1000, 200, 1000],
        noise_multiplier=1.1,
        batch_size=100,
        local_epochs=2,
        num_rounds=3,
        delta=DELTA,
        accountant="rdp",
    )
    big_first, small_first = _rdp_epsilon(1.1, 20), _rdp_epsilon(1.1, 4, q=0.5)
    big_all, small_all = _rdp_epsilon(1.1, 60), _rdp_epsilon(1.1, 12, q=0.5)
    assert first == pytest.approx(max(big_first, small_first), rel=1e-3)
    assert planned == pytest.approx(max(big_all, small_all), rel=1e-3)
    # A partition with no training record takes no step and spends nothing; the others
    # still count.
    with_empty = project_sizes(
        [0, 1000],
        noise_multiplier=1.1,
        batch_size=100,
        local_epochs=2,
        num_rounds=3,
        delta=DELTA,
        accountant="rdp",
    )
    assert with_empty[0] == pytest.approx(big_first, rel=1e-3)
    none = project_sizes(
        [0],
        noise_multiplier=1.1,
        batch_size=100,
        local_epochs=2,
        num_rounds=3,
        delta=DELTA,
        accountant="rdp",
    )
    assert none == (0.0, 0.0)
