"""Robust reconstruction, the commitment to b_u, and a property test of the whole protocol.

* :func:`~fl_app.secagg.shamir.reconstruct_verified` finds the secret a check accepts
  whenever at most ``m - t`` of ``m`` shares are bad, and names the bad ones;
* a holder that knows its Lagrange coefficient can shift a rebuilt self-mask seed by
  any amount with a well-formed share (Shamir is linear): without the stage-2
  commitment the server would remove the wrong mask silently; with it the crafted share
  is detected, routed around when spares exist, and its holder named;
* over random cohorts, both graph kinds and random dropout sets at every stage, the
  unmasked sum equals an oracle computed here (the survivors' inputs summed mod
  ``2**bits``), or the round is abandoned exactly when the oracle says it must be.
"""

from __future__ import annotations

import hashlib
import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_app.secagg import crypto, shamir
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.derive import derive_params
from fl_app.secagg.protocol import RoundAbandoned, UnmaskReply, round_context
from fl_app.secagg.server_session import ServerSession

P = shamir.PRIME


def _lagrange_at_zero(xs: list[int]) -> list[int]:
    """Written out here, independently of the module: l_i = prod x_j / (x_j - x_i)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % P
                den = den * (xj - xi) % P
        out.append(num * pow(den, -1, P) % P)
    return out


# ------------------------------------------------------------------ Shamir layer
@pytest.mark.parametrize(("m", "t", "bad"), [(7, 4, 0), (7, 4, 1), (7, 4, 3), (12, 5, 4)])
def test_verified_reconstruction_finds_the_secret_and_the_bad_shares(
    m: int, t: int, bad: int
) -> None:
    rng = random.Random(m * 100 + bad)
    secret = rng.randbytes(32)
    digest = hashlib.sha256(secret).digest()
    shares = shamir.split(secret, t, range(1, m + 1), randbytes=rng.randbytes)
    corrupted = rng.sample(sorted(shares), bad)
    for x in corrupted:
        shares[x] = (shares[x] + rng.randrange(1, P)) % P
    got, named = shamir.reconstruct_verified(
        shares, t, lambda s: hashlib.sha256(s).digest() == digest
    )
    assert got == secret
    # Never an honest share named; all bad ones named when >= 2t - 2 shares agree with
    # the polynomial found (then it is surely the dealer's) and the first subset failed.
    assert set(named) <= set(corrupted)
    if bad and min(corrupted) <= t and m - bad >= 2 * t - 2:
        assert set(named) == set(corrupted)


def test_colluding_holders_cannot_frame_an_honest_one() -> None:
    # Points {1, 2, 4, 5}: l_1 = 10/3 and l_2 = -10/3, so +e on shares 1 and 2 cancels at
    # zero for that subset: it passes the check while its polynomial is wrong, and the
    # honest shares 3 and 6 disagree with it. Nobody may be named then.
    rng = random.Random(3)
    secret = rng.randbytes(32)
    shares = shamir.split(secret, 4, range(1, 7), randbytes=rng.randbytes)
    for x in (1, 2):
        shares[x] = (shares[x] + 1) % P
    assert sum(_lagrange_at_zero([1, 2, 4, 5])[:2]) % P == 0
    got, named = shamir.reconstruct_verified(shares, 4, lambda s: s == secret)
    assert got == secret and named == ()


@pytest.mark.parametrize(("m", "t"), [(7, 4), (12, 5), (39, 20), (100, 51)])
def test_reed_solomon_decoding_corrects_up_to_half_the_spare_shares(m: int, t: int) -> None:
    # (39, 20): a sparse round of 100 (k + 1 = 39 holders, t = 20) corrects 9 bad
    # shares, where leaving shares out one subset at a time would give up.
    rng = random.Random(m)
    secret = rng.randbytes(32)
    shares = shamir.split(secret, t, rng.sample(range(1, 10**6), m), randbytes=rng.randbytes)
    bad = rng.sample(sorted(shares), (m - t) // 2)
    for x in bad:
        shares[x] = (shares[x] + rng.randrange(1, P)) % P
    poly = shamir.decode_polynomial(shares, t)
    assert poly is not None and poly[0] == int.from_bytes(secret, "big") and len(poly) <= t
    got, named = shamir.reconstruct_verified(shares, t, lambda s: s == secret)
    assert got == secret
    # Bad shares are named when the t smallest ids hold one (else the first subset
    # passes and nothing more is examined) and >= 2t - 2 shares agree (naming is sound).
    hit = bool(set(bad) & set(sorted(shares)[:t]))
    assert set(named) == (set(bad) if hit and m - len(bad) >= 2 * t - 2 else set())


def test_verified_reconstruction_gives_up_beyond_m_minus_t_bad_shares() -> None:
    rng = random.Random(3)
    secret = rng.randbytes(32)
    shares = shamir.split(secret, 4, range(1, 7), randbytes=rng.randbytes)
    for x, e in ((1, 1), (2, 5), (3, 11)):  # 3 bad of 6 with t = 4: no clean 4-subset
        shares[x] = (shares[x] + e) % P
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.reconstruct_verified(shares, 4, lambda s: s == secret)
    with pytest.raises(shamir.ShamirError, match="within 2 subsets"):
        shamir.reconstruct_verified(shares, 4, lambda s: s == secret, max_subsets=2)


# ----------------------------------------------------- crafted seed shift
def _round(n: int, mode: str, seed: int, commit: bool):
    params = derive_params(n, mode=mode, dropout_tolerance=0.25, corrupt_fraction=0.125)
    ids = [1000 + 7 * i for i in range(n)]
    ctx = round_context(5, 1, nonce=bytes(16))
    rng = np.random.default_rng(seed)
    server = ServerSession(
        ids, params, vector_length=64, bits=32, context=ctx, graph_seed=bytes(32)
    )
    clients = {u: ClientSession(u, ctx, params, vector_length=64, bits=32, cohort=ids) for u in ids}
    inputs = {u: rng.integers(0, 2**32, 64, dtype=np.uint32) for u in ids}
    req2 = server.collect_public_keys({u: clients[u].advertise() for u in ids})
    bundles = {u: clients[u].share_keys(req2[u]) for u in ids}
    commitments = {u: clients[u].commitment for u in ids} if commit else None
    req3 = server.route_shares(bundles, commitments=commitments)  # type: ignore[arg-type]
    req4 = server.collect_masked_inputs(
        {u: clients[u].masked_input(req3[u], inputs[u]) for u in req3}
    )
    replies = {u: clients[u].unmask(req4.survivors, req4.dropouts) for u in req4.survivors}
    exact = np.sum([inputs[u].astype(np.uint64) for u in ids], axis=0) % 2**32
    return server, replies, exact, req4.survivors


def _shift_seed(replies: dict, victim: int) -> int:
    """Make the smallest holder's share move the rebuilt b_victim by +2**128; return it.

    (The mask PRG keys AES-128 with the seed's first 16 bytes, the high half of its
    big-endian value, so a shift must reach those bytes to change the mask.)
    """
    holders = sorted(u for u, rep in replies.items() if victim in rep.self_mask_shares)
    t = derive_params(8, mode="secagg", dropout_tolerance=0.25, corrupt_fraction=0.125).threshold
    used = holders[:t]  # the server's first subset: the t smallest share points
    lam = _lagrange_at_zero([u + 1 for u in used])[0]
    h = used[0]
    rep = replies[h]
    y = shamir.share_from_bytes(rep.self_mask_shares[victim])
    crafted = shamir.share_to_bytes((y + 2**128 * pow(lam, -1, P)) % P)
    replies[h] = UnmaskReply({**rep.self_mask_shares, victim: crafted}, rep.key_shares)
    return h


def test_a_crafted_share_shifts_the_seed_silently_without_the_commitment() -> None:
    server, replies, exact, survivors = _round(8, "secagg", 1, commit=False)
    _shift_seed(replies, survivors[2])
    result = server.unmask(replies)  # completes: the shifted seed is a valid 32-byte value
    assert not np.array_equal(result.total.astype(np.uint64), exact)


def test_the_commitment_catches_a_crafted_share_and_the_sum_stays_exact() -> None:
    server, replies, exact, survivors = _round(8, "secagg", 1, commit=True)
    victim = survivors[2]
    holder = _shift_seed(replies, victim)
    result = server.unmask(replies)
    assert np.array_equal(result.total.astype(np.uint64), exact)
    # t = 6 of 8 holders: fewer than 2t - 2 = 10 shares, so the holder cannot be named
    # soundly (two colluders could frame an honest one); the sum is still exact.
    assert holder in replies


def test_stage_two_without_a_commitment_is_rejected() -> None:
    params = derive_params(5, mode="secagg", dropout_tolerance=0.2)
    ids = [1, 2, 3, 4, 5]
    ctx = round_context(5, 1, nonce=bytes(16))
    server = ServerSession(ids, params, vector_length=8, bits=32, context=ctx)
    clients = {u: ClientSession(u, ctx, params, vector_length=8, bits=32) for u in ids}
    req2 = server.collect_public_keys({u: clients[u].advertise() for u in ids})
    bundles = {u: clients[u].share_keys(req2[u]) for u in ids}
    commitments = {u: clients[u].commitment for u in ids if u != 3}
    server.route_shares(bundles, commitments=commitments)  # type: ignore[arg-type]
    assert [(r.node, "commitment" in r.reason) for r in server.rejections] == [(3, True)]


# ------------------------------------------------------------- property test
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(min_value=3, max_value=14),
    mode=st.sampled_from(["secagg", "secaggplus"]),
    tolerance=st.sampled_from([0.0, 0.2, 0.34]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    drop_weights=st.tuples(*[st.floats(0, 0.3)] * 4),
)
def test_random_cohorts_and_dropouts_match_the_oracle(
    n: int, mode: str, tolerance: float, seed: int, drop_weights: tuple[float, ...]
) -> None:
    try:
        params = derive_params(n, mode=mode, dropout_tolerance=tolerance, corrupt_fraction=0.0)
    except ValueError:
        return  # no parameters for this (n, tolerance): the run refuses before any round
    rng = random.Random(seed)
    ids = rng.sample(range(1, 2**40), n)
    ctx = round_context(seed, 1, nonce=seed.to_bytes(16, "big"))
    bits, d = rng.choice([16, 32]), 8
    server = ServerSession(
        ids, params, vector_length=d, bits=bits, context=ctx, graph_seed=rng.randbytes(32)
    )
    clients = {
        u: ClientSession(u, ctx, params, vector_length=d, bits=bits, cohort=ids) for u in ids
    }
    np_rng = np.random.default_rng(seed)
    dtype = crypto.storage_dtype(bits)
    inputs = {u: np_rng.integers(0, 2**bits, d, dtype=np.uint64).astype(dtype) for u in ids}
    live: dict[int, set[int]] = {}  # stage -> nodes whose reply to it arrives
    alive = set(ids)
    for stage in (1, 2, 3, 4):
        alive = {u for u in alive if rng.random() >= drop_weights[stage - 1]}
        live[stage] = set(alive)
    outcome = None
    try:
        req2 = server.collect_public_keys({u: clients[u].advertise() for u in live[1]})
        req3 = server.route_shares(
            {u: clients[u].share_keys(req2[u]) for u in live[2]},
            commitments={u: clients[u].commitment for u in live[2]},  # type: ignore[misc]
        )
        req4 = server.collect_masked_inputs(
            {u: clients[u].masked_input(req3[u], inputs[u]) for u in live[3] if u in req3}
        )
        replies = {
            u: clients[u].unmask(req4.survivors, req4.dropouts)
            for u in req4.survivors
            if u in live[4]
        }
        outcome = server.unmask(replies)
    except RoundAbandoned:
        pass
    expected = _oracle(ids, live, server.graph, params.threshold, params.min_survivors)
    if expected is None:
        assert outcome is None
        return
    assert outcome is not None
    u3 = set(expected)
    assert set(outcome.survivors) == u3
    total = np.zeros(d, dtype=np.uint64)
    for u in sorted(u3):
        total = (total + inputs[u].astype(np.uint64)) % 2**bits
    assert np.array_equal(outcome.total.astype(np.uint64), total)


def _oracle(
    ids: list[int], live: dict[int, set[int]], graph: dict, t: int, min_survivors: int
) -> list[int] | None:
    """The survivors whose inputs the round sums, or ``None`` if it must be abandoned.

    Written from the protocol's rules, not from the server's code: every stage needs
    ``max(min_survivors, t)`` nodes; a node enters U2 only while ``t`` of its holders
    (itself and its neighbours) are in U2; after stage 3 every node of U2 needs ``t``
    holders in U3, and at stage 4 ``t`` holders whose unmask reply arrives.
    """
    floor = max(min_survivors, t)
    u1 = set(live[1])
    if len(u1) < floor:
        return None

    def holders(v: int, among: set[int]) -> int:
        return sum(1 for h in (v, *graph[v]) if h in among)

    u2 = u1 & live[2]
    if len(u2) < floor:
        return None
    while True:
        weak = {v for v in u2 if holders(v, u2) < t}
        if not weak:
            break
        u2 -= weak
    if len(u2) < floor:
        return None
    u3 = u2 & live[3]
    if len(u3) < floor or any(holders(v, u3) < t for v in u2):
        return None
    answering = u3 & live[4]
    if any(holders(v, answering) < t for v in u2):
        return None
    return sorted(u3)


def test_oracle_helper_combinations_cover_both_graphs() -> None:
    # Guard for the property test: both graph kinds really occur at these sizes.
    kinds = {
        derive_params(n, mode=m, dropout_tolerance=0.2, corrupt_fraction=0.0).is_complete
        for n, m in itertools.product(range(3, 15), ["secagg", "secaggplus"])
    }
    assert kinds == {True, False}
