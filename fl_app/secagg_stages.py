"""The ClientApp's side of secure aggregation: one handler per protocol stage.

The server's driver (:mod:`strategies.secagg`) sends four ``train`` messages per round,
each marked ``fl-app.secagg-stage``. Stages 1 (advertise keys), 2 (share keys) and 4
(unmask) are handled here without importing torch: under deployment Flower starts a
fresh ClientApp process per message, and key exchange must not pay for a torch import.
Stage 3 (masked input) trains through the usual pipeline in :mod:`fl_app.client_app`
and uses :class:`MaskedInputStage` for its encode and mask stages.

Key pairs ahead of time. Stage 1 asks for ``fl-app.secagg.key-rounds`` = ``h`` rounds:
the client draws ``h`` independent pairs ``(c_sk, s_sk)``, one per round ``r, ...,
r + h - 1``, keeps the private keys in ``Context.state[KEYS_STATE_KEY]`` and returns the
``2h`` public keys. The server stores them, so a later round in which this client is
sampled skips stage 1 for it (and the whole stage-1 exchange when every sampled client
has keys): a round costs three message exchanges instead of four (two with share-ahead,
below). Each pair is used by
exactly one round: stage 2 of round ``r`` takes the pair of ``r`` out of the store and
deletes it together with every pair of an earlier round, so a replayed or repeated
stage 2 for ``r`` finds no key and is refused, and revealing one round's ``s_sk`` (the
server reconstructs it when the client drops after sharing) tells nothing about any
other round's keys. A new stage 1 replaces the whole store (this is how a restarted
server, which lost the public keys, starts over). With ``secagg.key_rounds=1`` nothing
is kept beyond the round it was drawn for.

Share-ahead. A stage-4 instruction may carry, under ``secagg-next``, the stage-2
instruction of the next round (the server knows the next cohort ahead and every member
holds its pair). The client answers this round's unmask first, then runs the next round's
stage 2 and returns its payload under the same key; refusing that part (wrong round,
missing pair) only leaves this client out of the next round. The next round then starts
at stage 3 with the session stage 2 saved.

Between stages the client's :class:`~fl_app.secagg.ClientSession` lives in
``Context.state[STATE_KEY]`` (a ConfigRecord of bytes: keys, self-mask seed, shares).
That state holds secrets: ``b_u``, ``s_sk_u`` and ``c_sk_u`` leave it as soon as the
masked input is built (stage 3), the shares it holds for its neighbours after stage 4;
the whole state is deleted whenever stage 1 or 2 of a new round arrives and whenever a
stage fails. Only secrets of rounds that have not happened yet outlive a round: the
store of future rounds' private keys and, under share-ahead, the next round's session
from its stage 2 on. None ever reaches a log or a checkpoint (Flower keeps
``Context.state`` in the SuperNode's memory).

The client decides its own safety parameters (docs/architecture.md, Rules): the round's
``(k, t)``, fractions and bits are checked at stage 2 against the site's floor
(:class:`~fl_app.site_policy.SitePolicy`, safe defaults without a policy file),
distributed DP's ``n_min`` and noise at stage 3, and at stage 4 the survivor and
dropout lists against the cohort received at stage 2 (ids outside it, duplicates and
neighbours that never shared are refused) and the survivors counted against the
client's own floor. A refusal by the policy carries the field it names
(:attr:`SecAggStageError.field`).

Malicious server model (``params.server_model``, :mod:`fl_app.secagg.signing`): stage
1 signs every advertised pair for the run id the instruction names; stage 2 requires
the complete graph (neighbours = the cohort less this client), thresholds with
``t > C`` and ``2t > n + C`` for this site's own colluder bound, and verifies each
neighbour's signature against this site's roster (each identity once) before any share
is encrypted; the consistency stage (5) checks and signs the survivor set once per
round, bound to this client's round keys; stage 4 reveals only for exactly that set
and :func:`~fl_app.secagg.graph.consistency_quorum` valid signatures on it from distinct
roster identities of the cohort. The site's key and roster come from node config
``signing-key-path`` / ``roster-path`` (its key file private to its user and equal to
its roster entry; with either set, the site's minimum server model is ``malicious``
unless its policy names one); simulated partitions use the
:class:`~fl_app.secagg.signing.SimulationRoster`, only in a process a simulation entry
point marked.

Round monotonicity: ``Context.state[PROGRESS_STATE_KEY]`` records the latest round
this client took part in and the latest round it sent a masked input for. A stage for
an earlier round is refused, and so is stage 1, 2 or 3 of a round whose masked input
already left (a server cannot run one round twice, with and without a target client).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fl_app.protocol import (
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
from fl_app.secagg.graph import SecAggConfigError, SecAggParams, ServerModel, consistency_quorum
from fl_app.secagg.protocol import (
    CIPHERTEXT_BYTES,
    ClientRefusal,
    ClientSession,
    PublicKeys,
    Stage,
    StageOrderError,
)
from fl_app.secagg.vector import VectorLayout, client_weight, pack_ids, round_codec, unpack_ids
from fl_app.secagg.wire import pack_ring, wire_packed
from fl_app.site_policy import PolicyViolation, SitePolicy

__all__ = [
    "KEYS_STATE_KEY",
    "PROGRESS_STATE_KEY",
    "STATE_KEY",
    "MaskedInputStage",
    "SecAggStageError",
    "handle_key_stage",
    "secagg_stage",
    "wipe_state",
]

STATE_KEY = "fl-app.secagg"
# Private key pairs drawn ahead for future rounds: ConfigRecord {"r<round>": c_sk || s_sk}.
KEYS_STATE_KEY = "fl-app.secagg.round-keys"
# Round metadata stored beside ClientSession.to_state() (its keys never start with "_").
_ROUND = "_round"
_PARAMS = "_params"
_BITS = "_bits"
_LENGTH = "_vector-length"
_COHORT = "_cohort"
# Distributed DP: the fewest survivors whose noise shares this client counted on.
_MIN_SURVIVORS = "_ddp-min-survivors"
# The fewest survivors this client unmasks for (its site policy, from the cohort size).
_FLOOR = "_survivor-floor"
# Round monotonicity (not secret; survives wipes): {"seen": r, "masked": r}.
PROGRESS_STATE_KEY = "fl-app.secagg.progress"
# Malicious server model: neighbours' roster identities (JSON node -> identity, this
# client's own included) and the survivor set U3 this client signed (packed ids).
_IDENTITIES = "_identities"
_SIGNED_U3 = "_signed-u3"
# ... this client's own round keys c_pk || s_pk (its consistency signature binds them)
# and the colluders C it assumes (the larger of the round's and its policy's bound).
_OWN_KEYS = "_own-keys"
_CORRUPT = "_corrupt"
_ROSTER = "_roster-digest"  # the roster pinned at share-keys (malicious, deployed sites)
#: Node-config keys of a deployed site's signing identity (fl_app.secagg.signing).
SIGNING_KEY_PATH = "signing-key-path"
ROSTER_PATH = "roster-path"


class SecAggStageError(Exception):
    """This client refuses a secure-aggregation stage; the reason goes to the server.

    ``field`` names the site-policy field a refusal rests on (``None`` otherwise), so the
    ClientApp can send it as a structured policy refusal.
    """

    def __init__(self, message: str, field: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.detail = detail or message

    @classmethod
    def from_violation(cls, err: PolicyViolation) -> SecAggStageError:
        return cls(str(err), err.field, err.message)


def _progress(context: Context) -> tuple[int, int]:
    """``(latest round taken part in, latest round a masked input left)``; -1: none."""
    record = context.state.get(PROGRESS_STATE_KEY)
    if not isinstance(record, ConfigRecord):
        return -1, -1
    seen, masked = record.get("seen", -1), record.get("masked", -1)
    return (seen if isinstance(seen, int) else -1), (masked if isinstance(masked, int) else -1)


def _check_round(context: Context, rnd: int, stage: Stage) -> None:
    """Refuse a stage for a round this client moved past or already sent an input for."""
    seen, masked = _progress(context)
    if rnd < seen:
        raise SecAggStageError(
            f"stage {stage.name} for round {rnd}, but this client has moved on to round "
            f"{seen} (replayed or out-of-order instruction)"
        )
    if stage not in (Stage.unmask, Stage.consistency) and rnd <= masked:
        raise SecAggStageError(
            f"stage {stage.name} for round {rnd}: this client already sent its masked "
            f"input for round {masked} and takes part in each round once"
        )


def _advance(context: Context, rnd: int, *, masked: bool = False) -> None:
    seen, last_masked = _progress(context)
    context.state[PROGRESS_STATE_KEY] = ConfigRecord(
        {"seen": max(seen, rnd), "masked": max(last_masked, rnd) if masked else last_masked}
    )


def secagg_stage(msg: Message) -> int | None:
    """The stage marker of a train instruction, or ``None`` for a plain train message."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or SECAGG_STAGE_KEY not in config:
        return None
    value = config[SECAGG_STAGE_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2, 3, 4, 5):
        raise SecAggStageError(f"'{SECAGG_STAGE_KEY}' must be 1, 2, 3, 4 or 5, got {value!r}")
    return value


def wipe_state(context: Context) -> None:
    """Forget this client's secure-aggregation secrets."""
    if STATE_KEY in context.state:
        del context.state[STATE_KEY]


@functools.lru_cache(maxsize=16)
def _params_from_json(text: str) -> SecAggParams:
    # from_config re-derives (k, t) to check the server's values; cached per text.
    return SecAggParams.from_config(json.loads(text))


def _get(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SecAggStageError(f"'{key}' missing or of the wrong type ({type(value).__name__})")
    return value


def _round_of(config: Mapping[str, Any]) -> int:
    rnd = _get(config, SERVER_ROUND, int)
    assert isinstance(rnd, int)
    return rnd


def _reply(
    msg: Message,
    rnd: int,
    stage: Stage,
    payload: ConfigRecord | ArrayRecord,
    public: Mapping[str, float] | None = None,
) -> Message:
    key = SECAGG_MASKED_KEY if isinstance(payload, ArrayRecord) else SECAGG_RECORD_KEY
    metrics = MetricRecord({SERVER_ROUND: rnd, SECAGG_STAGE_KEY: int(stage), **(public or {})})
    return Message(RecordDict({key: payload, METRICS_KEY: metrics}), reply_to=msg)


def _save(context: Context, session: ClientSession, meta: Mapping[str, Any]) -> None:
    context.state[STATE_KEY] = ConfigRecord({**session.to_state(), **meta})


def _load(context: Context, rnd: int, stage: Stage) -> tuple[ClientSession, dict[str, Any]]:
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord):
        raise SecAggStageError(
            f"stage {stage.name} without a session: this client did not take part in "
            "stages 1-2 of this round (or its state was wiped)"
        )
    stored: dict[str, Any] = dict(record)
    if stored.get(_ROUND) != rnd:
        raise SecAggStageError(
            f"stage {stage.name} for round {rnd}, but this client's session is for round "
            f"{stored.get(_ROUND)!r} (replayed or out-of-order instruction)"
        )
    meta = {k: v for k, v in stored.items() if k.startswith("_")}
    try:
        session = ClientSession.from_state(
            {k: v for k, v in stored.items() if not k.startswith("_")},
            _params_from_json(meta[_PARAMS]),
            vector_length=int(meta[_LENGTH]),
            bits=int(meta[_BITS]),
            cohort=unpack_ids(meta[_COHORT], "cohort"),
        )
    except (KeyError, ValueError, SecAggConfigError) as err:
        raise SecAggStageError(f"stored secure-aggregation state is unusable: {err}") from err
    return session, meta


def handle_key_stage(
    msg: Message, context: Context, stage: int, policy: SitePolicy | None = None
) -> Message:
    """Stages 1, 2 and 4 (torch-free). Any failure wipes the state and refuses.

    ``policy``: the site's policy (its secure-aggregation floor); ``None`` applies the
    safe defaults of :class:`~fl_app.site_policy.SitePolicy`.
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


def effective_policy(context: Context, policy: SitePolicy | None) -> SitePolicy | None:
    """The policy this client applies to EVERY instruction (train, evaluate, each
    secure-aggregation stage): the site's policy file, with the floor of a site that
    holds a signing key or roster. ``None``: no policy file and no identity.

    A site with ``signing-key-path`` or ``roster-path`` has been set up for a server it
    does not trust. Unless its policy file says otherwise, it accepts only ``malicious``
    rounds (an ``honest_but_curious`` round would let that server downgrade it to
    thresholds that do not survive a split view and skip every signature check) and
    ``require_secure_aggregation`` is on: a plain train or a federated evaluation would
    hand that server the update or the per-client metrics without any secure
    aggregation at all, a bigger downgrade still. A site that wants either says so
    (``secagg_min_server_model: honest_but_curious``, ``require_secure_aggregation:
    false``).
    """
    cfg = context.node_config
    has_identity = bool(cfg.get(SIGNING_KEY_PATH) or cfg.get(ROSTER_PATH))
    if not has_identity:
        return policy
    site = policy if policy is not None else SitePolicy()
    if not site.secagg_min_server_model_explicit:
        site = dataclasses.replace(site, secagg_min_server_model="malicious")
    if not site.require_secure_aggregation_explicit:
        site = dataclasses.replace(site, require_secure_aggregation=True)
    return site


@dataclass(frozen=True)
class SiteIdentity:
    """This client's roster identity and signing key, and the roster it trusts."""

    signer: signing.Signer
    roster: signing.Roster


_SIMULATION_ROSTER: signing.SimulationRoster | None = None


def site_identity_for_secagg(context: Context) -> SiteIdentity:
    """The signing identity of this client (malicious server model).

    A deployed site: node config ``signing-key-path`` (``fl-app deploy node-key``),
    ``roster-path`` (the federation roster, distributed out of band) and ``site-name``
    (its roster identity). A simulated partition (no ``site-name`` or ``data-path``):
    ``partition-<id>`` in the :class:`~fl_app.secagg.signing.SimulationRoster` of the
    simulating process. Anything else is refused with the missing key named.
    """
    global _SIMULATION_ROSTER
    cfg = context.node_config
    key_path, roster_path = cfg.get(SIGNING_KEY_PATH), cfg.get(ROSTER_PATH)
    try:
        if key_path or roster_path:
            name = cfg.get("site-name")
            if not key_path or not roster_path or not name:
                raise SecAggStageError(
                    f"malicious server model: node config needs '{SIGNING_KEY_PATH}', "
                    f"'{ROSTER_PATH}' and 'site-name' together (found {SIGNING_KEY_PATH}="
                    f"{key_path!r}, {ROSTER_PATH}={roster_path!r}, site-name={name!r})"
                )
            signer = signing.Signer(str(name), signing.load_signing_key(str(key_path)))
            roster = signing.load_roster(str(roster_path))
            listed = roster.public_key(signer.identity)
            if listed is None or listed.public_bytes_raw() != signer.public_bytes():
                raise SecAggStageError(
                    f"malicious server model: this site's key {key_path} does not match the "
                    f"roster entry of site-name {name!r} in {roster_path} "
                    f"({'no such entry' if listed is None else 'another public key'}): its "
                    "signatures would verify nowhere; fix node config 'site-name' or "
                    f"'{SIGNING_KEY_PATH}', or the roster"
                )
            return SiteIdentity(signer, roster)
        if cfg.get("site-name") or cfg.get("data-path") or not signing.in_simulation():
            # Only a process a simulation entry point marked has simulated identities: a
            # deployed SuperNode (even one with only partition-id) must bring its own.
            raise SecAggStageError(
                "the round runs under secagg.server_model=malicious, which needs this site's "
                f"signing key and the federation roster: set node config '{SIGNING_KEY_PATH}' "
                f"(fl-app deploy node-key writes it), '{ROSTER_PATH}' and 'site-name'"
            )
        secret = signing.simulation_secret()
        if _SIMULATION_ROSTER is None or _SIMULATION_ROSTER.secret != secret:
            _SIMULATION_ROSTER = signing.SimulationRoster(secret)
        pid = int(cfg.get("partition-id", 0))
        return SiteIdentity(_SIMULATION_ROSTER.signer(f"partition-{pid}"), _SIMULATION_ROSTER)
    except (signing.RosterError, TypeError, ValueError) as err:
        raise SecAggStageError(f"malicious server model: {err}") from err


def _split_signatures(raw: object, count: int, what: str) -> list[bytes]:
    size = signing.SIGNATURE_BYTES
    if not isinstance(raw, bytes) or len(raw) != size * count:
        raise SecAggStageError(f"{what}: expected {count} signatures of {size} bytes")
    return [raw[i * size : (i + 1) * size] for i in range(count)]


def _identity_list(config: Mapping[str, Any], count: int) -> list[str]:
    try:
        names = json.loads(_get(config, SECAGG_IDENTITIES, str))
    except json.JSONDecodeError as err:
        raise SecAggStageError(f"'{SECAGG_IDENTITIES}' is not JSON: {err}") from err
    if not isinstance(names, list) or len(names) != count:
        raise SecAggStageError(f"'{SECAGG_IDENTITIES}' must list {count} identities")
    if not all(isinstance(x, str) for x in names):
        raise SecAggStageError(f"'{SECAGG_IDENTITIES}' must list strings")
    return names


def _verify_neighbour_keys(
    ident: SiteIdentity,
    context_bytes: bytes,
    rnd: int,
    nodes: list[int],
    keys: Mapping[int, PublicKeys],
    config: Mapping[str, Any],
) -> dict[int, str]:
    """Malicious server model, stage 2: every neighbour's key pair is signed by a distinct
    roster identity for this run, round and node (Bonawitz et al.'s signed
    advertisement); returns ``node -> identity``. The server cannot substitute keys."""
    run_id, ctx_round = signing.parse_context(context_bytes)
    if ctx_round != rnd:
        raise SecAggStageError(f"round context names round {ctx_round}, instruction {rnd}")
    names = _identity_list(config, len(nodes))
    sigs = _split_signatures(config.get(SECAGG_SIGNATURES), len(nodes), SECAGG_SIGNATURES)
    seen = {ident.signer.identity}
    out: dict[int, str] = {}
    for v, name, sig in zip(nodes, names, sigs, strict=True):
        if name in seen:
            raise SecAggStageError(
                f"roster identity {name!r} is used twice in this round's neighbourhood "
                f"(neighbour {v}): each site takes part once"
            )
        seen.add(name)
        message = signing.key_advert_message(run_id, rnd, v, name, keys[v].c_pk, keys[v].s_pk)
        if not ident.roster.verify(name, message, sig):
            raise SecAggStageError(
                f"the key pair of neighbour {v} is not signed by roster identity {name!r} "
                "for this run and round (substituted keys, or a site not on the roster)"
            )
        out[v] = name
    return out


def _advertise(msg: Message, context: Context, config: Mapping[str, Any]) -> Message:
    """Stage 1: draw one key pair per round for ``key-rounds`` rounds from this one."""
    wipe_state(context)  # a new round: whatever the last one left is gone
    rnd = _round_of(config)
    count = _get(config, SECAGG_KEY_ROUNDS, int)
    if not 1 <= count <= SECAGG_MAX_KEY_ROUNDS:
        raise SecAggStageError(
            f"'{SECAGG_KEY_ROUNDS}'={count}: key pairs can be drawn for 1 to "
            f"{SECAGG_MAX_KEY_ROUNDS} rounds ahead"
        )
    # Malicious server model: each pair is signed for (run, round, node, identity).
    run_raw = config.get(SECAGG_RUN_ID)
    ident = None
    if run_raw is not None:
        if not isinstance(run_raw, bytes) or len(run_raw) != 8:
            raise SecAggStageError(f"'{SECAGG_RUN_ID}' must be 8 bytes")
        _check_run_id(context, int.from_bytes(run_raw, "big"), SECAGG_RUN_ID)
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
    payload = ConfigRecord({SECAGG_REPLY_C_PK: b"".join(c_pks), SECAGG_REPLY_S_PK: b"".join(s_pks)})
    if ident is not None:
        payload[SECAGG_REPLY_SIGNATURES] = b"".join(sigs)
        payload[SECAGG_REPLY_IDENTITY] = ident.signer.identity
        payload[SECAGG_REPLY_SIGNING_KEY] = ident.signer.public_bytes()
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


def _share_keys_payload(
    context: Context, config: Mapping[str, Any], policy: SitePolicy
) -> ConfigRecord:
    wipe_state(context)  # the round's session starts here
    rnd = _round_of(config)
    _check_round(context, rnd, Stage.share_keys)
    round_keys = _take_round_keys(context, rnd)
    params_json = _get(config, SECAGG_PARAMS, str)
    try:
        params = _params_from_json(params_json)
    except (SecAggConfigError, ValueError) as err:
        raise SecAggStageError(f"secure-aggregation parameters refused: {err}") from err
    try:
        policy.check_secagg_params(params)
    except PolicyViolation as err:
        raise SecAggStageError.from_violation(err) from err
    bits = _get(config, SECAGG_BITS, int)
    length = _get(config, SECAGG_VECTOR_LENGTH, int)
    cohort_raw = _get(config, SECAGG_COHORT, bytes)
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
        _get(config, SECAGG_CONTEXT, bytes),
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
    nodes = unpack_ids(_get(config, SECAGG_NODES, bytes), "neighbours")
    raw = _get(config, SECAGG_KEYS, bytes)
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
            SECAGG_REPLY_NODES: pack_ids(order),
            SECAGG_REPLY_CIPHERTEXTS: b"".join(cts[v] for v in order),
            SECAGG_REPLY_COMMITMENT: session.commitment,
        }
    )


def _check_run_id(context: Context, run_id: int, where: str) -> None:
    """The run id this client signs for (key adverts, survivor sets) must be Flower's run
    id of the Context it runs in (mod 2^64, as the server packs it): a server cannot make
    it sign for a run it names (defence in depth; signatures stay bound to round keys)."""
    own = int(context.run_id) % 2**64
    if run_id != own:
        raise SecAggStageError(
            f"malicious server model: the {where} names run {run_id}, but this client "
            f"runs in Flower run {own}: refusing to sign for another run"
        )


def _pinned_identity(context: Context, meta: Mapping[str, Any]) -> SiteIdentity:
    """This client's identity, with the roster it verified the round's keys against at
    share-keys: a roster file changed since (identities added or swapped mid-round, so
    that new keys would vouch for survivor sets) is refused."""
    ident = site_identity_for_secagg(context)
    pinned = meta.get(_ROSTER)
    if isinstance(ident.roster, signing.FileRoster) or pinned is not None:
        now = ident.roster.digest() if isinstance(ident.roster, signing.FileRoster) else b""
        if now != pinned:
            raise SecAggStageError(
                "malicious server model: the roster "
                f"{context.node_config.get(ROSTER_PATH)} changed since this round's "
                "share-keys stage (its entries no longer match the ones the round's keys "
                "were verified against): refusing; change the roster only between rounds"
            )
    return ident


def _federation_size(context: Context, ident: SiteIdentity) -> int:
    """How many sites the colluder fraction is taken over: the roster's entries for a
    deployed site, ``num-partitions`` for a simulated one (0: unknown, the cohort then)."""
    if isinstance(ident.roster, signing.FileRoster):
        return len(ident.roster)
    raw = context.node_config.get("num-partitions", 0)
    return int(raw) if isinstance(raw, int) and not isinstance(raw, bool) else 0


def _check_malicious_round(
    params: SecAggParams,
    cohort: list[int],
    node: int,
    nodes: list[int],
    policy: SitePolicy,
    federation: int = 0,
) -> int:
    """Malicious server model, stage 2: refuse a round whose shape this client cannot trust.

    * The neighbourhood must be the whole cohort but this client (complete graph). A
      sparse graph is the server's choice and no client can check it was drawn fairly:
      a server that builds it (colluders next to a victim, or disjoint cliques) defeats
      the thresholds and learns inputs or partial sums. With the complete graph every
      cohort member's signed key reaches every client, so each one counted below is a
      verified, distinct roster identity, not an id the server made up.
    * ``C`` = the larger of the round's and this site's colluder bound
      ``max(floor(secagg_min_corrupt_fraction * N), secagg_min_corrupt_clients)``, with
      ``N`` the FEDERATION (roster entries, ``federation``; at least the cohort ``n``),
      not the cohort: the server picks the cohort, and a small one packed with the
      colluders it has would otherwise assume fewer of them than it holds (2 colluders
      of 20 sites in a 12-cohort whose fraction allowed 1 recovered a victim's input).
      Floor, because "at most a fraction f of the N sites collude" means at most
      ``floor(f*N)`` of them. ``t > C`` (the colluders' own shares stay below ``t``) and
      ``2t > n + C`` (a split view plus the colluders cannot fill both piles); a cohort
      too small for the federation's ``C`` is refused.

    Returns ``C``, which sizes the consistency quorum at unmask.
    """
    n, t = len(cohort), params.threshold
    expected = set(cohort) - {node}
    if set(nodes) != expected or not params.is_complete:
        raise SecAggStageError(
            f"malicious server model: {len(set(nodes) & expected)} of this client's "
            f"{len(expected)} cohort peers listed as neighbours ({len(set(nodes) - expected)} "
            "others): only the complete graph over the cohort is accepted, since a sparse "
            "graph is picked by the server and no client can verify it (run with "
            "secagg=secagg, the complete graph)"
        )
    size = max(n, int(federation))
    policy_c = max(
        math.floor(policy.secagg_min_corrupt_fraction * size + 1e-12),
        policy.secagg_min_corrupt_clients,
    )
    c = max(params.max_corrupt, policy_c)
    if t <= c or 2 * t <= n + c:
        raise SecAggStageError.from_violation(
            PolicyViolation(
                "secagg_min_corrupt_fraction",
                f"malicious server model: threshold t={t} with n={n} and C={c} "
                f"colluders (this site's bound: max(floor({policy.secagg_min_corrupt_fraction:g}"
                f" * {size} sites in the federation), {policy.secagg_min_corrupt_clients})) needs "
                "t > C and 2t > n + C: refusing to share (the fraction is over the roster, not "
                "the cohort; run with a larger cohort or a higher secagg.corrupt_fraction)",
            )
        )
    return c


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
    survivors = unpack_ids(_get(config, SECAGG_SURVIVORS, bytes), "survivors")
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
            SECAGG_REPLY_SIGNATURES: ident.signer.sign(message),
            SECAGG_REPLY_IDENTITY: ident.signer.identity,
        }
    )
    return _reply(msg, rnd, Stage.consistency, payload)


def _check_ddp_survivors(session: ClientSession, meta: Mapping[str, Any], survivors: Any) -> None:
    need = meta.get(_MIN_SURVIVORS)
    cohort = set(session.cohort or ())
    valid = len(set(survivors) & cohort)
    if need is not None and valid < int(need):
        # Unmasking fewer noise shares than calibrated would hand the server a sum
        # with too little noise: refuse, whatever the server claims. Only distinct
        # members of the cohort received at stage 2 count.
        raise SecAggStageError(
            f"distributed DP: {valid} survivors in the cohort, this client's noise share "
            f"assumed at least {need}; refusing to unmask"
        )


def _check_consistency(
    context: Context,
    session: ClientSession,
    meta: Mapping[str, Any],
    config: Mapping[str, Any],
    survivors: list[int],
) -> None:
    """Malicious server model, before any share leaves: the survivor list is exactly the
    ``U3`` this client signed, and :func:`~fl_app.secagg.graph.consistency_quorum`
    distinct roster identities of members of ``U3`` (more than ``(n + C) / 2``, at least
    ``t``) signed that same set, each bound to the round keys it shared with at stage 2
    (Bonawitz et al., consistency check)."""
    signed = meta.get(_SIGNED_U3)
    if not isinstance(signed, bytes):
        raise SecAggStageError(
            "no consistency check preceded this unmask (malicious server model): refusing"
        )
    u3 = unpack_ids(signed, "signed survivors")
    if len(survivors) != len(set(survivors)) or sorted(set(survivors)) != u3:
        raise SecAggStageError(
            "the unmask survivor list differs from the survivor set this client signed at "
            "the consistency check (a split view of who dropped): refusing"
        )
    signers = unpack_ids(_get(config, SECAGG_SIGNERS, bytes), "signers")
    names = _identity_list(config, len(signers))
    sigs = _split_signatures(config.get(SECAGG_SIGNATURES), len(signers), SECAGG_SIGNATURES)
    known = {int(k): v for k, v in json.loads(str(meta.get(_IDENTITIES, "{}"))).items()}
    round_keys = {v: pk.c_pk + pk.s_pk for v, pk in session.neighbour_keys.items()}
    own_keys = meta.get(_OWN_KEYS)
    if isinstance(own_keys, bytes):
        round_keys[session.node_id] = own_keys
    ident = _pinned_identity(context, meta)
    members = set(u3)
    used_nodes: set[int] = set()
    used_names: set[str] = set()
    for v, name, sig in zip(signers, names, sigs, strict=True):
        if v not in members:
            raise SecAggStageError(f"consistency signature from {v}, not a survivor")
        if v in used_nodes or name in used_names:
            raise SecAggStageError(
                f"consistency signatures: node {v} or roster identity {name!r} counted twice"
            )
        if v not in known or v not in round_keys or known[v] != name:
            raise SecAggStageError(
                f"consistency signature of node {v} under identity {name!r}, but it shared "
                f"keys as {known.get(v)!r} at stage 2 (only verified cohort members count)"
            )
        used_nodes.add(v)
        used_names.add(name)
        message = signing.survivors_message(session.context, v, name, round_keys[v], u3)
        if not ident.roster.verify(name, message, sig):
            raise SecAggStageError(
                f"the consistency signature of node {v} ({name!r}) does not verify on this "
                "client's survivor set (forged, or signed on a different set)"
            )
    need = consistency_quorum(session.params, int(meta.get(_CORRUPT, 0)))
    if len(used_nodes) < need:
        raise SecAggStageError(
            f"{len(used_nodes)} valid consistency signatures on the survivor set, fewer than "
            f"the {need} needed (t={session.params.threshold}, and more than (n + C)/2 so no "
            "other survivor set can also be unmasked): refusing to unmask"
        )


def _unmask(
    msg: Message, context: Context, config: Mapping[str, Any], policy: SitePolicy
) -> Message:
    rnd = _round_of(config)
    session, meta = _load(context, rnd, Stage.unmask)
    survivors = unpack_ids(_get(config, SECAGG_SURVIVORS, bytes), "survivors")
    dropouts = unpack_ids(_get(config, SECAGG_DROPOUTS, bytes), "dropouts")
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
            SECAGG_REPLY_SELF_MASK_NODES: pack_ids(b_nodes),
            SECAGG_REPLY_SELF_MASK_SHARES: b"".join(reply.self_mask_shares[v] for v in b_nodes),
            SECAGG_REPLY_KEY_NODES: pack_ids(s_nodes),
            SECAGG_REPLY_KEY_SHARES: b"".join(reply.key_shares[v] for v in s_nodes),
        }
    )
    assert all(len(s) == shamir.SHARE_BYTES for s in reply.self_mask_shares.values())
    out = _reply(msg, rnd, Stage.unmask, payload)
    ahead = msg.content.config_records.get(SECAGG_NEXT_KEY)
    if ahead is not None:
        # Share-ahead: stage 2 of the next round rides on this exchange. This round is
        # already answered; a refusal here only leaves the next round without us.
        try:
            if _round_of(ahead) != rnd + 1:
                raise SecAggStageError(
                    f"share-ahead instruction for round {ahead.get(SERVER_ROUND)!r}, "
                    f"expected {rnd + 1}"
                )
            out.content[SECAGG_NEXT_KEY] = _share_keys_payload(context, ahead, policy)
        except (ClientRefusal, StageOrderError, ValueError, SecAggStageError):
            wipe_state(context)
    return out


@dataclass
class MaskedInputStage:
    """Stage 3: the encode and mask stages of the train pipeline, and the reply.

    Built before training (so a missing or stale session fails before any work);
    :meth:`encode` turns the clipped update plus weight and metrics into the ring
    vector (:mod:`fl_app.secagg.vector`), :meth:`mask` adds the masks.
    """

    session: ClientSession
    meta: dict[str, Any]
    rnd: int
    ciphertexts: dict[int, bytes]
    bound: float
    weighting: str
    max_weight: float
    ddp: Any = None  # fl_app.privacy.distributed.DdpRound under distributed DP

    @classmethod
    def from_instruction(
        cls, msg: Message, context: Context, policy: SitePolicy | None = None
    ) -> MaskedInputStage:
        """Check the stage-3 instruction against the saved session and the site's floor."""
        config = msg.content.config_records.get(CONFIG_KEY)
        if config is None:
            raise SecAggStageError(f"instruction lacks '{CONFIG_KEY}'")
        site = policy if policy is not None else SitePolicy()
        try:
            rnd = _round_of(config)
            _check_round(context, rnd, Stage.masked_input)
            session, meta = _load(context, rnd, Stage.masked_input)
            senders = unpack_ids(_get(config, SECAGG_NODES, bytes), "senders")
            raw = _get(config, SECAGG_CIPHERTEXTS, bytes)
            if len(raw) != CIPHERTEXT_BYTES * len(senders) or len(set(senders)) != len(senders):
                raise SecAggStageError("ciphertexts do not match the sender list")
            cts = {
                v: raw[i * CIPHERTEXT_BYTES : (i + 1) * CIPHERTEXT_BYTES]
                for i, v in enumerate(senders)
            }
            bound = float(_get(config, SECAGG_BOUND, (int, float)))
            max_weight = float(_get(config, SECAGG_MAX_WEIGHT, (int, float)))
            weighting = _get(config, SECAGG_WEIGHTING, str)
            if not (math.isfinite(bound) and bound > 0):
                raise SecAggStageError(f"'{SECAGG_BOUND}' must be finite and > 0, got {bound}")
            if weighting not in ("examples", "uniform"):
                raise SecAggStageError(f"'{SECAGG_WEIGHTING}' must be examples or uniform")
            if not (math.isfinite(max_weight) and max_weight > 0):
                raise SecAggStageError(f"'{SECAGG_MAX_WEIGHT}' must be finite and > 0")
            ddp = _ddp_round(config, session, bound, site, int(meta.get(_CORRUPT, 0)))
        except (ValueError, SecAggStageError):
            wipe_state(context)
            raise
        return cls(session, meta, rnd, cts, bound, weighting, max_weight, ddp)

    def encode(
        self,
        update: Mapping[str, np.ndarray],
        *,
        num_examples: float,
        loss: float,
        accuracy: float,
        unclipped: float,
    ) -> np.ndarray:
        layout = VectorLayout.from_arrays(update)
        if self.ddp is not None:
            # Distributed DP: rotate, scale, round, add this client's discrete Gaussian
            # share (the noise stage) and reduce into the ring; no extras ride along.
            if layout.num_params != self.ddp.dim:
                raise SecAggStageError(
                    f"model has {layout.num_params} parameters, the round expects {self.ddp.dim}"
                )
            return cast(
                np.ndarray, self.ddp.encode(layout.flatten_params(update), self.session.context)
            )
        if layout.length != self.session.vector_length:
            raise SecAggStageError(
                f"model has {layout.length} masked coordinates, the round expects "
                f"{self.session.vector_length}"
            )
        weight = client_weight(self.weighting, float(num_examples), self.max_weight)
        x = layout.flatten_input(
            update,
            weight=weight,
            bound=self.bound,
            unclipped=unclipped,
            loss=loss,
            accuracy=accuracy,
        )
        codec = round_codec(self.session.bits, self.bound, self.session.params.num_clients)
        # Rounding randomness from a ChaCha20 keystream under an OS-random key: it must
        # not depend on anything the server knows (a seeded rounding could be partly
        # undone). Imported here: key-exchange stages never load the privacy package.
        from fl_app.privacy.noise import SecureNoise

        return codec.encode(x, SecureNoise())  # type: ignore[arg-type]

    def mask(self, encoded: np.ndarray, context: Context) -> np.ndarray:
        try:
            y = self.session.masked_input(self.ciphertexts, encoded)
        except (ClientRefusal, StageOrderError) as err:
            wipe_state(context)
            raise SecAggStageError(str(err)) from err
        if self.ddp is not None:
            self.meta[_MIN_SURVIVORS] = int(self.ddp.min_survivors)
        _save(context, self.session, self.meta)  # b_u, s_sk_u, c_sk_u already dropped
        _advance(context, self.rnd, masked=True)
        return y

    def reply(
        self, msg: Message, masked: np.ndarray, public: Mapping[str, float] | None = None
    ) -> Message:
        """The stage-3 reply: the masked vector, plus only public ``dp-*`` metrics."""
        if public and any(not k.startswith(PUBLIC_METRIC_PREFIX) for k in public):
            raise ValueError(f"only public '{PUBLIC_METRIC_PREFIX}*' metrics may ride in plaintext")
        record = ArrayRecord()
        bits = self.session.bits
        record[SECAGG_MASKED_ARRAY] = Array(
            pack_ring(masked, bits) if wire_packed(bits) else masked
        )
        return _reply(msg, self.rnd, Stage.masked_input, record, public)


def _ddp_round(
    config: Mapping[str, Any],
    session: ClientSession,
    bound: float,
    policy: SitePolicy,
    colluders: int = 0,
) -> Any:
    """The round's distributed-DP parameters, checked against the session and the site's
    floor (``n_min`` and the noise multiplier), or ``None``. ``colluders``: the ``C`` of
    the malicious model's share-keys check (0 otherwise); the server knows their noise
    shares, so the floor counts only ``n_min - C`` honest ones."""
    raw = config.get(SECAGG_DDP)
    if raw is None:
        return None
    from fl_app.privacy.distributed import DdpRound

    if not isinstance(raw, str):
        raise SecAggStageError(f"'{SECAGG_DDP}' must be a JSON string")
    try:
        ddp = DdpRound.from_json(raw)
    except (ValueError, TypeError) as err:
        raise SecAggStageError(f"distributed-DP parameters refused: {err}") from err
    if ddp.padded != session.vector_length or ddp.bits != session.bits:
        raise SecAggStageError("distributed-DP parameters disagree with the round's vector")
    if ddp.cohort != session.params.num_clients or ddp.clip != bound:
        raise SecAggStageError("distributed-DP parameters disagree with the cohort or the clip")
    try:
        policy.check_ddp(
            cohort=ddp.cohort,
            min_survivors=ddp.min_survivors,
            share_std=ddp.share_std,
            bound=ddp.bound,
            colluders=colluders,
        )
    except PolicyViolation as err:
        raise SecAggStageError.from_violation(err) from err
    return ddp
