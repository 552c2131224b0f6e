"""Secure aggregation as the round driver's train stage (server side, Message API).

When ``secagg.mode`` is not ``off``, :class:`~strategies.driver.RoundDriver` hands the
train stage of every round to :meth:`SecureAggregation.run_round`, which runs the
four-stage protocol of Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §4; sparse graph of Bell et al., CCS 2020, for
``secaggplus``) over Flower messages of type ``train``, each marked with
``fl-app.secagg-stage`` (:mod:`fl_app.protocol`):

1. advertise keys (only for clients that hold no key pair for this round: a stage-1
reply carries fresh pairs for ``secagg.key_rounds`` rounds, so later rounds skip it);
2. share keys with the round's parameters (the server routes the encrypted Shamir shares);
3. masked input (the usual train instruction: global arrays, client spec, config; the
client trains, clips, encodes and masks); 4. unmask (survivors return the shares the
server needs, never both secrets of one node).

The pure protocol lives in :mod:`fl_app.secagg` (:class:`~fl_app.secagg.ServerSession`);
this module only builds messages, screens and parses replies (a malformed reply becomes
a logged :class:`~strategies.validation.Rejection`, the node counts as dropped and the
round goes on), and decodes the sum (:mod:`fl_app.secagg.vector`). Every stage has its
own timeout. Protocol parameters ``(k, t)`` are derived per round for the sampled
cohort (:func:`fl_app.secagg.graph.derive_params`); the fixed-point codec from
``(bits, clip bound, cohort size)``, so the sum cannot overflow.

What the server learns: public keys, ciphertexts it cannot read, who replied at each
stage, and the sums ``Σ w·Δ``, ``Σ w``, ``Σ unclipped``, ``Σ w·loss``, ``Σ w·accuracy``.
Below the threshold at any stage the round is abandoned (:class:`SecAggOutcome` with
``decoded=None`` and a note): the model stays unchanged and the run goes on.

Server models (``secagg.server_model``): ``honest_but_curious`` runs the stages above;
``malicious`` runs on the complete graph only (``secagg=secagg``; the clients refuse any
neighbourhood but the whole cohort, since they cannot verify a graph the server drew),
adds a run id to stage 1 (clients sign their key pairs for it) and abandons the round
when a sampled client's signed keys are missing, adds the neighbours' roster identities
and signatures to stage 2, and a consistency-check exchange
(:data:`~fl_app.secagg.protocol.Stage.consistency`) between stages 3 and 4: survivors
sign ``U3`` bound to their round keys, the server keeps the signatures that verify
under the key each node advertised (so one faulty client cannot make everyone refuse),
abandons the round below :func:`~fl_app.secagg.graph.consistency_quorum` of them, and
sends that many with stage 4 to the signers only (:mod:`fl_app.secagg.signing`).

Trust assumptions: a server of the configured model, at most ``corrupt_fraction`` of the
cohort colluding with it, authenticated client-server channels (Flower's TLS and node
authentication), and clients that clip honestly (the server cannot check a bound on a
masked input; a malicious client can skew, but not reveal, the sum).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fl_app.config.schema import SecAggConfig, SecAggMode
from fl_app.protocol import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    CONFIG_KEY,
    METRICS_KEY,
    PUBLIC_METRIC_PREFIX,
    SECAGG_BITS,
    SECAGG_BOUND,
    SECAGG_CIPHERTEXTS,
    SECAGG_COHORT,
    SECAGG_CONTEXT,
    SECAGG_DDP,
    SECAGG_DROPOUTS,
    SECAGG_IDENTITIES,
    SECAGG_KEY_ROUNDS,
    SECAGG_KEYS,
    SECAGG_MASKED_ARRAY,
    SECAGG_MASKED_KEY,
    SECAGG_MAX_KEY_ROUNDS,
    SECAGG_MAX_WEIGHT,
    SECAGG_NEXT_KEY,
    SECAGG_NODES,
    SECAGG_PARAMS,
    SECAGG_RECORD_KEY,
    SECAGG_REPLY_C_PK,
    SECAGG_REPLY_CIPHERTEXTS,
    SECAGG_REPLY_COMMITMENT,
    SECAGG_REPLY_IDENTITY,
    SECAGG_REPLY_KEY_NODES,
    SECAGG_REPLY_KEY_SHARES,
    SECAGG_REPLY_NODES,
    SECAGG_REPLY_S_PK,
    SECAGG_REPLY_SELF_MASK_NODES,
    SECAGG_REPLY_SELF_MASK_SHARES,
    SECAGG_REPLY_SIGNATURES,
    SECAGG_REPLY_SIGNING_KEY,
    SECAGG_RUN_ID,
    SECAGG_SIGNATURES,
    SECAGG_SIGNERS,
    SECAGG_STAGE_KEY,
    SECAGG_SURVIVORS,
    SECAGG_VECTOR_LENGTH,
    SECAGG_WEIGHTING,
    SERVER_ROUND,
)
from fl_app.secagg import crypto, shamir, signing
from fl_app.secagg.graph import (
    MIN_CORRUPT_CLIENTS,
    GraphMode,
    SecAggConfigError,
    SecAggParams,
    ServerModel,
    consistency_quorum,
    derive_params,
    federation_min_corrupt,
)
from fl_app.secagg.protocol import (
    CIPHERTEXT_BYTES,
    PublicKeys,
    RoundAbandoned,
    ServerSession,
    Stage,
    UnmaskReply,
    round_context,
)
from fl_app.secagg.protocol import Rejection as ProtocolRejection
from fl_app.secagg.vector import (
    BOUND_SLACK,
    DecodedSum,
    VectorLayout,
    pack_ids,
    round_codec,
    unpack_ids,
)
from fl_app.secagg.wire import payload_bytes, unpack_ring, wire_packed
from fl_app.weights import array_view
from strategies.validation import Rejection, screen_replies

__all__ = [
    "Exchange",
    "SecAggOutcome",
    "SecAggSettings",
    "SecureAggregation",
    "StageLog",
    "parse_stage_reply",
]

if TYPE_CHECKING:  # fl_app.privacy imports torch; the server holds a built plan
    from fl_app.privacy.distributed import DdpPlan

log = logging.getLogger("fl_app.secagg")

#: ``exchange(messages, timeout) -> (sent messages, replies, message_id -> node)``: the
#: driver's push/pull loop (:meth:`strategies.driver.RoundDriver._exchange`).
Exchange = Callable[[list[Message], float], tuple[list[Message], list[Message], dict[str, int]]]

_STAGE_RECORDS = {
    Stage.advertise: frozenset({METRICS_KEY, SECAGG_RECORD_KEY}),
    Stage.share_keys: frozenset({METRICS_KEY, SECAGG_RECORD_KEY}),
    Stage.masked_input: frozenset({METRICS_KEY, SECAGG_MASKED_KEY}),
    Stage.unmask: frozenset({METRICS_KEY, SECAGG_RECORD_KEY}),
    Stage.consistency: frozenset({METRICS_KEY, SECAGG_RECORD_KEY}),
}


@dataclass(frozen=True)
class SecAggSettings:
    """Secure-aggregation parameters, checked when the run is built."""

    mode: GraphMode
    bits: int = 32
    dropout_tolerance: float = 0.2
    corrupt_fraction: float = 0.1
    stage_timeout_s: float = 60.0
    # Encoding bound when the privacy layer sends no clip norm (privacy.mode=none).
    clip: float | None = None
    max_weight: float = 1000.0
    # Rounds a client's stage-1 reply covers (one fresh key pair per round): a client
    # that holds keys for the round skips stage 1. 1 = stage 1 in every round.
    key_rounds: int = 16
    # What the thresholds (and, when malicious, the protocol) assume of the server.
    server_model: ServerModel = ServerModel.honest_but_curious
    # Sites in the federation (dataset.num_partitions; 0 = unknown, the cohort then).
    # Under ``malicious`` the colluder bound C is a fraction of it, not of the cohort,
    # because the clients count it so (fl_app.secagg_stages._check_malicious_round) and
    # refuse thresholds derived for fewer colluders.
    federation_size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.key_rounds <= SECAGG_MAX_KEY_ROUNDS:
            raise ValueError(
                f"secagg.key_rounds must lie in [1, {SECAGG_MAX_KEY_ROUNDS}], "
                f"found {self.key_rounds}"
            )
        if not 8 <= self.bits <= 64:
            raise ValueError(f"secagg.bits must lie in [8, 64], found {self.bits}")
        if not self.stage_timeout_s > 0:
            raise ValueError(f"secagg.stage_timeout_s must be > 0, found {self.stage_timeout_s}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"secagg.clip must be > 0, found {self.clip}")
        if not self.max_weight > 0:
            raise ValueError(f"secagg.max_weight must be > 0, found {self.max_weight}")
        if self.federation_size < 0:
            raise ValueError(
                f"federation size must be >= 0 (0: the cohort), found {self.federation_size}"
            )
        if self.server_model is ServerModel.malicious and self.mode is not GraphMode.secagg:
            # The sparse graph is the server's choice and no client can verify it; the
            # clients refuse it under this model (fl_app.secagg_stages), so say so here.
            raise ValueError(
                "secagg.server_model=malicious needs the complete graph: the SecAgg+ "
                "neighbour graph is drawn by the server and clients cannot check it (a "
                "server that builds it learns inputs or partial sums). Run with "
                "secagg=secagg (complete graph) or secagg.server_model=honest_but_curious"
            )

    @classmethod
    def from_config(cls, cfg: SecAggConfig, federation_size: int = 0) -> SecAggSettings | None:
        """``None`` for ``secagg.mode=off``; ``federation_size``: dataset.num_partitions."""
        if cfg.mode is SecAggMode.off:
            return None
        return cls(
            mode=GraphMode(cfg.mode.value),
            bits=int(cfg.bits),
            dropout_tolerance=float(cfg.dropout_tolerance),
            corrupt_fraction=float(cfg.corrupt_fraction),
            stage_timeout_s=float(cfg.stage_timeout_s),
            clip=None if cfg.clip is None else float(cfg.clip),
            max_weight=float(cfg.max_weight),
            key_rounds=int(cfg.key_rounds),
            server_model=ServerModel(cfg.server_model.value),
            federation_size=int(federation_size),
        )

    def min_corrupt(self) -> int:
        """Colluders the thresholds assume at least, whatever the cohort.

        Under ``malicious``: ``max(floor(corrupt_fraction * N), 1)`` over the federation's
        ``N`` sites, the bound every client checks at share-keys (a server that picks the
        cohort could pack it with the colluders it has; the fraction of a small cohort
        would assume fewer). Under ``honest_but_curious`` the server follows the protocol
        and samples fairly, so the cohort's fraction stands (:data:`MIN_CORRUPT_CLIENTS`).
        """
        if self.server_model is not ServerModel.malicious:
            return MIN_CORRUPT_CLIENTS
        return federation_min_corrupt(self.corrupt_fraction, self.federation_size)


@dataclass
class StageLog:
    """What happened in one protocol stage."""

    stage: Stage
    sent: int = 0
    replied: int = 0
    accepted: int = 0
    seconds: float = 0.0
    server_seconds: float = 0.0


@dataclass
class SecAggOutcome:
    """The result of one secure train stage.

    ``decoded`` is ``None`` when the round was abandoned (``note`` says why).
    """

    decoded: DecodedSum | None
    num_contributors: int = 0
    note: str = ""
    params: SecAggParams | None = None
    stages: list[StageLog] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failed: list[Rejection] = field(default_factory=list)
    # Cohort nodes whose reply to some stage never arrived.
    missing: set[int] = field(default_factory=set)
    # Stage-3 instructions (the synthetic aggregate reply answers the first one).
    masked_input_sent: list[Message] = field(default_factory=list)
    dropouts: int = 0
    # Public dp-* metrics (record-level DP-SGD) from the stage-3 replies, by node.
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    # Payload bytes sent to / received from the cohort over all four stages.
    bytes_down: int = 0
    bytes_up: int = 0
    cohort_size: int = 0
    bits: int = 0
    # The sum was unmasked (the server saw it) and then refused at decoding: the round is
    # abandoned, but under distributed DP the noised sum was released to the server, so
    # the mechanism ran and must be accounted.
    unmasked: bool = False

    def metrics(self) -> dict[str, float]:
        """Public per-round metrics for the round report."""
        out: dict[str, float] = {
            "secagg_contributors": float(self.num_contributors),
            "secagg_dropouts_after_sharing": float(self.dropouts),
            "secagg_server_seconds": sum(s.server_seconds for s in self.stages),
        }
        if self.params is not None:
            out["secagg_threshold"] = float(self.params.threshold)
            out["secagg_degree"] = float(self.params.degree)
        for s in self.stages:
            out[f"secagg_stage{int(s.stage)}_accepted"] = float(s.accepted)
            out[f"secagg_stage{int(s.stage)}_seconds"] = s.seconds
        if self.unmasked and self.decoded is None:
            out["secagg_abandoned_after_unmask"] = 1.0
        if self.cohort_size:
            out["secagg_bits"] = float(self.bits)
            out["secagg_bytes_down_per_client"] = self.bytes_down / self.cohort_size
            out["secagg_bytes_up_per_client"] = self.bytes_up / self.cohort_size
        return out


def parse_stage_reply(
    msg: Message, *, server_round: int, stage: Stage, optional: frozenset[str] = frozenset()
) -> Rejection | RecordDict:
    """Check a screened stage reply's records and protocol metrics; return its content.

    The plaintext ``metrics`` of a secure-aggregation reply may hold exactly
    ``server-round`` and the stage marker, plus, in the masked-input reply, the public
    ``dp-*`` metrics of record-level DP-SGD (the ε an institution has spent, its steps,
    sample rate and z: public by design, and the server needs the steps to detect a
    client whose accounting restarted). Anything else about a client (its example
    count, its loss) must travel inside the masked vector.
    """
    node = int(msg.metadata.src_node_id)
    content = msg.content
    keys = set(content.keys())
    want = _STAGE_RECORDS[stage]
    if not want <= keys or keys - want - optional:
        return Rejection(node, f"stage {stage.name}: record keys {sorted(keys)} != {sorted(want)}")
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord):
        return Rejection(node, f"stage {stage.name}: '{METRICS_KEY}' is not a MetricRecord")
    protocol = {SERVER_ROUND, SECAGG_STAGE_KEY}
    public = {k for k in metrics if k.startswith(PUBLIC_METRIC_PREFIX)}
    if stage is not Stage.masked_input:
        public = set()
    if not protocol <= set(metrics.keys()) or set(metrics.keys()) - protocol - public:
        return Rejection(
            node,
            f"stage {stage.name}: plaintext metrics must be exactly "
            f"{sorted(protocol)} (plus public '{PUBLIC_METRIC_PREFIX}*' metrics at stage 3), "
            f"got {sorted(metrics.keys())}",
        )
    for key in public:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return Rejection(node, f"stage {stage.name}: public metric {key!r} is not a number")
        # Finite and exactly representable: the summary turns some into ints (an inf
        # 'dp-rounds' ended the run with an OverflowError).
        if not (math.isfinite(float(value)) and abs(float(value)) <= 2.0**53):
            return Rejection(
                node,
                f"stage {stage.name}: public metric {key!r}={value!r} is not a finite "
                "number of magnitude <= 2**53",
            )
    got_round = metrics[SERVER_ROUND]
    if got_round != server_round:
        return Rejection(node, f"stale reply: '{SERVER_ROUND}'={got_round!r} != {server_round}")
    got_stage = metrics[SECAGG_STAGE_KEY]
    if got_stage != int(stage):
        return Rejection(
            node, f"wrong stage: reply marked stage {got_stage!r}, expected {int(stage)}"
        )
    payload_key = SECAGG_MASKED_KEY if stage is Stage.masked_input else SECAGG_RECORD_KEY
    payload_type = ArrayRecord if stage is Stage.masked_input else ConfigRecord
    if not isinstance(content.get(payload_key), payload_type):
        return Rejection(
            node, f"stage {stage.name}: '{payload_key}' is not a {payload_type.__name__}"
        )
    return content


def _bytes_field(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"'{key}' must be bytes, got {type(value).__name__}")
    return value


def _split_fixed(raw: bytes, size: int, count: int, what: str) -> list[bytes]:
    if len(raw) != size * count:
        raise ValueError(f"{what}: {len(raw)} bytes, expected {count} x {size}")
    return [raw[i * size : (i + 1) * size] for i in range(count)]


def _payload_key_batch(content: RecordDict, count: int) -> list[PublicKeys]:
    """A stage-1 reply: ``count`` public key pairs, one per round from this one on."""
    rec = content.config_records[SECAGG_RECORD_KEY]
    size = crypto.KEY_BYTES
    c_pks = _split_fixed(_bytes_field(rec, SECAGG_REPLY_C_PK), size, count, SECAGG_REPLY_C_PK)
    s_pks = _split_fixed(_bytes_field(rec, SECAGG_REPLY_S_PK), size, count, SECAGG_REPLY_S_PK)
    return [PublicKeys(c, k) for c, k in zip(c_pks, s_pks, strict=True)]


def _payload_signed_key_batch(
    content: RecordDict, count: int
) -> tuple[list[PublicKeys], tuple[str, bytes]]:
    """A malicious-model stage-1 reply: the pairs with their signatures, and the
    sender's ``(roster identity, Ed25519 public key)`` (the server pre-checks
    consistency signatures with it; the clients trust only their roster)."""
    rec = content.config_records[SECAGG_RECORD_KEY]
    plain = _payload_key_batch(content, count)
    sigs = _split_fixed(
        _bytes_field(rec, SECAGG_REPLY_SIGNATURES),
        signing.SIGNATURE_BYTES,
        count,
        SECAGG_REPLY_SIGNATURES,
    )
    identity = rec.get(SECAGG_REPLY_IDENTITY)
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"'{SECAGG_REPLY_IDENTITY}' must be a non-empty string")
    key = _bytes_field(rec, SECAGG_REPLY_SIGNING_KEY)
    if len(key) != signing.PUBLIC_KEY_BYTES:
        raise ValueError(f"'{SECAGG_REPLY_SIGNING_KEY}' must be {signing.PUBLIC_KEY_BYTES} bytes")
    keys = [PublicKeys(k.c_pk, k.s_pk, identity, sig) for k, sig in zip(plain, sigs, strict=True)]
    return keys, (identity, key)


def _payload_signature(content: RecordDict) -> tuple[str, bytes]:
    """A consistency-stage reply: ``(roster identity, signature on U3)``."""
    rec = content.config_records[SECAGG_RECORD_KEY]
    sig = _bytes_field(rec, SECAGG_REPLY_SIGNATURES)
    identity = rec.get(SECAGG_REPLY_IDENTITY)
    if len(sig) != signing.SIGNATURE_BYTES or not isinstance(identity, str):
        raise ValueError("consistency reply needs one 64-byte signature and an identity")
    return identity, sig


def _payload_bundle(content: RecordDict) -> tuple[dict[int, bytes], bytes]:
    return _bundle(content.config_records[SECAGG_RECORD_KEY])


def _bundle(rec: ConfigRecord) -> tuple[dict[int, bytes], bytes]:
    """Stage-2 payload (own reply or share-ahead part): ``(recipient -> ciphertext,
    commitment to the sender's self-mask seed)``."""
    nodes = unpack_ids(_bytes_field(rec, SECAGG_REPLY_NODES), "recipients")
    cts = _split_fixed(
        _bytes_field(rec, SECAGG_REPLY_CIPHERTEXTS), CIPHERTEXT_BYTES, len(nodes), "ciphertexts"
    )
    if len(set(nodes)) != len(nodes):
        raise ValueError("a recipient is listed twice")
    commitment = _bytes_field(rec, SECAGG_REPLY_COMMITMENT)
    if len(commitment) != crypto.COMMITMENT_BYTES:
        raise ValueError(f"'{SECAGG_REPLY_COMMITMENT}' must be {crypto.COMMITMENT_BYTES} bytes")
    return dict(zip(nodes, cts, strict=True)), commitment


def _route(server: ServerSession, payloads: Mapping[int, tuple[dict[int, bytes], bytes]]) -> Any:
    """Feed parsed stage-2 payloads to the session: bundles, and commitments to check."""
    return server.route_shares(
        {u: p[0] for u, p in payloads.items()},
        commitments={u: p[1] for u, p in payloads.items()},
    )


def _payload_masked(content: RecordDict, bits: int, length: int) -> np.ndarray:
    """The masked vector of a stage-3 reply (bit-packed on the wire below 32/64 bits)."""
    rec = content.array_records[SECAGG_MASKED_KEY]
    if list(rec.keys()) != [SECAGG_MASKED_ARRAY]:
        raise ValueError(f"masked record must hold exactly '{SECAGG_MASKED_ARRAY}'")
    arr = rec[SECAGG_MASKED_ARRAY]
    dtype = np.dtype(np.uint8) if wire_packed(bits) else np.dtype(crypto.storage_dtype(bits))
    size = -(-length * bits // 8) if wire_packed(bits) else length
    if tuple(arr.shape) != (size,) or arr.dtype != str(dtype):
        raise ValueError(
            f"masked vector declared {arr.dtype}{list(arr.shape)}, expected {dtype}[{size}]"
        )
    try:
        y = array_view(arr.data, dtype, (size,))
    # Bytes from a process we do not control: any decoding failure means "malformed".
    except Exception as err:
        raise ValueError(f"masked vector does not decode: {type(err).__name__}: {err}") from None
    if wire_packed(bits):
        return unpack_ring(y, length, bits)
    return y


def _payload_unmask(content: RecordDict) -> UnmaskReply:
    rec = content.config_records[SECAGG_RECORD_KEY]
    out = []
    for nodes_key, shares_key in (
        (SECAGG_REPLY_SELF_MASK_NODES, SECAGG_REPLY_SELF_MASK_SHARES),
        (SECAGG_REPLY_KEY_NODES, SECAGG_REPLY_KEY_SHARES),
    ):
        nodes = unpack_ids(_bytes_field(rec, nodes_key), nodes_key)
        shares = _split_fixed(
            _bytes_field(rec, shares_key), shamir.SHARE_BYTES, len(nodes), shares_key
        )
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"'{nodes_key}' lists a node twice")
        out.append(dict(zip(nodes, shares, strict=True)))
    return UnmaskReply(self_mask_shares=out[0], key_shares=out[1])


@functools.lru_cache(maxsize=64)
def _params(
    n: int,
    mode: GraphMode,
    drop: float,
    corrupt: float,
    model: ServerModel,
    min_corrupt: int = MIN_CORRUPT_CLIENTS,
) -> SecAggParams:
    return derive_params(
        n,
        mode=mode,
        dropout_tolerance=drop,
        corrupt_fraction=corrupt,
        server_model=model,
        min_corrupt=min_corrupt,
    )


@dataclass
class _AheadPlan:
    """The next round's session after stage 1, and its stage-2 instructions by node."""

    rnd: int
    cohort: tuple[int, ...]
    server: ServerSession
    instructions: dict[int, ConfigRecord]


@dataclass
class _SharedAhead:
    """The next round's session after stage 2, with the shares to route at stage 3."""

    rnd: int
    cohort: tuple[int, ...]
    server: ServerSession
    routed: dict[int, dict[int, bytes]]
    missing: set[int] = field(default_factory=set)
    rejected: list[Rejection] = field(default_factory=list)


class SecureAggregation:
    """Runs the train stage of a round as the four-stage secure-aggregation protocol."""

    def __init__(self, settings: SecAggSettings, ddp: DdpPlan | None = None) -> None:
        self.settings = settings
        # node -> round -> public keys the node advertised ahead for that round (public
        # values; lost with the process, after which stage 1 simply runs again).
        self._round_keys: dict[int, dict[int, PublicKeys]] = {}
        # Stages 1-2 of the next round, run during this round's unmask exchange.
        self._ahead: _SharedAhead | None = None
        # Distributed DP: clients send rotated, rounded, noised vectors of ddp.padded
        # coordinates instead of the fixed-point layout; the server adds nothing.
        self.ddp = ddp
        # Malicious server model: node -> (roster identity, Ed25519 public key) it
        # advertised at stage 1 (public; used to drop bad consistency signatures).
        self._signers: dict[int, tuple[str, bytes]] = {}

    @property
    def malicious(self) -> bool:
        """Signed keys and the consistency-check round (secagg.server_model=malicious)."""
        return self.settings.server_model is ServerModel.malicious

    def _keys_for(self, rnd: int, cohort: Sequence[int]) -> dict[int, PublicKeys]:
        """Take the pairs advertised ahead for ``rnd``; drop every pair of a past round."""
        ahead: dict[int, PublicKeys] = {}
        for node in list(self._round_keys):
            rounds = self._round_keys[node]
            for r in [r for r in rounds if r < rnd]:
                del rounds[r]
            if not rounds:
                del self._round_keys[node]
        for u in cohort:
            keys = self._round_keys.get(u, {}).pop(rnd, None)
            if keys is not None:
                ahead[u] = keys
        return ahead

    def _key_stages(
        self,
        run: _StageRunner,
        server: ServerSession,
        rnd: int,
        cohort: list[int],
        pre_advertised: dict[int, PublicKeys],
        last_round: int | None,
        run_id: int,
    ) -> dict[int, dict[int, bytes]]:
        """Stages 1 (only nodes without a pair for this round) and 2; the routed shares."""
        horizon = self.settings.key_rounds
        if last_round is not None:
            horizon = max(1, min(horizon, last_round - rnd + 1))
        request_keys: dict[str, Any] = {SERVER_ROUND: rnd, SECAGG_KEY_ROUNDS: horizon}
        if self.malicious:
            # The run id the clients bind their signed pairs to (the round context's).
            request_keys[SECAGG_RUN_ID] = struct.pack(">Q", int(run_id) % 2**64)

        def parse(c: RecordDict) -> Any:
            if self.malicious:
                return _payload_signed_key_batch(c, horizon)
            return _payload_key_batch(c, horizon)

        def collect(raw: dict[int, Any]) -> Any:
            batches: dict[int, list[PublicKeys]] = {}
            for u, got in raw.items():
                if self.malicious:
                    batches[u], self._signers[u] = got
                else:
                    batches[u] = got
            for u, batch in batches.items():
                self._round_keys[u] = {rnd + i: k for i, k in enumerate(batch) if i}
            neighbours = server.collect_public_keys(
                {**pre_advertised, **{u: batch[0] for u, batch in batches.items()}}
            )
            if self.malicious and len(neighbours) != len(cohort):
                # Clients accept only the complete graph over the cohort they are told
                # (they cannot verify a server's claim of who dropped at stage 1).
                raise RoundAbandoned(
                    Stage.advertise,
                    f"{len(cohort) - len(neighbours)} of {len(cohort)} sampled clients gave "
                    "no valid signed keys; the malicious server model runs only with the "
                    "whole cohort at stage 2 (complete graph), so the round is abandoned",
                    server.rejections,
                )
            return neighbours

        keys = run.stage(
            Stage.advertise,
            {u: _config_only(request_keys) for u in cohort if u not in pre_advertised},
            parse,
            collect,
        )
        msgs = {
            u: _config_only(record)
            for u, record in self._share_key_instructions(server, rnd, keys).items()
        }
        routed: dict[int, dict[int, bytes]] = run.stage(
            Stage.share_keys, msgs, _payload_bundle, functools.partial(_route, server)
        )
        return routed

    def _share_key_instructions(
        self, server: ServerSession, rnd: int, keys: Mapping[int, Mapping[int, PublicKeys]]
    ) -> dict[int, dict[str, Any]]:
        """Stage-2 instruction of each node: the round's parameters and its neighbours' keys."""
        base = {
            SERVER_ROUND: rnd,
            SECAGG_CONTEXT: server.context,
            SECAGG_PARAMS: json.dumps(server.params.to_config(), sort_keys=True),
            SECAGG_BITS: server.bits,
            SECAGG_VECTOR_LENGTH: server.vector_length,
            SECAGG_COHORT: pack_ids(sorted(server.cohort)),
        }
        out: dict[int, dict[str, Any]] = {
            u: {
                **base,
                SECAGG_NODES: pack_ids(sorted(nk)),
                SECAGG_KEYS: b"".join(nk[v].c_pk + nk[v].s_pk for v in sorted(nk)),
            }
            for u, nk in keys.items()
        }
        if self.malicious:  # each client verifies these against its roster
            for u, nk in keys.items():
                out[u][SECAGG_IDENTITIES] = json.dumps([nk[v].identity for v in sorted(nk)])
                out[u][SECAGG_SIGNATURES] = b"".join(nk[v].signature for v in sorted(nk))
        return out

    def _plan_ahead(
        self,
        rnd: int,
        cohort: Sequence[int] | None,
        survivors: Sequence[int],
        run_id: int,
        length: int,
    ) -> _AheadPlan | None:
        """Stage 1 of round ``rnd`` from keys advertised ahead, and its stage-2 instructions.

        ``None`` (the round will run its own stages) unless every node of ``cohort``
        survived the current round and holds a key pair for ``rnd``.
        """
        s = self.settings
        if cohort is None or len(cohort) < 3 or not set(cohort) <= set(survivors):
            return None
        nodes = sorted(int(u) for u in cohort)
        if any(rnd not in self._round_keys.get(u, {}) for u in nodes):
            return None
        if self.ddp is not None and len(nodes) > self.ddp.max_cohort:
            return None
        try:
            params = _params(
                len(nodes),
                s.mode,
                s.dropout_tolerance,
                s.corrupt_fraction,
                s.server_model,
                s.min_corrupt(),
            )
        except SecAggConfigError:
            return None
        context = round_context(int(run_id) % 2**64, rnd)
        server = ServerSession(nodes, params, vector_length=length, bits=s.bits, context=context)
        keys = {u: self._round_keys[u].pop(rnd) for u in nodes}  # each pair serves once
        try:
            neighbours = server.collect_public_keys(keys)
        except RoundAbandoned as err:
            log.info("round %d: keys advertised ahead unusable (%s); full stages then", rnd, err)
            return None
        if self.malicious and len(neighbours) != len(nodes):
            return None  # the complete graph over the whole cohort only (see _key_stages)
        records = self._share_key_instructions(server, rnd, neighbours)
        return _AheadPlan(
            rnd, tuple(nodes), server, {u: ConfigRecord(r) for u, r in records.items()}
        )

    def _finish_ahead(self, plan: _AheadPlan, replies: Mapping[int, Any]) -> None:
        """Route the next round's shares that rode on this round's unmask replies."""
        bundles: dict[int, tuple[dict[int, bytes], bytes]] = {}
        rejected: list[Rejection] = []
        for u in plan.instructions:
            record = replies.get(u)
            if record is None:
                continue
            try:
                if not isinstance(record, ConfigRecord):
                    raise ValueError(f"'{SECAGG_NEXT_KEY}' is not a ConfigRecord")
                if record.get(SERVER_ROUND) != plan.rnd:
                    raise ValueError(f"'{SERVER_ROUND}'={record.get(SERVER_ROUND)!r} != {plan.rnd}")
                bundles[u] = _bundle(record)
            except (ValueError, KeyError, TypeError) as err:
                rejected.append(Rejection(u, f"stage share_keys (ahead): {err}"))
        for r in rejected:
            log.warning("round %d secagg: rejected node %d: %s", plan.rnd, r.node_id, r.reason)
        try:
            routed = _route(plan.server, bundles)
        except RoundAbandoned as err:
            log.info(
                "round %d: shares routed ahead fell short (%s); full stages then", plan.rnd, err
            )
            return
        self._ahead = _SharedAhead(
            plan.rnd,
            plan.cohort,
            plan.server,
            routed,
            missing=set(plan.instructions) - set(bundles),
            rejected=rejected,
        )

    def _take_ahead(
        self, rnd: int, cohort: Sequence[int], params: SecAggParams, length: int
    ) -> _SharedAhead | None:
        """The stages 1-2 run ahead for this round, if they match it exactly."""
        shared, self._ahead = self._ahead, None
        if shared is None:
            return None
        server = shared.server
        if (
            shared.rnd != rnd
            or shared.cohort != tuple(cohort)
            or server.params != params
            or server.vector_length != length
            or server.bits != self.settings.bits
        ):
            log.info("round %d: cohort or parameters changed; stages 1-2 run again", rnd)
            return None
        return shared

    def _forget_troubled(self, outcome: SecAggOutcome) -> None:
        """A node that failed, was rejected or went missing may have lost its key store
        (or holds another batch): its next round starts with stage 1 again."""
        nodes = set(outcome.missing)
        nodes.update(r.node_id for r in outcome.rejected)
        nodes.update(r.node_id for r in outcome.failed)
        for node in nodes:
            self._round_keys.pop(node, None)

    def _check_signatures(
        self, server: ServerSession, survivors: Sequence[int], replies: dict[int, Any]
    ) -> dict[int, tuple[str, bytes]]:
        """Keep the consistency signatures that verify under the key each node advertised
        (a faulty client's bad one would make every honest client refuse); abandon the
        round below the quorum the clients check (:func:`consistency_quorum`)."""
        good: dict[int, tuple[str, bytes]] = {}
        names: set[str] = set()
        for node, (identity, sig) in sorted(replies.items()):
            advertised = self._signers.get(node)
            keys = server.keys.get(node)
            ok = advertised is not None and advertised[0] == identity and identity not in names
            if ok and keys is not None:
                assert advertised is not None
                message = signing.survivors_message(
                    server.context, node, identity, keys.c_pk + keys.s_pk, survivors
                )
                ok = signing.verify_raw(advertised[1], message, sig)
            else:
                ok = False
            if not ok:
                server.rejections.append(
                    ProtocolRejection(node, Stage.consistency, "consistency signature invalid")
                )
                continue
            names.add(identity)
            good[node] = (identity, sig)
        need = consistency_quorum(server.params)
        if len(good) < need:
            raise RoundAbandoned(
                Stage.consistency,
                f"{len(good)} valid consistency signatures on the survivor set, fewer than "
                f"the {need} clients need (t={server.params.threshold}, > (n + C)/2)",
                server.rejections,
            )
        return good

    def encoding_bound(self, round_config: Mapping[str, Any], clip_key: str) -> float:
        """The round's L2 bound: the client-side DP clip norm, else ``secagg.clip``."""
        value = round_config.get(clip_key, self.settings.clip)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(
                "secure aggregation needs an encoding bound: client-side clipping "
                f"('{clip_key}') or secagg.clip; found {value!r}"
            )
        return float(value)

    def run_round(
        self,
        *,
        rnd: int,
        run_id: int,
        instructions: Sequence[Message],
        arrays: Mapping[str, np.ndarray],
        weighting: str,
        bound: float,
        exchange: Exchange,
        last_round: int | None = None,
        next_cohort: Callable[[set[int]], Sequence[int] | None] | None = None,
    ) -> SecAggOutcome:
        """Run stages 1-4 over the cohort addressed by ``instructions``.

        ``instructions`` are the strategy's train messages (arrays + config) for the
        sampled cohort; they become the stage-3 instructions. Stage 1 goes only to the
        nodes that hold no key pair for this round from an earlier stage 1 (none: no
        stage-1 exchange); it asks for ``settings.key_rounds`` rounds of pairs, never
        past ``last_round``.

        Share-ahead: ``next_cohort(exhausted)`` returns the cohort the driver will sample
        for the next round (``exhausted``: nodes that ran out of privacy budget in this
        one). If every node of it survives this round and holds a key pair for the next
        one, the next round's stage 2 rides on this round's stage-4 exchange and the next
        round starts at stage 3 (two exchanges a round). Otherwise, or if the next round's
        cohort turns out different, the next round runs its stages in full.
        """
        s = self.settings
        by_node = {int(m.metadata.dst_node_id): m for m in instructions}
        cohort = sorted(by_node)
        outcome = SecAggOutcome(decoded=None)
        if len(cohort) < 3:
            outcome.note = (
                f"secure aggregation needs >= 3 sampled clients, got {len(cohort)}: model unchanged"
            )
            return outcome
        try:
            params = _params(
                len(cohort),
                s.mode,
                s.dropout_tolerance,
                s.corrupt_fraction,
                s.server_model,
                s.min_corrupt(),
            )
        except SecAggConfigError as err:
            outcome.note = f"no secure-aggregation parameters for {len(cohort)} clients: {err}"
            return outcome
        outcome.params = params
        outcome.cohort_size = len(cohort)
        outcome.bits = s.bits
        layout = VectorLayout.from_arrays(arrays)
        ddp_round = None
        if self.ddp is not None:
            if len(cohort) > self.ddp.max_cohort:
                outcome.note = (
                    f"a cohort of {len(cohort)} exceeds the {self.ddp.max_cohort} clients the "
                    "distributed-DP ring was sized for (sampling randomness only): model unchanged"
                )
                return outcome
            ddp_round = self.ddp.round(len(cohort))
            if layout.num_params != ddp_round.dim:
                raise ValueError(
                    f"the model has {layout.num_params} parameters, the distributed-DP plan "
                    f"{ddp_round.dim}"
                )
            length = ddp_round.padded
        else:
            codec = round_codec(s.bits, bound, len(cohort))
            length = layout.length
        pre_advertised = self._keys_for(rnd, cohort)
        shared = self._take_ahead(rnd, cohort, params, length)
        if shared is not None:
            server = shared.server
        else:
            context = round_context(int(run_id) % 2**64, rnd)  # a fresh random nonce
            server = ServerSession(
                cohort, params, vector_length=length, bits=s.bits, context=context
            )
        # The clients' context (distributed DP's rotation is seeded from it).
        context = server.context
        run = _StageRunner(server, outcome, rnd, exchange, s.stage_timeout_s)
        try:
            if shared is not None:
                # Stages 1-2 ran during the previous round's unmask exchange.
                outcome.stages.append(StageLog(Stage.advertise, accepted=len(server.keys)))
                outcome.stages.append(StageLog(Stage.share_keys, accepted=len(shared.routed)))
                outcome.missing.update(shared.missing)
                outcome.rejected.extend(shared.rejected)
                run.absorb_rejections()
                routed = shared.routed
            else:
                routed = self._key_stages(
                    run, server, rnd, cohort, pre_advertised, last_round, run_id
                )
            # ---- 3: masked input (the train instruction)
            msgs = {}
            for u, cts in routed.items():
                instr = by_node[u].content
                msgs[u] = RecordDict(
                    {
                        ARRAYS_KEY: instr.array_records[ARRAYS_KEY],
                        CONFIG_KEY: ConfigRecord(
                            {
                                **instr.config_records[CONFIG_KEY],
                                SECAGG_NODES: pack_ids(sorted(cts)),
                                SECAGG_CIPHERTEXTS: b"".join(cts[v] for v in sorted(cts)),
                                SECAGG_BOUND: float(bound),
                                SECAGG_WEIGHTING: weighting,
                                SECAGG_MAX_WEIGHT: float(s.max_weight),
                                **(
                                    {SECAGG_DDP: ddp_round.to_json()}
                                    if ddp_round is not None
                                    else {}
                                ),
                            }
                        ),
                    }
                )
            request = run.stage(
                Stage.masked_input,
                msgs,
                lambda c: _payload_masked(c, s.bits, length),
                server.collect_masked_inputs,
            )
            outcome.dropouts = len(request.dropouts)
            if ddp_round is not None and len(request.survivors) < ddp_round.min_survivors:
                # Fewer noise shares than calibrated: the sum must never be unmasked.
                raise RoundAbandoned(
                    Stage.masked_input,
                    f"only {len(request.survivors)} masked inputs, distributed DP needs "
                    f"{ddp_round.min_survivors} (the sum would carry too little noise)",
                )
            # ---- 4: unmask
            lists: dict[str, Any] = {
                SERVER_ROUND: rnd,
                SECAGG_SURVIVORS: pack_ids(request.survivors),
                SECAGG_DROPOUTS: pack_ids(request.dropouts),
            }
            revealers = list(request.survivors)
            if self.malicious:
                # ---- consistency check: every survivor signs U3; >= t signatures go
                # to the signers, who verify them before revealing anything.
                check = {SERVER_ROUND: rnd, SECAGG_SURVIVORS: pack_ids(request.survivors)}
                signed: dict[int, tuple[str, bytes]] = run.stage(
                    Stage.consistency,
                    {u: _config_only(check) for u in request.survivors},
                    _payload_signature,
                    functools.partial(self._check_signatures, server, request.survivors),
                )
                revealers = sorted(signed)
                # The quorum is what a client needs (and checks, every one): sending
                # all |U4| would make each client verify up to n instead.
                proof = revealers[: consistency_quorum(server.params)]
                lists[SECAGG_SIGNERS] = pack_ids(proof)
                lists[SECAGG_IDENTITIES] = json.dumps([signed[u][0] for u in proof])
                lists[SECAGG_SIGNATURES] = b"".join(signed[u][1] for u in proof)
            plan = None
            if next_cohort is not None and (last_round is None or rnd < last_round):
                exhausted = {r.node_id for r in outcome.failed if r.code == BUDGET_EXHAUSTED}
                try:
                    upcoming = next_cohort(exhausted)
                # Only an optimisation: whatever goes wrong asking, this round goes on.
                except Exception as err:
                    log.warning("round %d: next cohort unknown (%r); no share-ahead", rnd, err)
                    upcoming = None
                plan = self._plan_ahead(rnd + 1, upcoming, request.survivors, run_id, length)
            contents = {u: _config_only(lists) for u in revealers}
            if plan is not None:
                for u, record in plan.instructions.items():
                    if u in contents:
                        contents[u][SECAGG_NEXT_KEY] = record

            def parse_unmask(c: RecordDict) -> tuple[UnmaskReply, Any]:
                return _payload_unmask(c), c.get(SECAGG_NEXT_KEY)

            def unmask(payloads: dict[int, tuple[UnmaskReply, Any]]) -> Any:
                total = server.unmask({u: p[0] for u, p in payloads.items()})
                if plan is not None:
                    self._finish_ahead(plan, {u: p[1] for u, p in payloads.items()})
                return total

            result = run.stage(
                Stage.unmask,
                contents,
                parse_unmask,
                unmask,
                optional=frozenset({SECAGG_NEXT_KEY}) if plan is not None else frozenset(),
            )
        except RoundAbandoned as err:
            run.absorb_rejections()
            outcome.note = f"{err}: model unchanged"
            log.warning("round %d: %s", rnd, outcome.note)
            return outcome
        finally:
            self._forget_troubled(outcome)
        t0 = time.perf_counter()
        n = result.num_contributors
        outcome.unmasked = True
        try:
            if ddp_round is not None:
                flat = ddp_round.decode(result.total, context, num_contributors=n)
                decoded_sum = DecodedSum(
                    layout.split_params(flat), float(n), 0.0, math.nan, math.nan
                )
            else:
                decoded_sum = _decode_checked(codec, layout, result.total, n, bound)
        # The sum is what the clients' vectors add up to: one faulty or malicious client
        # can make it undecodable, and that must end the round, never the run.
        except (ValueError, ArithmeticError) as err:
            outcome.note = (
                f"secure aggregation abandoned after unmasking: the sum of {n} inputs is not "
                f"one honest clients can produce ({err}): model unchanged"
            )
            log.warning("round %d: %s", rnd, outcome.note)
            return outcome
        finally:
            outcome.stages[-1].server_seconds += time.perf_counter() - t0
        outcome.decoded = decoded_sum
        outcome.num_contributors = n
        return outcome


def _decode_checked(
    codec: Any, layout: VectorLayout, total: np.ndarray, n: int, bound: float
) -> DecodedSum:
    """Decode the unmasked sum and check it against what ``n`` honest inputs can give.

    ``codec.decode_sum`` refuses magnitudes above ``n`` maximal encodings (a wrapped or
    shifted sum). Beyond that, honest inputs have weights in ``(0, 1]`` and
    ``||w·Δ|| <= C``, so ``Σ w > 0`` and ``||Σ w·Δ|| <= n·C`` up to the codec's slack and
    the stochastic rounding (``< 1/scale`` per coordinate and input). A sum outside these
    bounds raises ``ValueError`` (the round is abandoned): a client that did not clip, or
    that shifted its weight to zero or below, cannot skew the model past its bound nor
    make the mean divide by a non-positive weight.
    """
    decoded = codec.decode_sum(total, n)
    out: DecodedSum = layout.split_sum(decoded, bound)
    if not out.weight > 0:
        raise ValueError(f"decoded total weight {out.weight:.6g} is not > 0")
    # einsum, not np.dot: BLAS threads contend with the clients' on a shared machine.
    flat = [v.reshape(-1) for v in out.update.values()]
    sq = math.fsum(float(np.einsum("i,i->", v, v)) for v in flat)
    rounding = n * math.sqrt(layout.num_params) / codec.scale
    limit = n * bound * BOUND_SLACK + rounding
    if not math.sqrt(sq) <= limit:
        raise ValueError(
            f"decoded update sum has L2 norm {math.sqrt(sq):.6g}, above {limit:.6g} = "
            f"{n} inputs x clip {bound:g} (an input was not clipped)"
        )
    return out


def _config_only(config: Mapping[str, Any]) -> RecordDict:
    return RecordDict({CONFIG_KEY: ConfigRecord(dict(config))})


class _StageRunner:
    """Sends one stage, screens and parses its replies, feeds the server session."""

    def __init__(
        self,
        server: ServerSession,
        outcome: SecAggOutcome,
        rnd: int,
        exchange: Exchange,
        timeout: float,
    ) -> None:
        self.server = server
        self.outcome = outcome
        self.rnd = rnd
        self.exchange = exchange
        self.timeout = timeout
        self._seen_rejections = 0

    def absorb_rejections(self) -> None:
        """Copy the session's new rejections into the outcome (node then counts as dropped)."""
        new = self.server.rejections[self._seen_rejections :]
        self._seen_rejections = len(self.server.rejections)
        for r in new:
            rej = Rejection(r.node, f"stage {r.stage.name}: {r.reason}")
            self.outcome.rejected.append(rej)
            log.warning("round %d secagg: rejected node %d: %s", self.rnd, rej.node_id, rej.reason)

    def stage(
        self,
        stage: Stage,
        contents: Mapping[int, RecordDict],
        parse_payload: Callable[[RecordDict], Any],
        feed: Callable[[dict[int, Any]], Any],
        optional: frozenset[str] = frozenset(),
    ) -> Any:
        t0 = time.perf_counter()
        messages = []
        for node, content in sorted(contents.items()):
            content.config_records[CONFIG_KEY][SECAGG_STAGE_KEY] = int(stage)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        if messages:
            sent_msgs, replies, sent = self.exchange(messages, self.timeout)
        else:  # every node already holds what this stage would ask for
            sent_msgs, replies, sent = [], [], {}
        t1 = time.perf_counter()
        self.outcome.bytes_down += sum(payload_bytes(m.content) for m in sent_msgs)
        self.outcome.bytes_up += sum(payload_bytes(m.content) for m in replies if m.has_content())
        if stage is Stage.masked_input:
            self.outcome.masked_input_sent = sent_msgs
        log_entry = StageLog(stage, sent=len(sent))
        answered = {m.metadata.reply_to_message_id for m in replies} & set(sent)
        log_entry.replied = len(answered)
        self.outcome.missing.update(node for mid, node in sent.items() if mid not in answered)
        screened = screen_replies(replies, sent)
        payloads: dict[int, Any] = {}
        for msg in screened.accepted:
            parsed = parse_stage_reply(msg, server_round=self.rnd, stage=stage, optional=optional)
            if isinstance(parsed, Rejection):
                screened.rejected.append(parsed)
                continue
            node = int(msg.metadata.src_node_id)
            if stage is Stage.masked_input:
                public = {
                    k: float(cast(float, v))
                    for k, v in parsed[METRICS_KEY].items()
                    if k.startswith(PUBLIC_METRIC_PREFIX)
                }
                if public:
                    self.outcome.client_metrics[node] = public
            try:
                payloads[node] = parse_payload(parsed)
            except (ValueError, KeyError, TypeError) as err:
                screened.rejected.append(Rejection(node, f"stage {stage.name}: {err}"))
        for r in screened.rejected:
            log.warning("round %d secagg: rejected node %d: %s", self.rnd, r.node_id, r.reason)
        for r in screened.failed:
            log.warning("round %d secagg: node %d failed: %s", self.rnd, r.node_id, r.reason)
        self.outcome.rejected.extend(screened.rejected)
        self.outcome.failed.extend(screened.failed)
        self.outcome.stages.append(log_entry)
        try:
            result = feed(payloads)
        finally:
            self.absorb_rejections()
            t2 = time.perf_counter()
            log_entry.server_seconds = (t2 - t1) + 0.0
            log_entry.seconds = t2 - t0
        log_entry.accepted = _accepted_count(result)
        return result


def _accepted_count(result: Any) -> int:
    if isinstance(result, Mapping):
        return len(result)
    survivors = getattr(result, "survivors", None)
    return len(survivors) if survivors is not None else 0
