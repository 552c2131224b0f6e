"""This site's signing identity and the policy it applies (malicious server model).

A deployed site's key and roster come from node config ``signing-key-path`` /
``roster-path`` (:mod:`fl_app.secagg.signing`); a simulated partition uses the
:class:`~fl_app.secagg.signing.SimulationRoster` of a process a simulation entry point
marked. A site that holds either key raises its own policy floor
(:func:`effective_policy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context

from fl_app.client.policy import SitePolicy
from fl_app.secagg import signing
from fl_app.secagg.client.state import _ROSTER, SecAggStageError

__all__ = [
    "ROSTER_PATH",
    "SIGNING_KEY_PATH",
    "SiteIdentity",
    "effective_policy",
    "site_identity_for_secagg",
]


#: Node-config keys of a deployed site's signing identity (fl_app.secagg.signing).
SIGNING_KEY_PATH = "signing-key-path"
ROSTER_PATH = "roster-path"


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
