"""Ingestion checks on every client reply, before anything is aggregated.

A reply is untrusted input from another institution's process. Each one is parsed
into a typed value or a :class:`Rejection` carrying the reason; nothing here raises
on bad content, so one malformed reply can never abort a round.

Checks, in order: error reply; unknown or duplicate sender; reply to a message not
sent this round (stale); exact record keys and types; ``server-round`` equals the
current round; ``num-examples`` finite, positive and bounded; every metric a finite
scalar; the update has exactly the global model's array names, shapes and dtypes,
decodes, is finite, and its L2 norm is not absurd.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fl_app.protocol import (
    EVAL_REPLY_KEYS,
    METRICS_KEY,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_REPLY_KEYS,
    UPDATE_KEY,
)
from fl_app.weights import array_view

__all__ = [
    "ArraySpec",
    "EvalReply",
    "Rejection",
    "ReplyLimits",
    "ScreenResult",
    "TrainReply",
    "array_specs",
    "parse_eval_reply",
    "parse_train_reply",
    "screen_replies",
]

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds beyond which a reply is rejected as absurd."""

    max_update_norm: float = 1.0e4
    max_num_examples: int = 10_000_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError(
                f"max_update_norm must be finite and > 0, found {self.max_update_norm}"
            )
        if self.max_num_examples < 1:
            raise ValueError(f"max_num_examples must be >= 1, found {self.max_num_examples}")


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str
    # "error": the client itself replied with an error; "rejected": we refused it.
    kind: str = "rejected"
    # The client's error code, for kind="error".
    code: int | None = None


@dataclass(frozen=True)
class TrainReply:
    node_id: int
    update: dict[str, np.ndarray]
    num_examples: float
    metrics: dict[str, float]
    update_norm: float


@dataclass(frozen=True)
class EvalReply:
    node_id: int
    num_examples: float
    metrics: dict[str, float]


@dataclass
class ScreenResult:
    """The outcome of screening one stage's replies."""

    accepted: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failed: list[Rejection] = field(default_factory=list)


def array_specs(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The (shape, dtype) of every array a reply's update must match."""
    return {k: (tuple(int(s) for s in v.shape), str(v.dtype)) for k, v in arrays.items()}


def screen_replies(replies: Iterable[Message], sent: Mapping[str, int]) -> ScreenResult:
    """Sort replies into accepted / rejected / failed by sender and message id.

    Parameters
    ----------
    replies
        What the grid returned for this stage.
    sent
        ``message_id -> node_id`` of the instructions sent in this stage; a reply
        to anything else is stale or forged.
    """
    result = ScreenResult()
    seen: set[int] = set()
    expected_nodes = set(sent.values())
    for msg in replies:
        meta = msg.metadata
        node = int(meta.src_node_id)
        if node not in expected_nodes:
            result.rejected.append(Rejection(node, "reply from a node not sampled this round"))
            continue
        if meta.reply_to_message_id not in sent:
            result.rejected.append(Rejection(node, "stale reply: not an answer to this round"))
            continue
        if sent[meta.reply_to_message_id] != node:
            result.rejected.append(Rejection(node, "reply sender differs from the addressee"))
            continue
        if node in seen:
            result.rejected.append(Rejection(node, "duplicate reply from the same node"))
            continue
        seen.add(node)
        if msg.has_error():
            reason = f"client error (code {msg.error.code}): {msg.error.reason}"
            result.failed.append(
                Rejection(node, reason[:500], kind="error", code=int(msg.error.code))
            )
            continue
        result.accepted.append(msg)
    return result


def _check_records(msg: Message, keys: frozenset[str]) -> str | None:
    content = msg.content
    found = set(content.keys())
    if found != keys:
        return f"record keys {sorted(found)} != expected {sorted(keys)}"
    if not isinstance(content.get(METRICS_KEY), MetricRecord):
        return f"'{METRICS_KEY}' is not a MetricRecord"
    if UPDATE_KEY in keys and not isinstance(content.get(UPDATE_KEY), ArrayRecord):
        return f"'{UPDATE_KEY}' is not an ArrayRecord"
    for key, record in content.items():
        if isinstance(record, ConfigRecord):
            return f"unexpected ConfigRecord '{key}' in a reply"
    return None


def _parse_metrics(
    record: MetricRecord, server_round: int, limits: ReplyLimits
) -> tuple[float, dict[str, float]] | str:
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{key}' is not a scalar number"
        as_float = float(value)
        if not math.isfinite(as_float):
            return f"metric '{key}' is not finite ({value})"
        metrics[key] = as_float
    if metrics.get(SERVER_ROUND) != server_round:
        return f"stale reply: '{SERVER_ROUND}'={metrics.get(SERVER_ROUND)} != {server_round}"
    n = metrics.pop(NUM_EXAMPLES, None)
    metrics.pop(SERVER_ROUND)
    if n is None:
        return f"missing '{NUM_EXAMPLES}'"
    if not 0 < n <= limits.max_num_examples:
        return f"'{NUM_EXAMPLES}'={n:g} outside (0, {limits.max_num_examples}]"
    return n, metrics


def _parse_update(
    record: ArrayRecord,
    expected: ArraySpec,
    limits: ReplyLimits,
    reference: Mapping[str, np.ndarray] | None = None,
    unnormed: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], float] | str:
    names = list(record.keys())
    if set(names) != set(expected):
        missing = sorted(set(expected) - set(names))[:3]
        extra = sorted(set(names) - set(expected))[:3]
        return f"update arrays differ from the model (missing {missing}, unexpected {extra})"
    update: dict[str, np.ndarray] = {}
    sq = 0.0
    for name in expected:
        shape, dtype = expected[name]
        array = record[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return (
                f"array '{name}' declared {array.dtype}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        try:
            # A read-only view of the reply's bytes (no np.load copy).
            value = array_view(array.data, dtype, shape)
        # The bytes come from another process we do not control; any decoding
        # failure (numpy raises ValueError, TypeError, EOFError, ...) means "malformed".
        except Exception as err:
            return f"array '{name}' does not decode: {type(err).__name__}: {err}"
        if reference is not None:  # share.artifact=weights: the update is w - w_global
            value = _minus(value, reference[name])
        if name in unnormed:  # top-k's indices: positions, not part of the update's norm
            update[name] = value
            continue
        flat = value.reshape(-1)
        # Σ v² accumulated in float64 without a float64 copy; a NaN or Inf anywhere makes
        # it non-finite (float32 squares cannot overflow float64, so for them that is the
        # only way); only then is the array scanned for the exact reason.
        part = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
        if not math.isfinite(part) and not np.all(np.isfinite(flat)):
            return f"array '{name}' holds NaN or Inf"
        sq += part
        update[name] = value
    norm = math.sqrt(sq)
    if not norm <= limits.max_update_norm:
        return f"update L2 norm {norm:.4g} exceeds max_update_norm={limits.max_update_norm:g}"
    return update, norm


def _minus(weights: np.ndarray, global_: np.ndarray) -> np.ndarray:
    """Δ = w − w_global as the client's pipeline computes it (float64, then the dtype)."""
    return (weights.astype(np.float64) - np.asarray(global_, dtype=np.float64)).astype(
        weights.dtype
    )


def _parse_records_and_metrics(
    msg: Message, keys: frozenset[str], server_round: int, limits: ReplyLimits
) -> tuple[int, float, dict[str, float]] | Rejection:
    """The checks every reply shares: record keys and types, then its metrics."""
    node = int(msg.metadata.src_node_id)
    problem = _check_records(msg, keys)
    if problem:
        return Rejection(node, problem)
    parsed = _parse_metrics(msg.content.metric_records[METRICS_KEY], server_round, limits)
    if isinstance(parsed, str):
        return Rejection(node, parsed)
    return (node, *parsed)


def parse_train_reply(
    msg: Message,
    *,
    server_round: int,
    expected: ArraySpec,
    limits: ReplyLimits,
    reference: Mapping[str, np.ndarray] | None = None,
    unnormed: frozenset[str] = frozenset(),
) -> TrainReply | Rejection:
    """Parse a screened train reply into a :class:`TrainReply`, or reject it.

    ``reference``: the round's global weights when replies hold weights
    (``share.artifact=weights``); the update is then ``w − reference``. ``unnormed``:
    arrays left out of the update's norm (top-k's indices, docs/compression.md)."""
    head = _parse_records_and_metrics(msg, TRAIN_REPLY_KEYS, server_round, limits)
    if isinstance(head, Rejection):
        return head
    node, num_examples, metrics = head
    upd = _parse_update(
        msg.content.array_records[UPDATE_KEY], expected, limits, reference, unnormed
    )
    if isinstance(upd, str):
        return Rejection(node, upd)
    update, norm = upd
    return TrainReply(node, update, num_examples, metrics, norm)


def parse_eval_reply(
    msg: Message, *, server_round: int, limits: ReplyLimits
) -> EvalReply | Rejection:
    """Parse a screened evaluate reply into an :class:`EvalReply`, or reject it."""
    head = _parse_records_and_metrics(msg, EVAL_REPLY_KEYS, server_round, limits)
    if isinstance(head, Rejection):
        return head
    return EvalReply(*head)
