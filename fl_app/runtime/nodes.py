"""The virtual SuperNodes of the in-process grid: ids, contexts, task identity, a call.

What a Flower SuperNode does around a ClientApp, done in this process for
:class:`~fl_app.runtime.inprocess.InProcessGrid`: draw distinct node ids, keep one
persistent ``Context`` per node, set the process-wide ``TaskIdentity`` while the node's
handler runs, and turn an exception into the error reply Flower's SuperNode runtime
builds (``flwr/supernode/runtime/run_clientapp.py``: code
``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason ``"<class 'X'>:<'msg'>"``), so that it
never propagates to the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "SERVER_TASK_ID",
    "Identity",
    "NodeConfigFn",
    "exception_reason",
    "get_identity",
    "make_contexts",
    "make_node_ids",
    "run_client_app",
    "set_identity",
]

#: ``node_config_fn(partition_id, num_nodes) -> node_config``.
NodeConfigFn = Callable[[int, int], dict[str, Any]]

#: Task id the server side uses, like Flower's legacy simulation entry points.
SERVER_TASK_ID = 1
_MAX_NODE_ID = 2**63 - 1

#: The raw ``TaskIdentity``: ``(task_id, run_id, node_id)``, ``None`` where unset.
Identity = tuple[int | None, int | None, int | None]


def make_node_ids(num_nodes: int, seed: int) -> list[int]:
    """Draw ``num_nodes`` distinct node ids in ``[2, 2**63 - 1]``.

    ``0`` is "unset" and ``1`` is ``SUPERLINK_NODE_ID`` in Flower, so both are excluded.
    """
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < num_nodes:
        draw = rng.integers(
            SUPERLINK_NODE_ID + 1,
            _MAX_NODE_ID,
            size=num_nodes - len(ids),
            dtype=np.int64,
            endpoint=True,
        )
        for value in draw.tolist():
            if value not in seen:
                seen.add(value)
                ids.append(int(value))
    return ids


def make_contexts(
    node_ids: Sequence[int],
    run_id: int,
    node_config_fn: NodeConfigFn | None,
    run_config: dict[str, Any],
) -> dict[int, Context]:
    """One persistent ``Context`` per node, in partition order.

    ``node_config_fn`` defaults to ``{"partition-id": i, "num-partitions": n}``, as in
    Flower's simulation; every node gets its own copy of ``run_config``.
    """
    num_nodes = len(node_ids)
    contexts: dict[int, Context] = {}
    for partition_id, node_id in enumerate(node_ids):
        if node_config_fn is None:
            node_config: dict[str, Any] = {
                PARTITION_ID_KEY: partition_id,
                NUM_PARTITIONS_KEY: num_nodes,
            }
        else:
            node_config = dict(node_config_fn(partition_id, num_nodes))
        contexts[node_id] = Context(
            run_id=run_id,
            node_id=node_id,
            node_config=node_config,
            state=RecordDict(),
            run_config=dict(run_config),
        )
    return contexts


def exception_reason(ex: BaseException) -> str:
    """Format ``ex`` like Flower's SuperNode runtime (``run_clientapp.py``)."""
    return str(type(ex)) + ":<'" + str(ex) + "'>"


def get_identity() -> Identity:
    """Return the raw ``TaskIdentity`` (``None`` where unset, no error)."""
    return (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)


def set_identity(identity: Identity) -> None:
    """Set the raw ``TaskIdentity`` (``None`` allowed, i.e. unset)."""
    # mypy infers ``int`` from the metaclass setters (``cls._task_id = value``); the
    # class attributes are really ``int | None``.
    task_id, run_id, node_id = identity
    TaskIdentity._task_id = task_id  # type: ignore[assignment]
    TaskIdentity._run_id = run_id  # type: ignore[assignment]
    TaskIdentity._node_id = node_id  # type: ignore[assignment]


def run_client_app(
    client_app: ClientApp, context: Context, message: Message, identity: Identity
) -> tuple[Message, Exception | None]:
    """Call the ClientApp as a node would, under ``identity``; restore it after.

    Returns the reply and, when the ClientApp raised (or returned something other than
    a ``Message``), the exception, whose error reply takes the reply's place.
    """
    previous = get_identity()
    set_identity(identity)
    try:
        try:
            reply = client_app(message=message, context=context)
            if not isinstance(reply, Message):
                raise TypeError(f"ClientApp returned {type(reply).__name__}, expected a Message")
        except Exception as ex:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=exception_reason(ex))
            return Message(error, reply_to=message), ex
    finally:
        set_identity(previous)
    return reply, None
