"""How the round driver turns an aggregate into the next model (:mod:`strategies.driver`).

The driver hands the strategy one pre-aggregated reply carrying ``w + mean`` and
``Σ n_i``, so its server-side step (replacement for FedAvg, Adam for FedAdam) runs
unchanged; a round with too few updates or no sum at all keeps the model or, under
client-level DP whose ledger recorded the round, releases the mechanism over what
arrived (docs/privacy-branches.md). A mixin of :class:`~strategies.driver.RoundDriver`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fl_app.compression import RandK
from fl_app.compression_sketch import CountSketch
from fl_app.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from fl_app.weights import from_array_record, to_array_record
from strategies.aggregation import apply_update
from strategies.driver_types import Arrays, DriverSettings, StageReport

if TYPE_CHECKING:  # the aggregators pull in the accountants (and torch through Opacus).
    from strategies.aggregators import Aggregate, UpdateAggregator

__all__ = ["RoundRelease"]

# The driver's logger: one name for every part of the round loop.
log = logging.getLogger("fl_app.driver")


class RoundRelease:
    """Apply a round's aggregate through the strategy, or say why the model stays."""

    settings: DriverSettings
    strategy: Strategy
    aggregator: UpdateAggregator
    _privacy_metrics: dict[str, float]
    compressor: RandK | CountSketch | None

    def _wire(self, rnd: int, arrays: Arrays) -> Arrays:
        """The shape of what a client sends this round (the short vector under random-k)."""
        return arrays if self.compressor is None else self.compressor.wire_template(rnd, arrays)

    def _scattered(self, rnd: int, mean: Aggregate, arrays: Arrays) -> Aggregate:
        """The aggregate (clipped and noised in the compressed space) in the model's shape;
        coordinates not sent this round get a zero update (docs/compression.md)."""
        if self.compressor is None:
            return mean
        full = self.compressor.decompress(rnd, mean.update, arrays)
        return dataclasses.replace(mean, update=full)

    def _noted_few(
        self, out: tuple[Arrays, StageReport, str, float], n: int, what: str
    ) -> tuple[Arrays, StageReport, str, float]:
        """Say so when a DP round released its noised sum over fewer than the minimum."""
        new_arrays, stage, note, norm = out
        if n < self.settings.min_train_replies and not note:
            note = (
                f"{what} (< min_train_replies={self.settings.min_train_replies}): released "
                "the noised sum of what arrived, as the ledger accounts"
            )
        return new_arrays, stage, note, norm

    def _without_sum(
        self,
        rnd: int,
        arrays: Arrays,
        stage: StageReport,
        t0: float,
        what: str,
        answered: Message | None,
    ) -> tuple[Arrays, StageReport, str, float]:
        """A round with no sum to release (empty cohort, no reply, secure round abandoned).

        The aggregator decides (docs/privacy-branches.md): central DP releases its noise on
        a zero sum, the same mechanism the ledger recorded; otherwise the model stays.
        """
        release = self.aggregator.release_without_sum(rnd, self._wire(rnd, arrays))
        if release is not None:
            release = self._scattered(rnd, release, arrays)
        if release is None:
            note = f"{what}: model unchanged"
            log.warning("round %d: %s", rnd, note)
            stage.seconds = time.perf_counter() - t0
            return arrays, stage, note, 0.0
        new_arrays, stage, note, norm = self._apply_mean(rnd, arrays, release, answered, stage, t0)
        if not note:
            note = f"{what}: released the mechanism's noise on an empty sum, as the ledger accounts"
            log.warning("round %d: %s", rnd, note)
        return new_arrays, stage, note, norm

    def _apply_mean(
        self,
        rnd: int,
        arrays: Arrays,
        mean: Aggregate,
        answered: Message | None,
        stage: StageReport,
        t0: float,
    ) -> tuple[Arrays, StageReport, str, float]:
        """Hand ``w + mean`` to the strategy as one pre-aggregated reply to ``answered``
        (``None``: nothing was sent this round; a message addressed to no node)."""
        self._privacy_metrics.update(mean.metrics)
        norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in mean.update.values())))
        candidate = apply_update(arrays, mean.update)
        # The strategy receives the cohort as one pre-aggregated reply (see module doc);
        # its weight only matters relative to other replies, and there are none (a zero
        # weight, noise over an empty cohort, would make the strategy divide by zero).
        content = RecordDict(
            {
                ARRAYS_KEY: to_array_record(candidate),
                METRICS_KEY: MetricRecord({NUM_EXAMPLES: float(mean.total_weight) or 1.0}),
            }
        )
        synthetic = (
            Message(content, reply_to=answered)
            if answered is not None
            else Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
        )
        agg_arrays, _ = self.strategy.aggregate_train(rnd, [synthetic])
        stage.seconds = time.perf_counter() - t0
        if agg_arrays is None:
            note = "strategy returned no aggregate: model unchanged"
            log.warning("round %d: %s", rnd, note)
            return arrays, stage, note, norm
        new_arrays = from_array_record(agg_arrays)
        for k, v in arrays.items():
            new_arrays[k] = new_arrays[k].astype(v.dtype, copy=False)
        return new_arrays, stage, "", norm

    def _too_few(
        self, rnd: int, arrays: Arrays, stage: StageReport, t0: float, what: str
    ) -> tuple[Arrays, StageReport, str, float]:
        """The round's result when fewer than ``min_train_replies`` updates arrived."""
        note = f"{what} (< min_train_replies={self.settings.min_train_replies}): model unchanged"
        log.warning("round %d: %s", rnd, note)
        stage.seconds = time.perf_counter() - t0
        return arrays, stage, note, 0.0
