"""A deviating secure-aggregation server, for tests: honest rounds with chosen lies.

:class:`AdversarialServer` runs the real server side (:class:`strategies.secagg.
SecureAggregation`) over an :class:`~fl_app.runtime.inprocess.InProcessGrid` whose nodes run a
real ClientApp (the project's, or :func:`~fl_app.testing.secagg_client.
fixed_update_client`, which calls the same stage handlers). Before each instruction
leaves, every installed :data:`Lie` may rewrite it: this is what a server that deviates
from the protocol can send, from a client's point of view. The replies are kept, so a
test can assert which clients refused what, and why. :class:`LyingGrid` applies the
same lies under the real driver (``run_experiment``) and the project's ClientApp.

The lies (Bonawitz et al., CCS 2017, §4 and §6; Bell et al., CCS 2020, §4):

* :func:`pad_survivors` — a stage-4 survivor list padded with ids outside the cohort
  (or repeated ids), to pass a client's "too few survivors" count;
* :func:`split_view` — tell some holders that a node dropped and the others that it
  survived, to collect shares of both its self-mask seed and its masking key;
* :func:`claim_dropout` — list a node whose masked input arrived as a dropout;
* :func:`weaker_params` — stage-2 parameters weaker than the client's floor (fewer
  security bits, a larger dropout tolerance, fewer assumed colluders, hand-picked
  ``(k, t)``);
* :func:`sparse_graph` — under the malicious model, a neighbour graph of the server's
  choosing (each client shown only part of the cohort) with SecAgg+ thresholds;
* :func:`made_up_cohort` — a stage-2 cohort padded with ids nobody verified;
* :meth:`AdversarialServer.replay` — an instruction sent again, later (a replayed or
  out-of-order round).

Nothing here is used outside tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fl_app.protocol import CONFIG_KEY, SERVER_ROUND
from fl_app.secagg.derive import custom_params, derive_params, params_from_config
from fl_app.secagg.settings import SecAggSettings
from fl_app.secagg.vector import pack_ids, unpack_ids
from fl_app.secagg.wire import (
    SECAGG_COHORT,
    SECAGG_DROPOUTS,
    SECAGG_IDENTITIES,
    SECAGG_KEYS,
    SECAGG_NODES,
    SECAGG_PARAMS,
    SECAGG_SIGNATURES,
    SECAGG_STAGE_KEY,
    SECAGG_SURVIVORS,
)
from strategies.secagg import SecAggOutcome, SecureAggregation

__all__ = [
    "AdversarialServer",
    "Lie",
    "LyingGrid",
    "Sent",
    "claim_dropout",
    "made_up_cohort",
    "pad_survivors",
    "sparse_graph",
    "split_view",
    "weaker_params",
]

#: ``lie(stage, node, config) -> config``: rewrite the config record of the instruction
#: of ``stage`` to ``node`` (a plain dict of its values; return it, changed or not).
Lie = Callable[[int, int, dict[str, Any]], dict[str, Any]]


@dataclass
class Sent:
    """One instruction that left the server, and the reply it got (``None``: none)."""

    rnd: int
    stage: int
    node: int
    message: Message
    reply: Message | None = None

    @property
    def refusal(self) -> str | None:
        """The client's error reason, or ``None`` if it answered normally."""
        if self.reply is None or not self.reply.has_error():
            return None
        return str(self.reply.error.reason)


@dataclass
class AdversarialServer:
    """Secure-aggregation rounds over ``grid`` with :data:`Lie` s applied to instructions."""

    grid: Any
    settings: SecAggSettings
    ddp: Any = None
    log: list[Sent] = field(default_factory=list)
    #: ``(round, stage, node) -> keys`` of the node's secure-aggregation state
    #: (``Context.state``) right after it handled that instruction (empty: none left).
    state_after: dict[tuple[int, int, int], frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.secagg = SecureAggregation(self.settings, ddp=self.ddp)

    def run_round(
        self,
        rnd: int,
        arrays: Mapping[str, np.ndarray],
        lies: Sequence[Lie] = (),
        *,
        bound: float = 1.0,
        last_round: int | None = None,
        cohort: Sequence[int] | None = None,
        next_cohort: Callable[[set[int]], Sequence[int] | None] | None = None,
        lost: Mapping[int, Iterable[int]] | None = None,
    ) -> SecAggOutcome:
        """One round over ``cohort`` (every node by default); ``lies`` rewrite instructions.

        ``lost``: ``stage -> nodes`` whose reply to that stage never reaches the server
        (a dropout after the client acted, the hardest case for the protocol).
        """
        from fl_app.testing.secagg_client import train_instructions

        nodes = list(self.grid.node_ids if cohort is None else cohort)
        return self.secagg.run_round(
            rnd=rnd,
            run_id=1,
            instructions=train_instructions(nodes, rnd),
            arrays=arrays,
            weighting="uniform",
            bound=bound,
            exchange=self._exchange(rnd, lies, lost or {}),
            last_round=last_round,
            next_cohort=next_cohort,
        )

    def _exchange(self, rnd: int, lies: Sequence[Lie], lost: Mapping[int, Iterable[int]]) -> Any:
        gone = {int(stage): {int(x) for x in nodes} for stage, nodes in lost.items()}

        def exchange(messages: list[Message], timeout: float) -> Any:
            stage = 0
            for msg in messages:
                config = msg.content.config_records[CONFIG_KEY]
                stage = int(config[SECAGG_STAGE_KEY])  # type: ignore[arg-type]
                node = int(msg.metadata.dst_node_id)
                values = dict(config)
                for lie in lies:
                    values = lie(stage, node, values)
                msg.content[CONFIG_KEY] = ConfigRecord(values)
            sent_msgs, replies, sent = self._deliver(rnd, messages)
            drop = gone.get(stage, set())
            kept = [r for r in replies if int(r.metadata.src_node_id) not in drop]
            return sent_msgs, kept, sent

        return exchange

    def _deliver(self, rnd: int, messages: list[Message]) -> Any:
        entries = {}
        for msg in messages:
            config = msg.content.config_records[CONFIG_KEY]
            entry = Sent(
                rnd,
                int(config[SECAGG_STAGE_KEY]),  # type: ignore[arg-type]
                int(msg.metadata.dst_node_id),
                msg,
            )
            self.log.append(entry)
            entries[id(msg)] = entry
        ids = list(self.grid.push_messages(messages))
        by_id = {mid: entries[id(m)] for mid, m in zip(ids, messages, strict=True)}
        replies = list(self.grid.pull_messages(ids))
        for reply in replies:
            entry_of = by_id.get(reply.metadata.reply_to_message_id)
            if entry_of is not None:
                entry_of.reply = reply
        from fl_app.secagg.client import STATE_KEY

        for entry in by_id.values():
            record = self.grid.context(entry.node).state.get(STATE_KEY)
            keys = frozenset(record.keys()) if record is not None else frozenset()
            self.state_after[(entry.rnd, entry.stage, entry.node)] = keys
        sent = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        return messages, replies, sent

    def replay(self, entry: Sent, changes: Mapping[str, Any] | None = None) -> Sent:
        """Send ``entry``'s instruction again (optionally with changed config values)."""
        content = entry.message.content
        config = {**dict(content.config_records[CONFIG_KEY]), **(changes or {})}
        records = {k: v for k, v in content.items() if k != CONFIG_KEY}
        msg = Message(
            RecordDict({**records, CONFIG_KEY: ConfigRecord(config)}),
            dst_node_id=entry.node,
            message_type=entry.message.metadata.message_type,
        )
        rnd = int(config.get(SERVER_ROUND, entry.rnd))
        self._deliver(rnd, [msg])
        return self.log[-1]

    def sent(self, rnd: int | None = None, stage: int | None = None) -> list[Sent]:
        """The instructions sent, filtered by round and stage."""
        return [
            e
            for e in self.log
            if (rnd is None or e.rnd == rnd) and (stage is None or e.stage == stage)
        ]

    def refusals(self, rnd: int, stage: int) -> dict[int, str]:
        """``node -> reason`` of the clients that refused ``stage`` of ``rnd``."""
        return {e.node: e.refusal for e in self.sent(rnd, stage) if e.refusal is not None}


class LyingGrid:
    """A Grid whose secure-aggregation instructions pass through :data:`Lie` s.

    Wraps an :class:`~fl_app.runtime.inprocess.InProcessGrid` for the real driver
    (``run_experiment``): every pushed ``train`` message with a stage marker is
    rewritten by ``lies(round, stage, node, config)`` first; ``lies`` returns the
    config (changed or not). Everything else is the wrapped grid's.
    """

    def __init__(
        self, grid: Any, lie: Callable[[int, int, int, dict[str, Any]], dict[str, Any]]
    ) -> None:
        self._grid = grid
        self._lie = lie

    def push_messages(self, messages: Iterable[Message]) -> Any:
        batch = list(messages)
        for msg in batch:
            config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
            if config is None or SECAGG_STAGE_KEY not in config:
                continue
            values = dict(config)
            rnd = int(values.get(SERVER_ROUND, 0))  # type: ignore[arg-type]
            stage = int(values[SECAGG_STAGE_KEY])  # type: ignore[arg-type]
            changed = self._lie(rnd, stage, int(msg.metadata.dst_node_id), values)
            msg.content[CONFIG_KEY] = ConfigRecord(changed)
        return self._grid.push_messages(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


# ------------------------------------------------------------------------ the lies
def _ids(config: Mapping[str, Any], key: str) -> list[int]:
    return unpack_ids(config[key], key)


def pad_survivors(fakes: Iterable[int], keep: int | None = None) -> Lie:
    """Stage 4: keep the first ``keep`` real survivors (all by default), append ``fakes``."""
    extra = [int(x) for x in fakes]

    def lie(stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        if stage != 4:
            return config
        real = _ids(config, SECAGG_SURVIVORS)
        if keep is not None:
            real = [v for v in real if v == node][:1] + [v for v in real if v != node]
            real = real[:keep]
        config[SECAGG_SURVIVORS] = pack_ids(real + extra)
        return config

    return lie


def split_view(target: int, told_dropped: Iterable[int]) -> Lie:
    """Stage 4: the nodes in ``told_dropped`` hear that ``target`` dropped; others not."""
    group = {int(x) for x in told_dropped}

    def lie(stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        if stage != 4 or node not in group:
            return config
        survivors = [v for v in _ids(config, SECAGG_SURVIVORS) if v != target]
        dropouts = sorted({*_ids(config, SECAGG_DROPOUTS), target})
        config[SECAGG_SURVIVORS] = pack_ids(survivors)
        config[SECAGG_DROPOUTS] = pack_ids(dropouts)
        return config

    return lie


def claim_dropout(target: int) -> Lie:
    """Stage 4: every client hears that ``target`` dropped (its masked input arrived)."""

    def lie(stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        return split_view(target, [node])(stage, node, config)

    return lie


def weaker_params(
    *,
    custom: tuple[int, int] | None = None,
    dropout_tolerance: float | None = None,
    corrupt_fraction: float | None = None,
    security_bits: int | None = None,
    server_model: str | None = None,
    mode: str | None = None,
) -> Lie:
    """Stage 2: parameters re-derived with weaker inputs, or hand-picked ``(k, t)``.

    ``custom=(k, t)`` builds :func:`~fl_app.secagg.derive.custom_params` when they pass
    its checks, else writes the values raw (what a deviating server can send anyway).
    ``server_model``: re-derive for another server model (``"honest_but_curious"``: the
    cheaper thresholds a malicious server would like its clients to accept); ``mode``:
    for another graph mode (``"secaggplus"``: a sparse graph's thresholds).
    """

    def lie(stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        if stage != 2:
            return config
        honest = params_from_config(json.loads(config[SECAGG_PARAMS]))
        model = honest.server_model if server_model is None else server_model
        if custom is not None:
            k, t = custom
            try:
                raw = custom_params(
                    honest.num_clients,
                    k,
                    t,
                    max_dropouts=honest.max_dropouts,
                    max_corrupt=honest.max_corrupt,
                    mode=honest.mode,
                    server_model=model,
                ).to_config()
            except ValueError:
                raw = {
                    **honest.to_config(),
                    "degree": k,
                    "threshold": t,
                    "security_bits": 0,
                    "correctness_bits": 0,
                }
        else:
            raw = derive_params(
                honest.num_clients,
                mode=honest.mode if mode is None else mode,
                dropout_tolerance=honest.dropout_tolerance
                if dropout_tolerance is None
                else dropout_tolerance,
                corrupt_fraction=honest.corrupt_fraction
                if corrupt_fraction is None
                else corrupt_fraction,
                security_bits=honest.security_bits if security_bits is None else security_bits,
                server_model=model,
            ).to_config()
        config[SECAGG_PARAMS] = json.dumps(raw, sort_keys=True)
        return config

    return lie


def _keep_neighbours(config: dict[str, Any], keep: Sequence[int]) -> None:
    """Cut a stage-2 instruction's neighbour list (and its keys, identities and
    signatures, kept consistent) down to ``keep``."""
    from fl_app.secagg.crypto import KEY_BYTES
    from fl_app.secagg.signing import SIGNATURE_BYTES

    nodes = _ids(config, SECAGG_NODES)
    rows = [nodes.index(v) for v in sorted(keep)]
    size = 2 * KEY_BYTES
    config[SECAGG_NODES] = pack_ids(sorted(keep))
    config[SECAGG_KEYS] = b"".join(config[SECAGG_KEYS][i * size : (i + 1) * size] for i in rows)
    if SECAGG_IDENTITIES in config:
        names = json.loads(config[SECAGG_IDENTITIES])
        sig = SIGNATURE_BYTES
        config[SECAGG_IDENTITIES] = json.dumps([names[i] for i in rows])
        config[SECAGG_SIGNATURES] = b"".join(
            config[SECAGG_SIGNATURES][i * sig : (i + 1) * sig] for i in rows
        )


def sparse_graph(groups: Sequence[Iterable[int]] | None = None) -> Lie:
    """Stage 2: SecAgg+ thresholds for the cohort and a graph the server built.

    ``groups``: disjoint cliques (each client is shown only the members of its own group,
    the partial-sums attack); ``None``: a Harary graph of the SecAgg+ degree drawn by
    :func:`~fl_app.secagg.graph.build_graph` (an honestly drawn sparse graph, which a
    client cannot tell from a crafted one).
    """
    from fl_app.secagg.graph import build_graph

    cliques = [set(g) for g in groups] if groups is not None else None
    graphs: dict[bytes, dict[int, tuple[int, ...]]] = {}

    def lie(stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        if stage != 2:
            return config
        honest = params_from_config(json.loads(config[SECAGG_PARAMS]))
        sparse = derive_params(
            honest.num_clients,
            mode="secaggplus",
            dropout_tolerance=honest.dropout_tolerance,
            corrupt_fraction=honest.corrupt_fraction,
            server_model=honest.server_model,
        )
        config[SECAGG_PARAMS] = json.dumps(sparse.to_config(), sort_keys=True)
        if cliques is not None:
            keep = next(g for g in cliques if node in g) - {node}
        else:
            cohort = bytes(config[SECAGG_COHORT])
            if cohort not in graphs:
                graphs[cohort] = build_graph(unpack_ids(cohort), sparse.degree, b"\x07" * 32)
            keep = set(graphs[cohort][node])
        _keep_neighbours(config, sorted(keep))
        return config

    return lie


def made_up_cohort(
    fakes: Iterable[int], *, mode: str | None = None, dropout_tolerance: float | None = None
) -> Lie:
    """Stage 2: a cohort padded with ``fakes`` (ids no client verified), parameters
    re-derived for the padded size (with ``mode`` / ``dropout_tolerance`` if given, so
    the real clients' neighbour count fits them); the neighbour list stays the real
    clients."""
    extra = sorted(int(v) for v in fakes)

    def lie(stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        if stage != 2:
            return config
        honest = params_from_config(json.loads(config[SECAGG_PARAMS]))
        cohort = sorted(set(_ids(config, SECAGG_COHORT)) | set(extra))
        padded = derive_params(
            len(cohort),
            mode=honest.mode if mode is None else mode,
            dropout_tolerance=honest.dropout_tolerance
            if dropout_tolerance is None
            else dropout_tolerance,
            corrupt_fraction=honest.corrupt_fraction,
            server_model=honest.server_model,
        )
        config[SECAGG_COHORT] = pack_ids(cohort)
        config[SECAGG_PARAMS] = json.dumps(padded.to_config(), sort_keys=True)
        return config

    return lie
