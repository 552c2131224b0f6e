"""Review of issue 17/18 changes, as the parties they protect against (docs/architecture.md,
Rules; strategies/site_claims.py; fl_app/config/guarantee.py).

Each test states a property a review found missing (filed first as a strict xfail, now
fixed): one site identity per node, and a card text that is true of the mechanism each
mode runs. Expected values are worked out here (the identity values, the mechanism each
mode runs), not taken from the code under test.
"""

from __future__ import annotations

import hashlib

from fl_app.config.compose import compose_config
from fl_app.config.guarantee import Guarantee
from fl_app.config.plan import resolve
from strategies.site_claims import SiteClaims


def _site_hash(name: str) -> float:
    # What a deployed client sent before the identity was keyed: 48 bits of SHA-256 of
    # "site-<site-name>", computable from the roster's site names. The rule below must
    # hold for any values an attacker manages to present.
    return float(int.from_bytes(hashlib.sha256(f"site-{name}".encode()).digest()[:6], "big"))


def test_a_node_holds_at_most_one_site_identity_in_a_run() -> None:
    # Review finding (fixed): one enrolled node could hold every site identity of a run
    # (one per round), so every honest DP-SGD/local-DP site's replies were rejected while
    # it stayed connected; an honest node presents exactly one identity (its site-name).
    claims = SiteClaims()
    connected = {5, 6, 66}
    attacker = 66
    # Round 1: the attacker presents site A's identity; round 2, site B's.
    assert claims.check(attacker, {"dp-site-hash": _site_hash("hospital-a")}, connected) is None
    second = claims.check(attacker, {"dp-site-hash": _site_hash("hospital-b")}, connected)
    assert second is not None  # a second, different identity from one node is refused
    # ... so site B's own node keeps its identity.
    assert claims.check(6, {"dp-site-hash": _site_hash("hospital-b")}, connected) is None


def _guarantee(*overrides: str) -> Guarantee:
    return resolve(compose_config("config", list(overrides))).guarantee


def test_local_dp_under_trusted_server_does_not_say_the_server_adds_the_noise() -> None:
    g = _guarantee("privacy=local", "privacy.threat_model=trusted_server")
    # Local DP: each client clips and noises before its update leaves it.
    assert [p.party for p in g.epsilon] == ["everyone, the server included"]
    assert "adds the noise" not in g.protects
    assert "anyone but the server" not in g.protects


def test_trusted_server_with_secure_aggregation_does_not_say_the_server_sees_updates() -> None:
    g = _guarantee(
        "privacy=central",
        "privacy.threat_model=trusted_server",
        "privacy.clip_side=client",
        "secagg=secaggplus",
    )
    assert "masked sum" in g.server_sees
    # It unmasks the exact (un-noised) sum and sees the public dp-* metrics in plaintext.
    assert "exactly" in g.server_sees and "dp-* metrics" in g.server_sees
    assert "sees the clients'" not in g.protects


def test_server_side_clipping_is_not_described_as_clipped_updates() -> None:
    g = _guarantee(
        "privacy=central", "privacy.threat_model=trusted_server", "privacy.clip_side=server"
    )
    assert "unclipped" in g.server_sees
    assert "(clipped) updates" not in g.protects
