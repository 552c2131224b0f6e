"""The round driver: fl-app's own round loop around a Flower Message-API strategy.

Flower's ``Strategy.start`` does one ``send_and_receive`` for train and one for
evaluate per round, with no place for a multi-stage exchange, per-stage timeouts or
ingestion checks. Secure aggregation needs all three, so the loop lives here and the
strategy is *wrapped and delegated to*:

* the strategy builds the train/evaluate instructions (``configure_train`` /
  ``configure_evaluate``: FedProx adds ``proximal-mu``, FedOpt remembers the current
  weights), but only ever sees the cohort the driver sampled with its own seeded
  sampler (:mod:`strategies.sampling`), through :class:`CohortGrid`;
* every reply is screened and parsed (:mod:`strategies.validation`); a malformed
  reply is rejected with a logged reason and the round goes on with the rest;
* the driver computes the weighted mean update Δ̄ of the accepted replies
  (:mod:`strategies.aggregation`) and hands the strategy one pre-aggregated reply
  carrying ``w + Δ̄`` and ``Σ n_i``, so its server-side step (replacement for FedAvg,
  Adam for FedAdam) runs unchanged; strategies that need individual updates
  (Krum, median) are deliberately not supported: they cannot work under secure
  aggregation or clipping-based DP;
* a round with fewer than ``min_train_replies`` valid replies leaves the model
  unchanged and says so in its :class:`RoundReport`, except under client-level DP
  whose ledger recorded the round before it ran: such a round always releases the
  mechanism over what arrived, noise on an empty sum included (the aggregator's
  ``releases_every_round`` / ``release_without_sum``; every branch is tabled in
  docs/privacy-branches.md).

One round (``run`` + ``run_round``): aggregator's ``begin_round`` (ledger) → sample →
aggregator's ``note_cohort`` → ``round_begin_hooks`` (persist the ledger before anything
is sent) → train
exchange → screen/parse → aggregate → strategy step → ``release_hooks`` (checkpoint
files: the new model is saved before it first leaves the server) → federated evaluation
(every ``federated_eval_every`` rounds) → centralised evaluation → listeners (metrics
file, progress line, ledger, audit).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.compression import RandK
from fl_app.compression_sketch import CountSketch
from fl_app.compression_topk import TopK
from fl_app.protocol import (
    BUDGET_EXHAUSTED,
    CLIP_NORM_KEY,
    PUBLIC_METRIC_PREFIX,
    SERVER_ROUND,
    UNCLIPPED_KEY,
)
from fl_app.weights import to_array_record
from strategies.bandwidth import stage_bytes
from strategies.cohort_grid import CohortGrid
from strategies.driver_types import (
    Arrays,
    DriverResult,
    DriverSettings,
    RoundListener,
    RoundReport,
    StageReport,
)
from strategies.exchange import ReplyExchange
from strategies.round_release import RoundRelease
from strategies.sampling import CohortSampler
from strategies.site_claims import SiteClaims
from strategies.site_eval import site_accuracies
from strategies.topk_replies import parse_reply, reply_spec
from strategies.validation import (
    Rejection,
    TrainReply,
    parse_eval_reply,
)

if TYPE_CHECKING:  # the DP aggregators pull in the accountants (and torch through
    # Opacus); the driver module itself stays importable by torch-free ClientApp processes.
    from strategies.aggregators import UpdateAggregator
    from strategies.dpsgd_forecast import DpSgdForecast
    from strategies.secagg import SecAggOutcome, SecureAggregation

__all__ = ["EvaluateFn", "ReleaseHook", "RoundBeginHook", "RoundDriver"]

log = logging.getLogger("fl_app.driver")

EvaluateFn = Callable[[int, Mapping[str, np.ndarray]], Mapping[str, float]]
RoundBeginHook = Callable[[int], None]
ReleaseHook = Callable[[int, Mapping[str, np.ndarray], StageReport], None]


def _public_client_metrics(accepted: Sequence[TrainReply]) -> dict[int, dict[str, float]]:
    """Each accepted reply's public (``dp-``) metrics, for replies that carry any."""
    return {
        r.node_id: {k: v for k, v in r.metrics.items() if k.startswith(PUBLIC_METRIC_PREFIX)}
        for r in accepted
        if any(k.startswith(PUBLIC_METRIC_PREFIX) for k in r.metrics)
    }


class RoundDriver(ReplyExchange, RoundRelease):
    """Owns the round loop; delegates instruction building and the server step.

    Parameters
    ----------
    strategy
        A Flower Message-API strategy built with ``fraction_train=1`` and no node
        minimums (see :func:`strategies.factory.build_strategy`): sampling is ours.
    train_sampler, evaluate_sampler
        Cohort samplers (``evaluate_sampler=None`` disables federated evaluation).
    settings
        Timeouts, minimums, ingestion limits.
    train_config, evaluate_config
        Scalars sent to clients in every instruction's ``config`` record.
    evaluate_fn
        Centralised evaluation ``(round, arrays) -> metrics``; round 0 is the
        initial model.
    listeners
        Called after every round with its report and the new global arrays.
    node_config_fn
        Extra per-node scalars added to that node's instruction ``config`` (e.g. the
        privacy steps the server has seen it spend, so a client whose state file was
        lost cannot restart its accounting from zero).
    aggregator
        Turns the accepted replies into the update to apply (default: the exact
        weighted mean; :mod:`strategies.dp_aggregators` and :mod:`strategies.local_dp`
        compose clipping, noise, a ledger and a budget that can stop the run before a
        round).
    secagg
        Secure aggregation (:mod:`strategies.secagg`): the train stage becomes the
        four-stage masked-sum protocol and the aggregator sees only sums
        (``aggregate_sum``). ``None``: plain train stage.
    round_begin_hooks
        Called with the round number after the aggregator recorded the round and
        before any instruction is sent (the privacy ledger is persisted here).
    release_hooks
        Called with ``(round, new arrays, train stage)`` after the train stage and
        before federated evaluation, i.e. before the round's model first leaves the
        server (checkpoint files are written here, so a resumed run knows whether a
        round it redoes may have been seen).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        train_sampler: CohortSampler,
        evaluate_sampler: CohortSampler | None,
        settings: DriverSettings,
        train_config: Mapping[str, Any] | None = None,
        evaluate_config: Mapping[str, Any] | None = None,
        evaluate_fn: EvaluateFn | None = None,
        listeners: Sequence[RoundListener] = (),
        node_config_fn: Callable[[int], Mapping[str, Any]] | None = None,
        aggregator: UpdateAggregator | None = None,
        secagg: SecureAggregation | None = None,
        round_begin_hooks: Sequence[RoundBeginHook] = (),
        release_hooks: Sequence[ReleaseHook] = (),
    ) -> None:
        if aggregator is None:
            from strategies.aggregators import MeanAggregator

            aggregator = MeanAggregator()
        self.strategy = strategy
        self.aggregator: UpdateAggregator = aggregator
        self.secagg = secagg
        self.node_config_fn = node_config_fn
        self._result: DriverResult | None = None
        self.train_sampler = train_sampler
        self.evaluate_sampler = evaluate_sampler
        self.settings = settings
        self.train_config = dict(train_config or {})
        self.evaluate_config = dict(evaluate_config or {})
        self.evaluate_fn = evaluate_fn
        self.listeners = list(listeners)
        self.round_begin_hooks = list(round_begin_hooks)
        self.release_hooks = list(release_hooks)
        self._privacy_metrics: dict[str, float] = {}
        # Forecasts DP-SGD budget refusals from clients' public metrics (set by the
        # ServerApp when privacy.dpsgd.max_epsilon is set; strategies.dpsgd_forecast).
        self.budget_forecast: DpSgdForecast | None = None
        # One node per site identity presented in the run (strategies.site_claims).
        self.site_claims = SiteClaims()
        self._connected: frozenset[int] = frozenset()
        # share.compression=randk or sketch (set by the ServerApp): replies and secure sums
        # are the round's short vectors (or sketches), scattered (or unsketched) into the
        # model after aggregation.
        self.compressor: RandK | CountSketch | None = None
        # share.compression=topk (set by the ServerApp): each reply is (indices, values),
        # scattered into the model's shape before aggregation (strategies.topk_replies).
        self.sparse: TopK | None = None
        if secagg is not None:
            secagg.public_check = self._check_site

    @property
    def result(self) -> DriverResult | None:
        """The result :meth:`run` is building (``None`` before it starts)."""
        return self._result

    # ------------------------------------------------------------------ loop
    def run(
        self, grid: Grid, initial_arrays: Mapping[str, np.ndarray], *, start_round: int = 1
    ) -> DriverResult:
        t0 = time.perf_counter()
        arrays: Arrays = {k: np.asarray(v) for k, v in initial_arrays.items()}
        result = DriverResult(arrays=arrays, reports=[])
        if self.evaluate_fn is not None:
            result.initial_server_metrics = dict(self.evaluate_fn(start_round - 1, arrays))
        self._result = result
        for rnd in range(start_round, self.settings.num_rounds + 1):
            usable = self._usable_nodes(grid)
            out_of_budget = self._budget_stop(rnd, usable, result)
            if out_of_budget:
                result.stopped_early = out_of_budget
                log.warning("%s", result.stopped_early)
                break
            stop = self.aggregator.begin_round(rnd, len(usable))
            if stop:
                result.stopped_early = f"before round {rnd}: {stop}"
                log.warning("%s", result.stopped_early)
                break
            arrays, report = self.run_round(grid, rnd, arrays, node_ids=usable)
            result.reports.append(report)
            result.exhausted.update(report.train.exhausted)
            result.contested_sites = self.site_claims.contested()
            for node, metrics in report.train.client_metrics.items():
                result.client_metrics[node] = dict(metrics)
            for listener in self.listeners:
                listener.on_round_end(report, arrays)
        result.arrays = arrays
        result.seconds = time.perf_counter() - t0
        return result

    def run_round(
        self, grid: Grid, rnd: int, arrays: Arrays, *, node_ids: list[int] | None = None
    ) -> tuple[Arrays, RoundReport]:
        """One round over ``node_ids`` (default: connected nodes with budget left)."""
        t0 = time.perf_counter()
        if node_ids is None:
            node_ids = self._usable_nodes(grid)
        new_arrays, train, note, norm = self._train_stage(grid, rnd, arrays, node_ids)
        updated = new_arrays is not arrays
        arrays = new_arrays
        for hook in self.release_hooks:
            hook(rnd, arrays, train)
        evaluate = None
        every = self.settings.federated_eval_every
        if self.evaluate_sampler is not None and every > 0 and rnd % every == 0:
            evaluate = self._evaluate_stage(grid, rnd, arrays, node_ids)
        server_metrics = dict(self.evaluate_fn(rnd, arrays)) if self.evaluate_fn else {}
        privacy = dict(self._privacy_metrics)
        privacy.update(self.aggregator.status())
        report = RoundReport(
            server_round=rnd,
            train=train,
            evaluate=evaluate,
            model_updated=updated,
            note=note,
            server_metrics=server_metrics,
            seconds=time.perf_counter() - t0,
            update_norm=norm,
            privacy=privacy,
        )
        return arrays, report

    # ---------------------------------------------------------------- stages
    def _train_stage(
        self, grid: Grid, rnd: int, arrays: Arrays, node_ids: list[int]
    ) -> tuple[Arrays, StageReport, str, float]:
        t0 = time.perf_counter()
        self._privacy_metrics = {}
        # A site identity's holder keeps it while connected (strategies.site_claims).
        self._connected = frozenset(int(n) for n in grid.get_node_ids())
        cohort = self.train_sampler.sample(node_ids, rnd)
        stage = StageReport(sampled=len(cohort))
        # The cohort counts towards ε against the server, and the ledger is persisted,
        # before any instruction leaves.
        self.aggregator.note_cohort(rnd, cohort)
        for hook in self.round_begin_hooks:
            hook(rnd)
        if not cohort:
            return self._without_sum(rnd, arrays, stage, t0, "empty cohort sampled", None)
        config = ConfigRecord(
            {**self.train_config, **self.aggregator.round_config(rnd), SERVER_ROUND: rnd}
        )
        messages = self.strategy.configure_train(
            rnd, to_array_record(arrays), config, CohortGrid(grid, cohort)
        )
        if self.secagg is not None:
            return self._secure_train_stage(grid, rnd, arrays, list(messages), config, stage, t0)
        sent_msgs, replies, sent = self._exchange(
            grid, messages, rnd, self.settings.train_timeout_s
        )
        self._privacy_metrics = stage_bytes(sent_msgs, replies, len(cohort))
        expected = reply_spec(self.sparse, self._wire(rnd, arrays), arrays)
        accepted, failed = self._ingest(
            "train",
            rnd,
            stage,
            replies,
            sent,
            lambda m: self._check_train_reply(
                parse_reply(
                    self.sparse,
                    m,
                    server_round=rnd,
                    expected=expected,
                    limits=self.settings.limits,
                    reference=arrays if self.settings.replies_are_weights else None,
                    model=arrays,
                )
            ),
        )
        stage.exhausted = [r.node_id for r in failed if r.code == BUDGET_EXHAUSTED]
        stage.client_metrics = _public_client_metrics(accepted)

        too_few = f"only {len(accepted)} valid train replies"
        if len(accepted) < self.settings.min_train_replies:
            if not self.aggregator.releases_every_round:
                return self._too_few(rnd, arrays, stage, t0, too_few)
            if not accepted:
                first = sent_msgs[0] if sent_msgs else None
                return self._without_sum(rnd, arrays, stage, t0, too_few, first)
        mean = self._scattered(rnd, self.aggregator.aggregate(rnd, accepted), arrays)
        out = self._apply_mean(rnd, arrays, mean, sent_msgs[0], stage, t0)
        return self._noted_few(out, len(accepted), too_few)

    def _secure_train_stage(
        self,
        grid: Grid,
        rnd: int,
        arrays: Arrays,
        messages: list[Message],
        config: ConfigRecord,
        stage: StageReport,
        t0: float,
    ) -> tuple[Arrays, StageReport, str, float]:
        """The train stage as secure aggregation (:mod:`strategies.secagg`): sums only."""
        assert self.secagg is not None
        try:
            run_id = int(grid.run.run_id)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            run_id = 0
        outcome = self.secagg.run_round(
            rnd=rnd,
            run_id=run_id,
            instructions=messages,
            arrays=self._wire(rnd, arrays),
            weighting=self.aggregator.weighting,
            bound=self.secagg.encoding_bound(dict(config), CLIP_NORM_KEY),
            exchange=lambda msgs, timeout: self._exchange(grid, msgs, rnd, timeout),
            last_round=self.settings.num_rounds,
            next_cohort=lambda exhausted: self._next_cohort(grid, rnd, exhausted),
        )
        self._fill_secure_stage(stage, outcome)
        self._privacy_metrics = outcome.metrics()
        decoded = outcome.decoded
        answered = outcome.masked_input_sent[0] if outcome.masked_input_sent else None
        if decoded is None:
            what = outcome.note.removesuffix(": model unchanged") or "secure round abandoned"
            return self._without_sum(rnd, arrays, stage, t0, what, answered)
        n = outcome.num_contributors
        too_few = f"only {n} inputs in the secure sum"
        if n < self.settings.min_train_replies and not self.aggregator.releases_every_round:
            return self._too_few(rnd, arrays, stage, t0, too_few)
        if decoded.weight > 0 and math.isfinite(decoded.loss):  # none under distributed DP
            stage.metrics = {
                "train-loss": decoded.loss / decoded.weight,
                "train-accuracy": decoded.accuracy / decoded.weight,
            }
        mean = self.aggregator.aggregate_sum(
            rnd, decoded.update, decoded.weight, n, {UNCLIPPED_KEY: decoded.unclipped}
        )
        mean = self._scattered(rnd, mean, arrays)
        out = self._apply_mean(rnd, arrays, mean, answered, stage, t0)
        return self._noted_few(out, n, too_few)

    @staticmethod
    def _fill_secure_stage(stage: StageReport, outcome: SecAggOutcome) -> None:
        stage.accepted = outcome.num_contributors
        stage.missing = len(outcome.missing)
        stage.replied = stage.sampled - stage.missing
        stage.rejected = [(r.node_id, r.reason) for r in outcome.rejected]
        stage.failed = [(r.node_id, r.reason) for r in outcome.failed]
        stage.exhausted = sorted({r.node_id for r in outcome.failed if r.code == BUDGET_EXHAUSTED})
        stage.client_metrics = {n: dict(m) for n, m in outcome.client_metrics.items()}

    def _evaluate_stage(
        self, grid: Grid, rnd: int, arrays: Arrays, node_ids: list[int]
    ) -> StageReport:
        assert self.evaluate_sampler is not None
        t0 = time.perf_counter()
        cohort = self.evaluate_sampler.sample(node_ids, rnd)
        stage = StageReport(sampled=len(cohort))
        if not cohort:
            return stage
        config = ConfigRecord({**self.evaluate_config, SERVER_ROUND: rnd})
        messages = self.strategy.configure_evaluate(
            rnd, to_array_record(arrays), config, CohortGrid(grid, cohort)
        )
        _, replies, sent = self._exchange(grid, messages, rnd, self.settings.evaluate_timeout_s)
        accepted, _ = self._ingest(
            "evaluate",
            rnd,
            stage,
            replies,
            sent,
            lambda m: parse_eval_reply(m, server_round=rnd, limits=self.settings.limits),
        )
        stage.client_eval = site_accuracies(accepted, rnd)
        stage.seconds = time.perf_counter() - t0
        return stage

    # --------------------------------------------------------------- helpers
    def _check_site(self, node_id: int, metrics: Mapping[str, float]) -> str | None:
        """One node per site identity (:class:`~strategies.site_claims.SiteClaims`)."""
        return self.site_claims.check(node_id, metrics, self._connected)

    def _check_train_reply(self, parsed: TrainReply | Rejection) -> TrainReply | Rejection:
        if isinstance(parsed, Rejection):
            return parsed
        # The site check first: a reply refused for its site identity is not that site's
        # release, so it must not move the site's local-DP count (one forged reply would
        # put a victim's count ahead of its own for good).
        reason = self._check_site(parsed.node_id, parsed.metrics) or self.aggregator.check_reply(
            parsed
        )
        return parsed if reason is None else Rejection(parsed.node_id, reason)

    def _next_cohort(self, grid: Grid, rnd: int, exhausted_now: set[int]) -> list[int] | None:
        """The cohort round ``rnd + 1`` will sample if no node comes or goes meanwhile.

        Samplers draw from a generator of ``(seed, round)``, so sampling ahead changes
        nothing: round ``rnd + 1`` samples again and secure aggregation uses what it
        prepared only if both agree. ``exhausted_now``: nodes that ran out of privacy
        budget in round ``rnd`` (the driver excludes them from then on).
        """
        if rnd >= self.settings.num_rounds:
            return None
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) < self.settings.min_available_nodes:
            return None
        return self.train_sampler.sample(self._with_budget(nodes, exhausted_now), rnd + 1)

    def _budget_stop(self, rnd: int, usable: list[int], result: DriverResult) -> str | None:
        """Why the run stops before round ``rnd`` for lack of privacy budget, or None.

        It stops when fewer than ``min_train_replies`` usable clients could train the
        round: besides those that already refused for budget, those whose reported
        DP-SGD spend shows this round would take them past the budget (they would
        refuse it, and the round would be spent for nothing; ``budget_forecast``).
        """
        need = self.settings.min_train_replies
        forecast = self.budget_forecast
        refusing = (
            set() if forecast is None else forecast.refusing(usable, result.client_metrics, need)
        )
        willing = len(usable) - len(refusing)
        if not (result.exhausted or refusing) or willing >= need:
            return None
        result.exhausted.update(refusing)
        projected = (
            f", {len(refusing)} of them because their reported DP-SGD epsilon would pass "
            "privacy.dpsgd.max_epsilon in this round"
            if refusing
            else ""
        )
        return (
            f"before round {rnd}: only {willing} clients have privacy budget left "
            f"({len(result.exhausted)} exhausted{projected}; min_train_replies={need}); "
            "stopping with the model of the last completed round"
        )

    def _usable_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes, minus those whose privacy budget is exhausted."""
        return self._with_budget(self._wait_for_nodes(grid))

    def _with_budget(
        self, nodes: list[int], also_exhausted: AbstractSet[int] = frozenset()
    ) -> list[int]:
        """``nodes`` minus the run's exhausted ones (and ``also_exhausted``)."""
        exhausted = self._result.exhausted if self._result is not None else set()
        return [n for n in nodes if n not in exhausted and n not in also_exhausted]
