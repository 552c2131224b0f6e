"""The server's side of the wire: stage instructions it builds and stage replies it parses.

A reply is screened (:func:`parse_stage_reply`: exact record keys, only protocol and
public ``dp-*`` metrics in plaintext, the right round and stage), then its payload is
parsed; a malformed payload raises ``ValueError`` and the node counts as dropped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_app.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, PUBLIC_METRIC_PREFIX, SERVER_ROUND
from fl_app.secagg import crypto, shamir, signing, wire
from fl_app.secagg.protocol import CIPHERTEXT_BYTES, PublicKeys, Stage, UnmaskReply
from fl_app.secagg.server_session import ServerSession
from fl_app.secagg.vector import pack_ids, unpack_ids
from fl_app.weights import array_view
from strategies.validation import Rejection

log = logging.getLogger("fl_app.secagg")


STAGE_RECORDS = {
    Stage.advertise: frozenset({METRICS_KEY, wire.SECAGG_RECORD_KEY}),
    Stage.share_keys: frozenset({METRICS_KEY, wire.SECAGG_RECORD_KEY}),
    Stage.masked_input: frozenset({METRICS_KEY, wire.SECAGG_MASKED_KEY}),
    Stage.unmask: frozenset({METRICS_KEY, wire.SECAGG_RECORD_KEY}),
    Stage.consistency: frozenset({METRICS_KEY, wire.SECAGG_RECORD_KEY}),
}


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
    want = STAGE_RECORDS[stage]
    if not want <= keys or keys - want - optional:
        return Rejection(node, f"stage {stage.name}: record keys {sorted(keys)} != {sorted(want)}")
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord):
        return Rejection(node, f"stage {stage.name}: '{METRICS_KEY}' is not a MetricRecord")
    protocol = {SERVER_ROUND, wire.SECAGG_STAGE_KEY}
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
    got_stage = metrics[wire.SECAGG_STAGE_KEY]
    if got_stage != int(stage):
        return Rejection(
            node, f"wrong stage: reply marked stage {got_stage!r}, expected {int(stage)}"
        )
    payload_key = wire.SECAGG_MASKED_KEY if stage is Stage.masked_input else wire.SECAGG_RECORD_KEY
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


def payload_key_batch(content: RecordDict, count: int) -> list[PublicKeys]:
    """A stage-1 reply: ``count`` public key pairs, one per round from this one on."""
    rec = content.config_records[wire.SECAGG_RECORD_KEY]
    size = crypto.KEY_BYTES
    c_pks = _split_fixed(
        _bytes_field(rec, wire.SECAGG_REPLY_C_PK), size, count, wire.SECAGG_REPLY_C_PK
    )
    s_pks = _split_fixed(
        _bytes_field(rec, wire.SECAGG_REPLY_S_PK), size, count, wire.SECAGG_REPLY_S_PK
    )
    return [PublicKeys(c, k) for c, k in zip(c_pks, s_pks, strict=True)]


def payload_signed_key_batch(
    content: RecordDict, count: int
) -> tuple[list[PublicKeys], tuple[str, bytes]]:
    """A malicious-model stage-1 reply: the pairs with their signatures, and the
    sender's ``(roster identity, Ed25519 public key)`` (the server pre-checks
    consistency signatures with it; the clients trust only their roster)."""
    rec = content.config_records[wire.SECAGG_RECORD_KEY]
    plain = payload_key_batch(content, count)
    sigs = _split_fixed(
        _bytes_field(rec, wire.SECAGG_REPLY_SIGNATURES),
        signing.SIGNATURE_BYTES,
        count,
        wire.SECAGG_REPLY_SIGNATURES,
    )
    identity = rec.get(wire.SECAGG_REPLY_IDENTITY)
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"'{wire.SECAGG_REPLY_IDENTITY}' must be a non-empty string")
    key = _bytes_field(rec, wire.SECAGG_REPLY_SIGNING_KEY)
    if len(key) != signing.PUBLIC_KEY_BYTES:
        raise ValueError(
            f"'{wire.SECAGG_REPLY_SIGNING_KEY}' must be {signing.PUBLIC_KEY_BYTES} bytes"
        )
    keys = [PublicKeys(k.c_pk, k.s_pk, identity, sig) for k, sig in zip(plain, sigs, strict=True)]
    return keys, (identity, key)


def payload_signature(content: RecordDict) -> tuple[str, bytes]:
    """A consistency-stage reply: ``(roster identity, signature on U3)``."""
    rec = content.config_records[wire.SECAGG_RECORD_KEY]
    sig = _bytes_field(rec, wire.SECAGG_REPLY_SIGNATURES)
    identity = rec.get(wire.SECAGG_REPLY_IDENTITY)
    if len(sig) != signing.SIGNATURE_BYTES or not isinstance(identity, str):
        raise ValueError("consistency reply needs one 64-byte signature and an identity")
    return identity, sig


def payload_bundle(content: RecordDict) -> tuple[dict[int, bytes], bytes]:
    return parse_bundle(content.config_records[wire.SECAGG_RECORD_KEY])


def parse_bundle(rec: ConfigRecord) -> tuple[dict[int, bytes], bytes]:
    """Stage-2 payload (own reply or share-ahead part): ``(recipient -> ciphertext,
    commitment to the sender's self-mask seed)``."""
    nodes = unpack_ids(_bytes_field(rec, wire.SECAGG_REPLY_NODES), "recipients")
    cts = _split_fixed(
        _bytes_field(rec, wire.SECAGG_REPLY_CIPHERTEXTS),
        CIPHERTEXT_BYTES,
        len(nodes),
        "ciphertexts",
    )
    if len(set(nodes)) != len(nodes):
        raise ValueError("a recipient is listed twice")
    commitment = _bytes_field(rec, wire.SECAGG_REPLY_COMMITMENT)
    if len(commitment) != crypto.COMMITMENT_BYTES:
        raise ValueError(
            f"'{wire.SECAGG_REPLY_COMMITMENT}' must be {crypto.COMMITMENT_BYTES} bytes"
        )
    return dict(zip(nodes, cts, strict=True)), commitment


def route_shares(
    server: ServerSession, payloads: Mapping[int, tuple[dict[int, bytes], bytes]]
) -> Any:
    """Feed parsed stage-2 payloads to the session: bundles, and commitments to check."""
    return server.route_shares(
        {u: p[0] for u, p in payloads.items()},
        commitments={u: p[1] for u, p in payloads.items()},
    )


def payload_masked(content: RecordDict, bits: int, length: int) -> np.ndarray:
    """The masked vector of a stage-3 reply (bit-packed on the wire below 32/64 bits)."""
    rec = content.array_records[wire.SECAGG_MASKED_KEY]
    if list(rec.keys()) != [wire.SECAGG_MASKED_ARRAY]:
        raise ValueError(f"masked record must hold exactly '{wire.SECAGG_MASKED_ARRAY}'")
    arr = rec[wire.SECAGG_MASKED_ARRAY]
    dtype = np.dtype(np.uint8) if wire.wire_packed(bits) else np.dtype(crypto.storage_dtype(bits))
    size = -(-length * bits // 8) if wire.wire_packed(bits) else length
    if tuple(arr.shape) != (size,) or arr.dtype != str(dtype):
        raise ValueError(
            f"masked vector declared {arr.dtype}{list(arr.shape)}, expected {dtype}[{size}]"
        )
    try:
        y = array_view(arr.data, dtype, (size,))
    # Bytes from a process we do not control: any decoding failure means "malformed".
    except Exception as err:
        raise ValueError(f"masked vector does not decode: {type(err).__name__}: {err}") from None
    if wire.wire_packed(bits):
        return wire.unpack_ring(y, length, bits)
    return y


def payload_unmask(content: RecordDict) -> UnmaskReply:
    rec = content.config_records[wire.SECAGG_RECORD_KEY]
    out = []
    for nodes_key, shares_key in (
        (wire.SECAGG_REPLY_SELF_MASK_NODES, wire.SECAGG_REPLY_SELF_MASK_SHARES),
        (wire.SECAGG_REPLY_KEY_NODES, wire.SECAGG_REPLY_KEY_SHARES),
    ):
        nodes = unpack_ids(_bytes_field(rec, nodes_key), nodes_key)
        shares = _split_fixed(
            _bytes_field(rec, shares_key), shamir.SHARE_BYTES, len(nodes), shares_key
        )
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"'{nodes_key}' lists a node twice")
        out.append(dict(zip(nodes, shares, strict=True)))
    return UnmaskReply(self_mask_shares=out[0], key_shares=out[1])


def config_only(config: Mapping[str, Any]) -> RecordDict:
    return RecordDict({CONFIG_KEY: ConfigRecord(dict(config))})


def share_key_instructions(
    server: ServerSession,
    rnd: int,
    keys: Mapping[int, Mapping[int, PublicKeys]],
    *,
    malicious: bool,
) -> dict[int, dict[str, Any]]:
    """Stage-2 instruction of each node: the round's parameters and its neighbours' keys."""
    base = {
        SERVER_ROUND: rnd,
        wire.SECAGG_CONTEXT: server.context,
        wire.SECAGG_PARAMS: json.dumps(server.params.to_config(), sort_keys=True),
        wire.SECAGG_BITS: server.bits,
        wire.SECAGG_VECTOR_LENGTH: server.vector_length,
        wire.SECAGG_COHORT: pack_ids(sorted(server.cohort)),
    }
    out: dict[int, dict[str, Any]] = {
        u: {
            **base,
            wire.SECAGG_NODES: pack_ids(sorted(nk)),
            wire.SECAGG_KEYS: b"".join(nk[v].c_pk + nk[v].s_pk for v in sorted(nk)),
        }
        for u, nk in keys.items()
    }
    if malicious:  # each client verifies these against its roster
        for u, nk in keys.items():
            out[u][wire.SECAGG_IDENTITIES] = json.dumps([nk[v].identity for v in sorted(nk)])
            out[u][wire.SECAGG_SIGNATURES] = b"".join(nk[v].signature for v in sorted(nk))
    return out


def masked_input_contents(
    by_node: Mapping[int, Message],
    routed: Mapping[int, Mapping[int, bytes]],
    bound: float,
    weighting: str,
    max_weight: float,
    ddp_round: Any,
) -> dict[int, RecordDict]:
    """Stage-3 instructions: each node's train instruction (arrays and config) plus the
    ciphertexts routed to it, the encoding bound, the weighting and, under distributed
    DP, the round's parameters (``ddp_round``, else ``None``)."""
    msgs = {}
    for u, cts in routed.items():
        instr = by_node[u].content
        msgs[u] = RecordDict(
            {
                ARRAYS_KEY: instr.array_records[ARRAYS_KEY],
                CONFIG_KEY: ConfigRecord(
                    {
                        **instr.config_records[CONFIG_KEY],
                        wire.SECAGG_NODES: pack_ids(sorted(cts)),
                        wire.SECAGG_CIPHERTEXTS: b"".join(cts[v] for v in sorted(cts)),
                        wire.SECAGG_BOUND: float(bound),
                        wire.SECAGG_WEIGHTING: weighting,
                        wire.SECAGG_MAX_WEIGHT: float(max_weight),
                        **({wire.SECAGG_DDP: ddp_round.to_json()} if ddp_round is not None else {}),
                    }
                ),
            }
        )
    return msgs
