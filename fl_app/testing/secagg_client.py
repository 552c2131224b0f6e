"""A ClientApp for secure-aggregation tests and benchmarks: real stages, no training.

Stages 1, 2 and 4 go through the ClientApp's real torch-free handlers
(:mod:`fl_app.secagg.client`); stage 3 encodes and masks a given update with the real
:class:`~fl_app.secagg.client.MaskedInputStage` (fixed point, or distributed-DP shares
when the instruction carries them), so a test controls exactly what is summed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

__all__ = ["fixed_update_client", "grid_exchange", "train_instructions"]


def fixed_update_client(
    update_of: Callable[[int], Mapping[str, np.ndarray]],
    timing: dict[str, float] | None = None,
    policy: Any = None,
) -> ClientApp:
    """A ClientApp whose node ``u`` contributes ``update_of(u)`` (already clipped).

    With ``timing``, the seconds spent encoding accumulate under ``timing["encode"]``.
    ``policy``: the sites' :class:`~fl_app.client.policy.SitePolicy` (safe defaults when
    ``None``), as the ClientApp reads it from ``policy-path``.
    """
    from fl_app.secagg.client import MaskedInputStage, handle_key_stage, secagg_stage

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        stage = secagg_stage(msg)
        if stage != 3:
            if stage is None:
                raise ValueError("this test client only takes secure-aggregation stages")
            return handle_key_stage(msg, context, stage, policy)
        secure = MaskedInputStage.from_instruction(msg, context, policy)
        t0 = time.perf_counter()
        encoded = secure.encode(
            dict(update_of(int(context.node_id))),
            num_examples=1.0,
            loss=0.0,
            accuracy=0.0,
            unclipped=0.0,
        )
        if timing is not None:
            timing["encode"] = timing.get("encode", 0.0) + time.perf_counter() - t0
        return secure.reply(msg, secure.mask(encoded, context))

    return app


def grid_exchange(grid: Any) -> Callable[[list[Message], float], Any]:
    """:data:`strategies.secagg.Exchange` over an in-process grid.

    The grid is a :class:`~fl_app.runtime.inprocess.InProcessGrid`.
    """

    def exchange(messages: list[Message], timeout: float) -> Any:
        ids = list(grid.push_messages(messages))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return messages, list(grid.pull_messages(ids)), sent

    return exchange


def train_instructions(node_ids: list[int], rnd: int) -> list[Message]:
    """Empty train instructions of round ``rnd`` (what the driver hands the protocol)."""
    return [
        Message(
            RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": rnd})}),
            dst_node_id=node,
            message_type="train",
        )
        for node in node_ids
    ]
