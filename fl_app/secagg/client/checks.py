"""What a client checks before it reveals anything (docs/architecture.md, Rules).

Malicious server model (Bonawitz et al., CCS 2017, signed advertisements and the
consistency check): the round's shape and thresholds against this site's colluder bound
(stage 2), every neighbour's signed key pair (stage 2), the signed survivor set and its
quorum (stage 4). Distributed DP: enough survivors for the noise this client counted on
(stages 4 and 5).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from flwr.app import Context

from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.secagg import signing, wire
from fl_app.secagg.client.identity import SiteIdentity, _pinned_identity
from fl_app.secagg.client.state import (
    _CORRUPT,
    _IDENTITIES,
    _MIN_SURVIVORS,
    _OWN_KEYS,
    _SIGNED_U3,
    SecAggStageError,
    _get,
)
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.params import SecAggParams, consistency_quorum
from fl_app.secagg.protocol import PublicKeys
from fl_app.secagg.vector import unpack_ids


def _split_signatures(raw: object, count: int, what: str) -> list[bytes]:
    size = signing.SIGNATURE_BYTES
    if not isinstance(raw, bytes) or len(raw) != size * count:
        raise SecAggStageError(f"{what}: expected {count} signatures of {size} bytes")
    return [raw[i * size : (i + 1) * size] for i in range(count)]


def _identity_list(config: Mapping[str, Any], count: int) -> list[str]:
    try:
        names = json.loads(_get(config, wire.SECAGG_IDENTITIES, str))
    except json.JSONDecodeError as err:
        raise SecAggStageError(f"'{wire.SECAGG_IDENTITIES}' is not JSON: {err}") from err
    if not isinstance(names, list) or len(names) != count:
        raise SecAggStageError(f"'{wire.SECAGG_IDENTITIES}' must list {count} identities")
    if not all(isinstance(x, str) for x in names):
        raise SecAggStageError(f"'{wire.SECAGG_IDENTITIES}' must list strings")
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
    sigs = _split_signatures(config.get(wire.SECAGG_SIGNATURES), len(nodes), wire.SECAGG_SIGNATURES)
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
    ``U3`` this client signed, and :func:`~fl_app.secagg.params.consistency_quorum`
    distinct roster identities of members of ``U3`` (more than ``(n + C) / 2``, at least
    ``t``) signed that same set, each bound to the round keys it shared with at stage 2
    (Bonawitz et al., consistency check)."""
    # long: every check precedes any reveal, in the order Bonawitz et al. state them.
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
    signers = unpack_ids(_get(config, wire.SECAGG_SIGNERS, bytes), "signers")
    names = _identity_list(config, len(signers))
    sigs = _split_signatures(
        config.get(wire.SECAGG_SIGNATURES), len(signers), wire.SECAGG_SIGNATURES
    )
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
