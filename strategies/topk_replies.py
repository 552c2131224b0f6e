"""top-k replies scattered one by one before aggregation (docs/compression.md).

Under ``share.compression=topk`` each client sends its own support (``indices``) with
its values, so, unlike random-k's public mask, replies cannot be summed in the
compressed space: the driver scatters every parsed reply into the model's shape
first, and the aggregator (plain mean, central DP's clip and noise) sees full vectors as
it would uncompressed ones. A scattered vector's norm is its values' norm (indices are
refused if they repeat or fall outside the model), so a client-side clip to ``C``
still bounds each reply by ``C`` and central DP's sensitivity is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from fl_app.compression_topk import INDICES_KEY, TopK
from strategies.validation import (
    ArraySpec,
    Rejection,
    ReplyLimits,
    TrainReply,
    array_specs,
    parse_train_reply,
)

__all__ = ["TOPK_UNNORMED", "parse_reply", "reply_spec", "scatter_reply"]

# What parse_train_reply leaves out of a top-k reply's norm: its positions.
TOPK_UNNORMED = frozenset({INDICES_KEY})


def scatter_reply(
    topk: TopK | None, parsed: TrainReply | Rejection, model: Mapping[str, np.ndarray]
) -> TrainReply | Rejection:
    """``parsed`` with its update in ``model``'s shape, or a rejection naming why not
    (``topk`` None: no top-k this run, ``parsed`` unchanged)."""
    if topk is None or isinstance(parsed, Rejection):
        return parsed
    try:
        full = topk.decompress(parsed.update, model)
    except ValueError as err:
        return Rejection(parsed.node_id, f"top-k update: {err}")
    return dataclasses.replace(parsed, update=full)


def reply_spec(
    topk: TopK | None, wire: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray]
) -> ArraySpec:
    """What a train reply must hold: ``wire`` (the model, or random-k's short vector),
    or top-k's ``(indices, values)`` of ``model``."""
    return array_specs(wire if topk is None else topk.wire_template(model))


def parse_reply(
    topk: TopK | None,
    msg: Message,
    *,
    server_round: int,
    expected: ArraySpec,
    limits: ReplyLimits,
    reference: Mapping[str, np.ndarray] | None,
    model: Mapping[str, np.ndarray],
) -> TrainReply | Rejection:
    """:func:`~strategies.validation.parse_train_reply`, then, under top-k, the reply
    scattered into ``model``'s shape (its indices left out of the norm)."""
    parsed = parse_train_reply(
        msg,
        server_round=server_round,
        expected=expected,
        limits=limits,
        reference=reference,
        unnormed=TOPK_UNNORMED if topk is not None else frozenset(),
    )
    return scatter_reply(topk, parsed, model)
