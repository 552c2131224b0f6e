"""Stages 1, 2, 4 and the consistency check (5): the torch-free client handlers.

:func:`handle_key_stage` dispatches on the stage marker; any failure wipes the session
and refuses with a :class:`~fl_app.secagg.client.state.SecAggStageError`. Share-ahead
(stage 2 of the next round riding on this round's unmask) is handled in :func:`_unmask`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message

from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.protocol import CONFIG_KEY, SERVER_ROUND
from fl_app.secagg import crypto, shamir, signing, wire
from fl_app.secagg.client.checks import (
    _check_consistency,
    _check_ddp_survivors,
    _check_malicious_round,
    _verify_neighbour_keys,
)
from fl_app.secagg.client.identity import (
    _check_run_id,
    _federation_size,
    _pinned_identity,
    effective_policy,
    site_identity_for_secagg,
)
from fl_app.secagg.client.state import (
    _BITS,
    _COHORT,
    _CORRUPT,
    _FLOOR,
    _IDENTITIES,
    _LENGTH,
    _OWN_KEYS,
    _PARAMS,
    _ROSTER,
    _ROUND,
    _SIGNED_U3,
    KEYS_STATE_KEY,
    SecAggStageError,
    _advance,
    _check_round,
    _get,
    _load,
    _params_from_json,
    _reply,
    _round_of,
    _save,
    wipe_state,
)
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.params import SecAggConfigError, SecAggParams, ServerModel
from fl_app.secagg.protocol import ClientRefusal, PublicKeys, Stage, StageOrderError
from fl_app.secagg.vector import pack_ids, unpack_ids

__all__ = ["handle_key_stage"]


def handle_key_stage(
    msg: Message, context: Context, stage: int, policy: SitePolicy | None = None
) -> Message:
    """Stages 1, 2 and 4 (torch-free). Any failure wipes the state and refuses.

    ``policy``: the site's policy (its secure-aggregation floor); ``None`` applies the
    safe defaults of :class:`~fl_app.client.policy.SitePolicy`.
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None:
        wipe_state(context)
        raise SecAggStageError(f"instruction lacks '{CONFIG_KEY}'")
    site = effective_policy(context, policy) or SitePolicy()
    try:
        if stage in (Stage.advertise, Stage.unmask, Stage.consistency):
            _check_round(context, _round_of(config), Stage(stage))  # stage 2: in its payload
        if stage == Stage.advertise:
            return _advertise(msg, context, config)
        if stage == Stage.share_keys:
            return _share_keys(msg, context, config, site)
        if stage == Stage.consistency:
            return _consistency(msg, context, config, site)
        if stage == Stage.unmask:
            return _unmask(msg, context, config, site)
        raise SecAggStageError(f"stage {stage} is not a key-exchange stage")
    except PolicyViolation as err:
        wipe_state(context)
        raise SecAggStageError.from_violation(err) from err
    except (ClientRefusal, StageOrderError, ValueError) as err:
        wipe_state(context)
        raise SecAggStageError(str(err)) from err
    except SecAggStageError:
        wipe_state(context)
        raise


def _advertise(msg: Message, context: Context, config: Mapping[str, Any]) -> Message:
    """Stage 1: draw one key pair per round for ``key-rounds`` rounds from this one."""
    wipe_state(context)  # a new round: whatever the last one left is gone
    rnd = _round_of(config)
    count = _get(config, wire.SECAGG_KEY_ROUNDS, int)
    if not 1 <= count <= wire.SECAGG_MAX_KEY_ROUNDS:
        raise SecAggStageError(
            f"'{wire.SECAGG_KEY_ROUNDS}'={count}: key pairs can be drawn for 1 to "
            f"{wire.SECAGG_MAX_KEY_ROUNDS} rounds ahead"
        )
    # Malicious server model: each pair is signed for (run, round, node, identity).
    run_raw = config.get(wire.SECAGG_RUN_ID)
    ident = None
    if run_raw is not None:
        if not isinstance(run_raw, bytes) or len(run_raw) != 8:
            raise SecAggStageError(f"'{wire.SECAGG_RUN_ID}' must be 8 bytes")
        _check_run_id(context, int.from_bytes(run_raw, "big"), wire.SECAGG_RUN_ID)
        ident = site_identity_for_secagg(context)
    node = int(context.node_id)
    store: dict[str, bytes] = {}
    c_pks, s_pks, sigs = [], [], []
    for r in range(rnd, rnd + count):
        c_sk, s_sk = crypto.generate_private_key(), crypto.generate_private_key()
        store[f"r{r}"] = crypto.private_key_bytes(c_sk) + crypto.private_key_bytes(s_sk)
        c_pks.append(crypto.public_key_bytes(c_sk))
        s_pks.append(crypto.public_key_bytes(s_sk))
        if ident is not None:
            assert isinstance(run_raw, bytes)
            message = signing.key_advert_message(
                int.from_bytes(run_raw, "big"), r, node, ident.signer.identity, c_pks[-1], s_pks[-1]
            )
            sigs.append(ident.signer.sign(message))
    # Replaces every pair of an earlier batch: the server now knows only these.
    context.state[KEYS_STATE_KEY] = ConfigRecord(cast(dict[str, Any], store))
    _advance(context, rnd)
    payload = ConfigRecord(
        {wire.SECAGG_REPLY_C_PK: b"".join(c_pks), wire.SECAGG_REPLY_S_PK: b"".join(s_pks)}
    )
    if ident is not None:
        payload[wire.SECAGG_REPLY_SIGNATURES] = b"".join(sigs)
        payload[wire.SECAGG_REPLY_IDENTITY] = ident.signer.identity
        payload[wire.SECAGG_REPLY_SIGNING_KEY] = ident.signer.public_bytes()
    return _reply(msg, rnd, Stage.advertise, payload)


def _take_round_keys(context: Context, rnd: int) -> tuple[Any, Any]:
    """Remove and return round ``rnd``'s key pair; drop every pair of an earlier round.

    A pair leaves the store before it is used, so no two protocol runs ever share one.
    """
    record = context.state.get(KEYS_STATE_KEY)
    store: dict[str, Any] = dict(record) if isinstance(record, ConfigRecord) else {}
    raw = store.pop(f"r{rnd}", None)
    for name in list(store):
        if not name.startswith("r") or not name[1:].isdigit() or int(name[1:]) < rnd:
            del store[name]
    if store:
        context.state[KEYS_STATE_KEY] = ConfigRecord(store)
    elif KEYS_STATE_KEY in context.state:
        del context.state[KEYS_STATE_KEY]
    if not isinstance(raw, bytes) or len(raw) != 2 * crypto.KEY_BYTES:
        raise SecAggStageError(
            f"no unused key pair for round {rnd}: this client advertised none for it, or "
            "already used it (a replayed share-keys instruction); the server asks for new "
            "keys (stage 1) the next time it samples this client"
        )
    return (
        crypto.private_key_from_bytes(raw[: crypto.KEY_BYTES]),
        crypto.private_key_from_bytes(raw[crypto.KEY_BYTES :]),
    )


def _share_keys(
    msg: Message, context: Context, config: Mapping[str, Any], policy: SitePolicy
) -> Message:
    """Stage 2: open the round's session with its advertised pair; share ``b_u`` and ``s_sk``."""
    rnd = _round_of(config)
    return _reply(msg, rnd, Stage.share_keys, _share_keys_payload(context, config, policy))


def _checked_params(config: Mapping[str, Any], policy: SitePolicy) -> tuple[str, SecAggParams]:
    """The round's parameters (JSON and parsed), re-derived and checked against the
    site's floor."""
    params_json = _get(config, wire.SECAGG_PARAMS, str)
    try:
        params = _params_from_json(params_json)
    except (SecAggConfigError, ValueError) as err:
        raise SecAggStageError(f"secure-aggregation parameters refused: {err}") from err
    try:
        policy.check_secagg_params(params)
    except PolicyViolation as err:
        raise SecAggStageError.from_violation(err) from err
    return params_json, params


def _neighbour_keys(config: Mapping[str, Any]) -> tuple[list[int], dict[int, PublicKeys]]:
    """The stage-2 neighbour list and each neighbour's advertised ``(c_pk, s_pk)``."""
    nodes = unpack_ids(_get(config, wire.SECAGG_NODES, bytes), "neighbours")
    raw = _get(config, wire.SECAGG_KEYS, bytes)
    size = 2 * crypto.KEY_BYTES
    if len(raw) != size * len(nodes) or len(set(nodes)) != len(nodes):
        raise SecAggStageError("neighbour keys do not match the neighbour list")
    keys = {
        v: PublicKeys(
            raw[i * size : i * size + crypto.KEY_BYTES],
            raw[i * size + crypto.KEY_BYTES : (i + 1) * size],
        )
        for i, v in enumerate(nodes)
    }
    return nodes, keys


def _share_keys_payload(
    context: Context, config: Mapping[str, Any], policy: SitePolicy
) -> ConfigRecord:
    # long: every check on the round precedes the first encrypted share, in one place.
    wipe_state(context)  # the round's session starts here
    rnd = _round_of(config)
    _check_round(context, rnd, Stage.share_keys)
    round_keys = _take_round_keys(context, rnd)
    params_json, params = _checked_params(config, policy)
    bits = _get(config, wire.SECAGG_BITS, int)
    length = _get(config, wire.SECAGG_VECTOR_LENGTH, int)
    cohort_raw = _get(config, wire.SECAGG_COHORT, bytes)
    cohort = unpack_ids(cohort_raw, "cohort")
    node = int(context.node_id)
    if node not in cohort:
        raise SecAggStageError(f"this node ({node}) is not in the round's cohort")
    if len(cohort) != params.num_clients or len(set(cohort)) != len(cohort):
        raise SecAggStageError(
            f"cohort of {len(cohort)} ids does not match params num_clients={params.num_clients}"
        )
    session = ClientSession(
        node,
        _get(config, wire.SECAGG_CONTEXT, bytes),
        params,
        vector_length=length,
        bits=bits,
        cohort=cohort,
    )
    own_keys = session.advertise(round_keys)
    meta = {
        _ROUND: rnd,
        _PARAMS: params_json,
        _BITS: bits,
        _LENGTH: length,
        _COHORT: cohort_raw,
        _FLOOR: policy.survivor_floor(len(cohort)),
    }
    nodes, keys = _neighbour_keys(config)
    if params.server_model is ServerModel.malicious:
        # Before any share is encrypted: the complete graph over the cohort, thresholds
        # that survive this client's own colluder bound, every key signed on the roster.
        _check_run_id(context, signing.parse_context(session.context)[0], "round context")
        ident = site_identity_for_secagg(context)
        meta[_CORRUPT] = _check_malicious_round(
            params, cohort, node, nodes, policy, _federation_size(context, ident)
        )
        names = _verify_neighbour_keys(ident, session.context, rnd, nodes, keys, config)
        names[node] = ident.signer.identity
        if isinstance(ident.roster, signing.FileRoster):
            meta[_ROSTER] = ident.roster.digest()
        meta[_IDENTITIES] = json.dumps({str(v): n for v, n in sorted(names.items())})
        meta[_OWN_KEYS] = own_keys.c_pk + own_keys.s_pk
    cts = session.share_keys(keys)
    _save(context, session, meta)
    _advance(context, rnd)
    order = sorted(cts)
    assert session.commitment is not None
    return ConfigRecord(
        {
            SERVER_ROUND: rnd,
            wire.SECAGG_REPLY_NODES: pack_ids(order),
            wire.SECAGG_REPLY_CIPHERTEXTS: b"".join(cts[v] for v in order),
            wire.SECAGG_REPLY_COMMITMENT: session.commitment,
        }
    )


def _consistency(
    msg: Message, context: Context, config: Mapping[str, Any], policy: SitePolicy
) -> Message:
    """Consistency check (malicious server model): sign the survivor set ``U3``, once.

    The set passes the stage-4 checks first (ids in the cohort, no repeats, this client
    and its neighbours that shared, the survivor floor); the client signs one set per
    round only, so a server cannot collect its signature on two different sets.
    """
    rnd = _round_of(config)
    session, meta = _load(context, rnd, Stage.consistency)
    if session.params.server_model is not ServerModel.malicious:
        raise SecAggStageError("a consistency check in a round without the malicious model")
    if _SIGNED_U3 in meta:
        raise SecAggStageError(f"this client already signed a survivor set for round {rnd}")
    survivors = unpack_ids(_get(config, wire.SECAGG_SURVIVORS, bytes), "survivors")
    _check_ddp_survivors(session, meta, survivors)
    session.check_lists(survivors, (), int(meta.get(_FLOOR, 0)), Stage.consistency)
    ident = _pinned_identity(context, meta)
    node = int(context.node_id)
    own_keys = meta.get(_OWN_KEYS)
    if not isinstance(own_keys, bytes):
        raise SecAggStageError("no round keys saved for the consistency signature")
    message = signing.survivors_message(
        session.context, node, ident.signer.identity, own_keys, survivors
    )
    meta[_SIGNED_U3] = pack_ids(sorted(set(survivors)))
    _save(context, session, meta)
    payload = ConfigRecord(
        {
            wire.SECAGG_REPLY_SIGNATURES: ident.signer.sign(message),
            wire.SECAGG_REPLY_IDENTITY: ident.signer.identity,
        }
    )
    return _reply(msg, rnd, Stage.consistency, payload)


def _unmask(
    msg: Message, context: Context, config: Mapping[str, Any], policy: SitePolicy
) -> Message:
    rnd = _round_of(config)
    session, meta = _load(context, rnd, Stage.unmask)
    survivors = unpack_ids(_get(config, wire.SECAGG_SURVIVORS, bytes), "survivors")
    dropouts = unpack_ids(_get(config, wire.SECAGG_DROPOUTS, bytes), "dropouts")
    _check_ddp_survivors(session, meta, survivors)  # the cheap check first
    if session.params.server_model is ServerModel.malicious:
        _check_consistency(context, session, meta, config, survivors)
    # The client's own floor; the session also refuses ids outside the cohort.
    floor = int(meta.get(_FLOOR, 0))
    reply = session.unmask(survivors, dropouts, min_survivors=floor)  # wipes the session
    wipe_state(context)
    b_nodes = sorted(reply.self_mask_shares)
    s_nodes = sorted(reply.key_shares)
    payload = ConfigRecord(
        {
            wire.SECAGG_REPLY_SELF_MASK_NODES: pack_ids(b_nodes),
            wire.SECAGG_REPLY_SELF_MASK_SHARES: b"".join(
                reply.self_mask_shares[v] for v in b_nodes
            ),
            wire.SECAGG_REPLY_KEY_NODES: pack_ids(s_nodes),
            wire.SECAGG_REPLY_KEY_SHARES: b"".join(reply.key_shares[v] for v in s_nodes),
        }
    )
    assert all(len(s) == shamir.SHARE_BYTES for s in reply.self_mask_shares.values())
    out = _reply(msg, rnd, Stage.unmask, payload)
    ahead = msg.content.config_records.get(wire.SECAGG_NEXT_KEY)
    if ahead is not None:
        # Share-ahead: stage 2 of the next round rides on this exchange. This round is
        # already answered; a refusal here only leaves the next round without us.
        try:
            if _round_of(ahead) != rnd + 1:
                raise SecAggStageError(
                    f"share-ahead instruction for round {ahead.get(SERVER_ROUND)!r}, "
                    f"expected {rnd + 1}"
                )
            out.content[wire.SECAGG_NEXT_KEY] = _share_keys_payload(context, ahead, policy)
        except (ClientRefusal, StageOrderError, ValueError, SecAggStageError):
            wipe_state(context)
    return out
