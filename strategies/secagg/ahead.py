"""Share-ahead: the next round's stages 1-2 ride on this round's unmask exchange.

When every node of the next round's cohort survived this round and holds a key pair
advertised ahead for the next round, the server builds that round's session and stage-2
instructions now (:func:`plan_ahead`), routes the shares that come back with the unmask
replies (:func:`finish_ahead`), and the next round starts at stage 3 if its cohort and
parameters match exactly (:func:`take_ahead`); otherwise it runs its stages in full.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from fl_app.protocol import SERVER_ROUND
from fl_app.secagg import wire
from fl_app.secagg.params import SecAggConfigError, SecAggParams, ServerModel
from fl_app.secagg.protocol import PublicKeys, RoundAbandoned, round_context
from fl_app.secagg.server_session import ServerSession
from fl_app.secagg.settings import SecAggSettings, round_params
from strategies.secagg.messages import parse_bundle, route_shares, share_key_instructions
from strategies.validation import Rejection

if TYPE_CHECKING:  # fl_app.privacy imports torch; the server holds a built plan
    from fl_app.privacy.distributed import DdpPlan

log = logging.getLogger("fl_app.secagg")


@dataclass
class AheadPlan:
    """The next round's session after stage 1, and its stage-2 instructions by node."""

    rnd: int
    cohort: tuple[int, ...]
    server: ServerSession
    instructions: dict[int, ConfigRecord]


@dataclass
class SharedAhead:
    """The next round's session after stage 2, with the shares to route at stage 3."""

    rnd: int
    cohort: tuple[int, ...]
    server: ServerSession
    routed: dict[int, dict[int, bytes]]
    missing: set[int] = field(default_factory=set)
    rejected: list[Rejection] = field(default_factory=list)


def plan_ahead(
    settings: SecAggSettings,
    ddp: DdpPlan | None,
    round_keys: dict[int, dict[int, PublicKeys]],
    rnd: int,
    cohort: Sequence[int] | None,
    survivors: Sequence[int],
    run_id: int,
    length: int,
    *,
    bind: bytes | None = None,
) -> AheadPlan | None:
    """Stage 1 of round ``rnd`` from keys advertised ahead, and its stage-2 instructions.

    ``None`` (the round will run its own stages) unless every node of ``cohort``
    survived the current round and holds a key pair for ``rnd`` in ``round_keys`` (the
    pair is taken out of it: each serves once).
    """
    s = settings
    if cohort is None or len(cohort) < 3 or not set(cohort) <= set(survivors):
        return None
    nodes = sorted(int(u) for u in cohort)
    if any(rnd not in round_keys.get(u, {}) for u in nodes):
        return None
    if ddp is not None and len(nodes) > ddp.max_cohort:
        return None
    try:
        params = round_params(
            len(nodes),
            s.mode,
            s.dropout_tolerance,
            s.corrupt_fraction,
            s.server_model,
            s.min_corrupt(),
        )
    except SecAggConfigError:
        return None
    context = round_context(int(run_id) % 2**64, rnd, bind=bind)  # bind: the client spec
    server = ServerSession(nodes, params, vector_length=length, bits=s.bits, context=context)
    keys = {u: round_keys[u].pop(rnd) for u in nodes}  # each pair serves once
    try:
        neighbours = server.collect_public_keys(keys)
    except RoundAbandoned as err:
        log.info("round %d: keys advertised ahead unusable (%s); full stages then", rnd, err)
        return None
    malicious = s.server_model is ServerModel.malicious
    if malicious and len(neighbours) != len(nodes):
        # The complete graph over the whole cohort only (SecureAggregation._key_stages).
        return None
    records = share_key_instructions(server, rnd, neighbours, malicious=malicious)
    return AheadPlan(rnd, tuple(nodes), server, {u: ConfigRecord(r) for u, r in records.items()})


def finish_ahead(plan: AheadPlan, replies: Mapping[int, Any]) -> SharedAhead | None:
    """Route the next round's shares that rode on this round's unmask replies; ``None``
    when too few arrived (the next round then runs its stages in full)."""
    bundles: dict[int, tuple[dict[int, bytes], bytes]] = {}
    rejected: list[Rejection] = []
    for u in plan.instructions:
        record = replies.get(u)
        if record is None:
            continue
        try:
            if not isinstance(record, ConfigRecord):
                raise ValueError(f"'{wire.SECAGG_NEXT_KEY}' is not a ConfigRecord")
            if record.get(SERVER_ROUND) != plan.rnd:
                raise ValueError(f"'{SERVER_ROUND}'={record.get(SERVER_ROUND)!r} != {plan.rnd}")
            bundles[u] = parse_bundle(record)
        except (ValueError, KeyError, TypeError) as err:
            rejected.append(Rejection(u, f"stage share_keys (ahead): {err}"))
    for r in rejected:
        log.warning("round %d secagg: rejected node %d: %s", plan.rnd, r.node_id, r.reason)
    try:
        routed = route_shares(plan.server, bundles)
    except RoundAbandoned as err:
        log.info("round %d: shares routed ahead fell short (%s); full stages then", plan.rnd, err)
        return None
    return SharedAhead(
        plan.rnd,
        plan.cohort,
        plan.server,
        routed,
        missing=set(plan.instructions) - set(bundles),
        rejected=rejected,
    )


def take_ahead(
    shared: SharedAhead | None,
    rnd: int,
    cohort: Sequence[int],
    params: SecAggParams,
    length: int,
    bits: int,
) -> SharedAhead | None:
    """``shared`` (the stages 1-2 run ahead for this round) if it matches it exactly."""
    if shared is None:
        return None
    server = shared.server
    if (
        shared.rnd != rnd
        or shared.cohort != tuple(cohort)
        or server.params != params
        or server.vector_length != length
        or server.bits != bits
    ):
        log.info("round %d: cohort or parameters changed; stages 1-2 run again", rnd)
        return None
    return shared
