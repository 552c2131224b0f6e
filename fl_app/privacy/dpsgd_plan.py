"""One client's DP-SGD round, planned and accounted before it trains.

Record-level DP (``privacy.record_level=true``): every client runs Opacus DP-SGD
(:mod:`fl_app.privacy.dpsgd`) with Poisson sampling at rate ``q = batch_size / n`` for
the steps :func:`~fl_app.privacy.dpsgd.planned_steps` gives, and accounts its own ε
over its own history of :class:`~fl_app.privacy.history.DpSgdEvent` (Abadi et al.
2016; PRV/RDP/PLD accountants). This module decides, before any step is taken:

1. the round's steps and ``q`` from the client's own record count;
2. the noise multiplier: given, or calibrated once from ``target_epsilon`` for every
   planned round (``steps · num_rounds``) and then kept fixed in the state;
3. ε after this round, projected on the persisted history; past ``max_epsilon`` the
   client refuses (:class:`~fl_app.privacy.refusal.BudgetRefusal`);
4. the new history, saved *before* training, so a crash mid-round over-counts at
   worst, never under-counts.

Trust assumptions: the history lives on the site's disk
(:class:`~fl_app.privacy.state.ClientPrivacyState`), and a server that saw more steps
(or rounds) than it records makes the client refuse; noise and batches come from the
client's own keys unless the site opted in to seeded noise (checked by the handler,
which owns the site policy). No Flower imports: the ClientApp handler
(:mod:`fl_app.client.dp_stages`) opens the store and calls :func:`plan_round`, then
:func:`train_round`. :func:`project_sizes` does the same arithmetic before round 1 for
every institution whose data the simulation can size (the dry run and budget check).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal

if TYPE_CHECKING:
    import numpy as np

    from fl_app.config.schema import ClientTrainConfig, DpSgdConfig
    from fl_app.privacy.dpsgd_settings import DpSgdSettings
    from fl_app.privacy.history import DpSgdEvent
    from fl_app.privacy.state import DpSgdState
    from fl_app.training import TrainStats

__all__ = [
    "DpSgdRound",
    "HistoryStore",
    "fresh_epsilon",
    "plan_round",
    "project_sizes",
    "train_round",
]

log = logging.getLogger("fl_app.client")


class HistoryStore(Protocol):
    """Where a client keeps its DP-SGD history
    (:class:`~fl_app.privacy.state.ClientPrivacyState`)."""

    def load(self, steps_seen_by_server: int = 0) -> DpSgdState:
        """The state so far; raises ``PrivacyStateError`` if it was lost or disagrees."""
        ...

    def save(self, state: DpSgdState) -> None:
        """Persist ``state`` (file first, then memory)."""
        ...


@dataclass(frozen=True)
class DpSgdRound:
    """This round's DP-SGD, accounted and persisted: train exactly this."""

    settings: DpSgdSettings
    #: Steps this round takes (every round takes the same number).
    steps: int
    #: Poisson sampling rate ``q`` of every step.
    sample_rate: float
    #: ε after this round (the whole history, this round included).
    epsilon: float
    delta: float
    #: Steps in the history after this round.
    total_steps: int

    def public_metrics(self, partition_id: int) -> dict[str, float]:
        """The round's DP numbers for the reply (the handler drops the ones a hidden-
        metrics threat model keeps from the server: steps, ``q`` and ``z`` give the
        site's record count to within a batch)."""
        return {
            "dp-epsilon": float(self.epsilon),
            "dp-delta": float(self.delta),
            "dp-steps": int(self.total_steps),
            "dp-rounds": int(self.total_steps // self.steps),
            "dp-sample-rate": float(self.sample_rate),
            "dp-noise-multiplier": float(self.settings.noise_multiplier),
            "dp-partition-id": int(partition_id),
        }


def _count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyRefusal(f"'{key}' must be an integer >= 0, got {value!r}")
    return value


def plan_round(
    dp: DpSgdConfig,
    open_store: Callable[[], HistoryStore],
    *,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    secure_mode: bool,
    steps_seen: object,
    rounds_seen: object,
    account_site: Callable[[float, bool], None],
) -> DpSgdRound:
    """Plan, account, check the budget and persist this round, before training.

    Parameters
    ----------
    dp
        The run's DP-SGD settings (from the server's spec).
    open_store
        Opens this client's :class:`HistoryStore` (its errors are refusals too).
    num_examples, batch_size, local_epochs
        The client's training-set size and the round's batch size and epochs.
    num_rounds
        The run's planned rounds (target-ε calibration spreads over all of them).
    steps_seen, rounds_seen
        What the server saw this client spend, from the instruction (checked here):
        steps where it may see them, or rounds trained (under secure aggregation and
        local DP, which hide the steps). Every round takes the same planned steps, so
        ``rounds · steps`` is a lower bound on the history too.
    account_site
        ``account_site(ε, spent_before)``: the site's own budget check and ledger,
        called after this run's budget check and before the state is saved.

    Raises
    ------
    PrivacyRefusal
        Bad counts from the server, lost or disagreeing state, no trustworthy ε (never
        run unaccounted steps); :class:`BudgetRefusal` past ``dp.max_epsilon``.
    """
    from fl_app.privacy.dpsgd import planned_steps
    from fl_app.privacy.dpsgd_settings import DpSgdSettings, GradSampleMode
    from fl_app.privacy.state import ROUNDS_SEEN_KEY, STEPS_SEEN_KEY, DpSgdState

    steps, q = planned_steps(num_examples, batch_size, local_epochs)
    seen = _count(STEPS_SEEN_KEY, steps_seen)
    rounds = _count(ROUNDS_SEEN_KEY, rounds_seen)
    store, state = _load_state(open_store, max(seen, rounds * steps))
    z, planned, eps_after = _project(dp, state, q, steps, num_rounds)
    _check_budget(dp, state, eps_after)
    account_site(eps_after, state.history.total_steps > 0)
    new_state = DpSgdState(history=state.history.add(planned), noise_multiplier=z)
    store.save(new_state)  # before training: a crash mid-round never under-counts
    settings = DpSgdSettings(
        noise_multiplier=z,
        max_grad_norm=dp.max_grad_norm,
        grad_sample_mode=GradSampleMode(dp.grad_sample_mode.value),
        secure_mode=secure_mode,
    )
    return DpSgdRound(
        settings=settings,
        steps=steps,
        sample_rate=q,
        epsilon=eps_after,
        delta=dp.delta,
        total_steps=new_state.history.total_steps,
    )


def _load_state(
    open_store: Callable[[], HistoryStore], steps_seen_by_server: int
) -> tuple[HistoryStore, DpSgdState]:
    """Open the client's store and load its state; a store error is a refusal."""
    from fl_app.privacy.state import PrivacyStateError

    try:
        store = open_store()
        state = store.load(steps_seen_by_server=steps_seen_by_server)
    except PrivacyStateError as err:
        raise PrivacyRefusal(f"privacy state: {err}") from err
    return store, state


def _project(
    dp: DpSgdConfig, state: DpSgdState, q: float, steps: int, num_rounds: int
) -> tuple[float, DpSgdEvent, float]:
    """This round's ``z`` (stored, configured or calibrated), its event and ε after it."""
    from fl_app.privacy.accounting import project_epsilon
    from fl_app.privacy.calibration import calibrate_noise_multiplier
    from fl_app.privacy.history import AccountantName, AccountingError, DpSgdEvent

    accountant = AccountantName(dp.accountant.value)
    z = state.noise_multiplier
    try:
        if z is None:
            if dp.noise_multiplier is not None:
                z = float(dp.noise_multiplier)
            else:
                assert dp.target_epsilon is not None
                # Calibrated once for every planned round, then kept fixed (stored in state).
                z = calibrate_noise_multiplier(
                    dp.target_epsilon, dp.delta, q, steps * num_rounds, accountant
                )
        planned = DpSgdEvent(noise_multiplier=z, sample_rate=q, steps=steps)
        eps_after = project_epsilon(state.history, planned, dp.delta, accountant)
    except (AccountingError, ValueError) as err:
        # No trustworthy epsilon means no training: never run unaccounted steps.
        raise PrivacyRefusal(f"privacy accounting: {err}") from err
    return z, planned, eps_after


def _check_budget(dp: DpSgdConfig, state: DpSgdState, eps_after: float) -> None:
    """Refuse the round (:class:`BudgetRefusal`) when ε after it exceeds ``max_epsilon``."""
    if dp.max_epsilon is not None and eps_after > dp.max_epsilon:
        # The steps stay in the site's own log: with the public batch size and epochs
        # they give the record count, which the threat model may hide from the server.
        log.warning(
            "DP-SGD budget exhausted: %d steps spent, epsilon would reach %.4g",
            state.history.total_steps,
            eps_after,
        )
        raise BudgetRefusal(
            f"privacy budget exhausted: epsilon would reach {eps_after:.4g} after this round "
            f"(budget {dp.max_epsilon:g}, delta {dp.delta:g})"
        )


def train_round(
    plan: DpSgdRound,
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    train: ClientTrainConfig,
    generator: Any,
) -> TrainStats:
    """Train ``model`` in place with the planned DP-SGD; refuse a step count that
    differs from the one accounted (an Opacus change would otherwise spend unaccounted
    steps, or claim steps it did not take)."""
    from fl_app.privacy.dpsgd import train_dpsgd

    _, result = train_dpsgd(model, x, y, train, plan.settings, generator=generator)
    if result.steps != plan.steps:
        # The counts stay in the site's log: an error text may reach the server.
        log.error("DP-SGD took %d steps, accounted %d", result.steps, plan.steps)
        raise RuntimeError("DP-SGD took a different number of steps than it accounted")
    return result.stats


@functools.lru_cache(maxsize=64)
def fresh_epsilon(z: float, q: float, steps: int, delta: float, accountant: str) -> float:
    """ε of ``steps`` DP-SGD steps from an empty history (cached: a sweep's jobs and
    equal-sized institutions ask for the same numbers)."""
    from fl_app.privacy.accounting import epsilon
    from fl_app.privacy.history import AccountantName, DpSgdEvent, PrivacyHistory

    history = PrivacyHistory().add(DpSgdEvent(noise_multiplier=z, sample_rate=q, steps=steps))
    return epsilon(history, delta, AccountantName(accountant))


def project_sizes(
    sizes: Iterable[int],
    *,
    noise_multiplier: float,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    delta: float,
    accountant: str,
) -> tuple[float, float]:
    """The largest ε over institutions with these training-set sizes, after round 1 and
    after every planned round: the arithmetic of :func:`plan_round` (each client's own
    ``q`` and steps from its record count), done before round 1 by whoever can size the
    data (the simulation's dry run and budget check). A size that takes no step spends
    nothing."""
    from fl_app.privacy.dpsgd import planned_steps

    z = float(noise_multiplier)
    first = planned = 0.0
    for size in sorted(set(sizes)):  # equal sizes spend equally: account each once
        steps, q = planned_steps(size, batch_size, local_epochs)
        if steps == 0:
            continue
        first = max(first, fresh_epsilon(z, q, steps, delta, accountant))
        planned = max(planned, fresh_epsilon(z, q, steps * num_rounds, delta, accountant))
    return first, planned
