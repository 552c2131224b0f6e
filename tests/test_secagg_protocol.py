"""Guarantees of the secure-aggregation protocol, simulated in-process.

* exactness: with dropouts at any stage up to the tolerated number, the server's
  result equals the modular sum of the survivors' encoded inputs bit for bit;
* below threshold the round is abandoned with a reason, never a crash;
* masked inputs look uniform; the server cannot strip masks from a proper subset;
* malformed, replayed, misrouted or tampered messages are rejected with a reason.

Determinism: every client draws its secrets from a seeded numpy generator through
the ``entropy`` hook (tests only; production uses ``os.urandom``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest

from fl_app.secagg import crypto, masks, shamir
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.derive import derive_params
from fl_app.secagg.encoding import FixedPointCodec, mod_add, mod_sub
from fl_app.secagg.params import SecAggParams
from fl_app.secagg.protocol import (
    CIPHERTEXT_BYTES,
    ClientRefusal,
    PublicKeys,
    RoundAbandoned,
    Stage,
    StageOrderError,
    UnmaskReply,
    round_context,
)
from fl_app.secagg.server_session import ServerSession

D_LEN = 257  # odd length: no accidental alignment with ChaCha20 blocks


def _entropy(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


@dataclass
class Round:
    params: SecAggParams
    ids: list[int]
    bits: int = 32
    d: int = D_LEN
    seed: int = 0
    context: bytes = field(default=b"")
    server: ServerSession = field(init=False)
    clients: dict[int, ClientSession] = field(init=False)
    inputs: dict[int, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.context = self.context or round_context(7, 3, nonce=bytes(16))
        self.server = ServerSession(
            self.ids,
            self.params,
            vector_length=self.d,
            bits=self.bits,
            context=self.context,
            graph_seed=self.seed.to_bytes(32, "big"),
        )
        self.clients = {
            u: ClientSession(
                u,
                self.context,
                self.params,
                vector_length=self.d,
                bits=self.bits,
                cohort=self.ids,
                entropy=_entropy(self.seed * 1000 + i),
            )
            for i, u in enumerate(self.ids)
        }
        rng = np.random.default_rng(self.seed)
        dtype = crypto.storage_dtype(self.bits)
        high = 2**self.bits
        self.inputs = {u: rng.integers(0, high, self.d, dtype=dtype) for u in self.ids}

    def run(
        self,
        drops: Mapping[int, set[int]] | None = None,
        terms_of=lambda u: b"",
        server_terms: bytes = b"",
    ):
        """Run all four stages; nodes in ``drops[stage]`` do not answer that stage. Node
        ``u`` masks under round terms ``terms_of(u)``, the server unmasks under
        ``server_terms`` (fl_app.secagg.terms)."""
        drops = drops or {}
        s, c = self.server, self.clients
        gone: set[int] = set()

        def alive(stage: int, nodes) -> list[int]:
            gone.update(drops.get(stage, set()))
            return [u for u in nodes if u not in gone]

        req2 = s.collect_public_keys({u: c[u].advertise() for u in alive(1, self.ids)})
        req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in alive(2, req2)})
        s.terms = server_terms
        req4 = s.collect_masked_inputs(
            {u: c[u].masked_input(req3[u], self.inputs[u], terms_of(u)) for u in alive(3, req3)}
        )
        replies = {u: c[u].unmask(req4.survivors, req4.dropouts) for u in alive(4, req4.survivors)}
        return s.unmask(replies)

    def expected(self, survivors) -> np.ndarray:
        total = np.zeros(self.d, dtype=crypto.storage_dtype(self.bits))
        for u in survivors:
            np.add(total, self.inputs[u], out=total)
        if self.bits < 8 * total.itemsize:
            total &= total.dtype.type(2**self.bits - 1)
        return total


def _ids(n: int) -> list[int]:
    # spread over the whole uint64 range, including 0 and 2**64 - 1
    return [0, 2**64 - 1, *[(2**64 // n) * i + 17 for i in range(1, n - 1)]]


CONFIGS = [
    # (n, mode, dropout_tolerance, corrupt_fraction)
    (5, "secagg", 0.2, 0.0),
    (8, "secaggplus", 0.25, 0.125),
    (13, "secagg", 0.3, 0.1),
    (20, "secaggplus", 0.3, 0.1),
    (20, "secaggplus", 0.1, 0.1),
]


def _params(n: int, mode: str, drop: float, corrupt: float) -> SecAggParams:
    p = derive_params(n, mode=mode, dropout_tolerance=drop, corrupt_fraction=corrupt)
    # small cohorts get deterministic guarantees, so adversarial dropout sets must work
    assert p.log2_correctness_failure == -np.inf
    return p


@pytest.mark.parametrize(("n", "mode", "drop", "corrupt"), CONFIGS)
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_exact_sum_with_zero_one_and_max_dropouts_at_each_stage(
    n: int, mode: str, drop: float, corrupt: float, stage: int
) -> None:
    params = _params(n, mode, drop, corrupt)
    ids = _ids(n)
    if mode == "secaggplus" and n == 20:
        assert not params.is_complete  # exercised a genuinely sparse graph
    for count in sorted({0, 1, params.max_dropouts}):
        r = Round(params, ids, seed=count * 10 + stage)
        dropped = set(ids[-count:]) if count else set()
        result = r.run({stage: dropped})
        expected_survivors = [u for u in ids if stage == 4 or u not in dropped]
        assert result.survivors == tuple(sorted(expected_survivors))
        assert np.array_equal(result.total, r.expected(result.survivors))
        assert result.rejections == ()


@pytest.mark.parametrize(("n", "mode", "drop", "corrupt"), CONFIGS[1:])
def test_exact_sum_with_dropouts_spread_over_all_stages(
    n: int, mode: str, drop: float, corrupt: float
) -> None:
    params = _params(n, mode, drop, corrupt)
    ids = _ids(n)
    budget = params.max_dropouts
    victims = ids[1 : 1 + budget]
    drops = {s: set(victims[i::4]) for i, s in enumerate((1, 2, 3, 4))}
    r = Round(params, ids, seed=5)
    result = r.run(drops)
    assert len(result.survivors) == n - budget + len(drops[4])
    assert np.array_equal(result.total, r.expected(result.survivors))


@pytest.mark.parametrize("bits", [8, 20, 32, 40, 64])
def test_exact_sum_for_every_ring_size(bits: int) -> None:
    params = _params(8, "secaggplus", 0.25, 0.125)
    r = Round(params, _ids(8), bits=bits, seed=bits)
    result = r.run({3: {r.ids[2]}})
    assert np.array_equal(result.total, r.expected(result.survivors))


def test_end_to_end_with_codec_decodes_survivor_mean() -> None:
    n = 10
    params = derive_params(n, mode="secagg", dropout_tolerance=0.2, corrupt_fraction=0.1)
    codec = FixedPointCodec(bits=32, max_abs=1.0, max_contributors=n)
    r = Round(params, _ids(n), seed=3)
    rng = np.random.default_rng(4)
    real = {u: rng.uniform(-1, 1, D_LEN) for u in r.ids}
    r.inputs = {u: codec.encode(x, rng) for u, x in real.items()}
    result = r.run({3: {r.ids[0], r.ids[1]}})
    decoded = codec.decode_sum(result.total, result.num_contributors)
    truth = sum(real[u] for u in result.survivors)
    assert np.max(np.abs(decoded - truth)) <= result.num_contributors * codec.resolution


@pytest.mark.parametrize(("n", "mode", "drop", "corrupt"), CONFIGS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_below_threshold_round_is_abandoned_cleanly(
    n: int, mode: str, drop: float, corrupt: float, stage: int
) -> None:
    params = _params(n, mode, drop, corrupt)
    ids = _ids(n)
    r = Round(params, ids, seed=stage)
    with pytest.raises(RoundAbandoned) as info:
        r.run({stage: set(ids[: params.max_dropouts + 1])})
    assert info.value.stage == Stage(stage)
    assert "fewer than" in info.value.reason
    with pytest.raises(RoundAbandoned):  # the session stays abandoned
        r.server.unmask({})


def test_too_few_unmask_replies_abandon_with_reason() -> None:
    params = _params(13, "secagg", 0.3, 0.1)
    ids = _ids(13)
    r = Round(params, ids, seed=1)
    with pytest.raises(RoundAbandoned) as info:
        r.run({4: set(ids[: params.max_dropouts + 1])})
    assert info.value.stage is Stage.unmask and "threshold" in info.value.reason


def test_masked_inputs_look_uniform() -> None:
    """Top 8 bits of a masked all-zero input are uniform: chi-square over 256 bins.

    Seed 11, 2**16 coordinates, 255 degrees of freedom; the bound 377 is the
    1 - 1e-6 quantile (Wilson-Hilferty), so a correct PRG fails with probability
    ~1e-6 over seeds; with the fixed seed the test is deterministic.
    """
    params = _params(5, "secagg", 0.2, 0.0)
    r = Round(params, _ids(5), d=2**16, seed=11)
    r.inputs = {u: np.zeros(r.d, dtype=np.uint32) for u in r.ids}
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids})
    for u in r.ids:
        y = c[u].masked_input(req3[u], r.inputs[u])
        counts = np.bincount(y >> 24, minlength=256)
        expected = r.d / 256
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 377.0, (u, chi2)


def test_server_cannot_unmask_a_proper_subset() -> None:
    """With every masked input and every share it may legitimately get, the server can
    remove the self-masks, but a proper subset's pairwise masks do not cancel: the
    subset sum stays hidden. A client refuses a request naming one node both ways."""
    n = 6
    params = derive_params(n, mode="secagg", dropout_tolerance=0.17, corrupt_fraction=0.0)
    r = Round(params, _ids(n), seed=21)
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids})
    ys = {u: c[u].masked_input(req3[u], r.inputs[u]) for u in r.ids}
    req4 = s.collect_masked_inputs(ys)
    replies = {u: c[u].unmask(req4.survivors, req4.dropouts) for u in r.ids}
    # the server reconstructs every self-mask seed b_u from the legitimate replies
    seeds = {}
    for v in r.ids:
        shares = {u + 1: shamir.share_from_bytes(replies[u].self_mask_shares[v]) for u in r.ids}
        seeds[v] = shamir.reconstruct(shares, params.threshold)
    assert all(len(rep.key_shares) == 0 for rep in replies.values())
    subset = r.ids[:3]
    attempt = np.zeros(r.d, dtype=np.uint32)
    for u in subset:
        attempt += ys[u]
        attempt -= masks.expand_mask(seeds[u], r.d, 32, domain=masks.MaskDomain.self_mask)
    assert not np.array_equal(attempt, r.expected(subset))
    # ... whereas for the full set the masks cancel (sanity of the attack code)
    full = np.zeros(r.d, dtype=np.uint32)
    for u in r.ids:
        full += ys[u]
        full -= masks.expand_mask(seeds[u], r.d, 32, domain=masks.MaskDomain.self_mask)
    assert np.array_equal(full, r.expected(r.ids))

    # a fresh round: asking one client for both shares of one node is refused
    r2 = Round(params, _ids(n), seed=22)
    s, c = r2.server, r2.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r2.ids})
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r2.ids})
    for u in r2.ids:
        c[u].masked_input(req3[u], r2.inputs[u])
    me, victim = r2.ids[0], r2.ids[1]
    with pytest.raises(ClientRefusal, match="both survivor and dropout"):
        c[me].unmask(r2.ids, [victim])
    others = [u for u in r2.ids if u != victim]
    with pytest.raises(ClientRefusal, match="not listed as a survivor"):
        c[victim].unmask(others, [victim])
    with pytest.raises(ClientRefusal, match="fewer than"):
        c[r2.ids[2]].unmask(r2.ids[2:4], [])


# ---------------------------------------------------------------- malformed inputs


def _setup(n: int = 8, mode: str = "secaggplus", seed: int = 0) -> Round:
    return Round(_params(n, mode, 0.25, 0.125), _ids(n), seed=seed)


def test_server_stage1_rejections_are_structured_and_round_continues() -> None:
    r = _setup(8, "secagg")
    s, c = r.server, r.clients
    keys = {u: c[u].advertise() for u in r.ids}
    a, b = r.ids[0], r.ids[1]
    replies: list[tuple[object, object]] = [(u, keys[u]) for u in r.ids[2:]]
    replies += [
        (a, PublicKeys(b"\x01" * 31, keys[a].s_pk)),  # wrong length
        (b, PublicKeys(bytes(32), keys[b].s_pk)),  # small-order key
        (r.ids[2], keys[r.ids[2]]),  # duplicate node
        (12345, keys[a]),  # not in cohort
        ("x", keys[a]),  # not an int
    ]
    with pytest.raises(RoundAbandoned):  # 3 of 8 lost; tolerance is 2
        s.collect_public_keys(replies)  # type: ignore[arg-type]
    reasons = {(rej.node, rej.stage): rej.reason for rej in s.rejections}
    assert "32 raw bytes" in reasons[(a, Stage.advertise)]
    assert "small-order" in reasons[(b, Stage.advertise)]
    assert "2 replies" in reasons[(r.ids[2], Stage.advertise)]
    assert "not in the cohort" in reasons[(12345, Stage.advertise)]
    assert "not an int" in reasons[(-1, Stage.advertise)]

    # the same kind of faults within tolerance: the round completes exactly
    r = _setup(8, "secagg", seed=1)
    s, c = r.server, r.clients
    keys = {u: c[u].advertise() for u in r.ids}
    bad = r.ids[0]
    good = {u: keys[u] for u in r.ids}
    good[bad] = PublicKeys(keys[r.ids[1]].c_pk, keys[bad].s_pk)  # reused key
    req2 = s.collect_public_keys(good)
    assert {rej.node for rej in s.rejections} == {bad, r.ids[1]}
    assert "also advertised" in s.rejections[0].reason
    alive = [u for u in r.ids if u in req2]
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in alive})
    req4 = s.collect_masked_inputs({u: c[u].masked_input(req3[u], r.inputs[u]) for u in alive})
    res = s.unmask({u: c[u].unmask(req4.survivors, req4.dropouts) for u in alive})
    assert np.array_equal(res.total, r.expected(res.survivors))
    assert len(res.rejections) == 2


def test_server_stage2_rejects_bad_bundles_and_routes_the_rest() -> None:
    r = Round(_params(20, "secagg", 0.3, 0.1), _ids(20), seed=2)  # tolerance 6
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    bundles = {u: c[u].share_keys(req2[u]) for u in r.ids}
    a, b, d = r.ids[:3]
    bundles[a] = {**bundles[a], 999: b"\x00" * CIPHERTEXT_BYTES}  # non-neighbour
    first = next(iter(bundles[b]))
    bundles[b] = {**bundles[b], first: b"short"}  # wrong length
    del bundles[d][next(iter(bundles[d]))]  # missing recipient
    pairs = [*bundles.items(), (r.ids[3], bundles[r.ids[3]])]  # duplicate
    req3 = s.route_shares(pairs)
    reasons = {rej.node: rej.reason for rej in s.rejections}
    assert "non-neighbour) [999]" in reasons[a]
    assert f"not {CIPHERTEXT_BYTES} bytes" in reasons[b]
    assert "missing [" in reasons[d]
    assert "2 replies" in reasons[r.ids[3]]
    survivors = set(r.ids) - {a, b, d, r.ids[3]}
    assert set(req3) == survivors
    # nobody receives a ciphertext from a rejected node (so nobody masks with it)
    assert all(set(cts) <= survivors for cts in req3.values())


def test_server_stage3_and_stage4_rejections() -> None:
    r = Round(_params(20, "secagg", 0.3, 0.1), _ids(20), seed=3)  # tolerance 6
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    dropped = r.ids[0]
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids if u != dropped})
    ys = {u: c[u].masked_input(req3[u], r.inputs[u]) for u in req3}
    a, b = r.ids[1], r.ids[2]
    replies = [(u, y) for u, y in ys.items() if u not in (a, b)]
    replies += [(a, ys[a][:-1]), (b, ys[b].astype(np.uint64)), (dropped, ys[a])]
    req4 = s.collect_masked_inputs(replies)
    reasons = {rej.node: rej.reason for rej in s.rejections}
    assert "shape" in reasons[a] and "dtype" in reasons[b]
    assert "did not complete stage 2" in reasons[dropped]
    assert set(req4.dropouts) == {a, b}
    # stage 4: a reply with a share for a node the client may not answer for
    unmask = {u: c[u].unmask(req4.survivors, req4.dropouts) for u in req4.survivors}
    liar = req4.survivors[0]
    rep = unmask[liar]
    unmask[liar] = UnmaskReply(
        self_mask_shares=rep.self_mask_shares,
        key_shares={**rep.key_shares, req4.survivors[1]: next(iter(rep.key_shares.values()))},
    )
    malformed = req4.survivors[1]
    unmask[malformed] = UnmaskReply(self_mask_shares={malformed: b"\x00"}, key_shares={})
    res = s.unmask(unmask)
    reasons = {rej.node: rej.reason for rej in res.rejections if rej.stage is Stage.unmask}
    assert "may not answer for" in reasons[liar]
    assert "malformed share" in reasons[malformed]
    assert np.array_equal(res.total, r.expected(res.survivors))


def test_client_refuses_bad_neighbour_keys() -> None:
    r = _setup(8, "secagg")
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    u, v = r.ids[0], r.ids[1]
    good = req2[u]
    cases = {
        "small-order": {**good, v: PublicKeys(bytes(32), good[v].s_pk)},
        "duplicates another key": {**good, v: PublicKeys(good[v].c_pk, good[v].c_pk)},
        "own node id": {**{k: x for k, x in good.items() if k != v}, u: good[v]},
        "not in the cohort": {**{k: x for k, x in good.items() if k != v}, 4242: good[v]},
        "expected between": {v: good[v]},
    }
    for match, keys in cases.items():
        client = ClientSession(u, r.context, r.params, vector_length=r.d, bits=32, cohort=r.ids)
        client.advertise()
        with pytest.raises(ClientRefusal, match=match):
            client.share_keys(keys)


def test_client_rejects_replayed_misrouted_and_tampered_ciphertexts() -> None:
    old = _setup(8, "secagg", seed=4)
    s, c = old.server, old.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in old.ids})
    old_req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in old.ids})

    def fresh() -> tuple[Round, dict[int, dict[int, bytes]]]:
        r = Round(old.params, old.ids, seed=5, context=round_context(7, 4, nonce=bytes(16)))
        rs, rc = r.server, r.clients
        q2 = rs.collect_public_keys({u: rc[u].advertise() for u in r.ids})
        return r, rs.route_shares({u: rc[u].share_keys(q2[u]) for u in r.ids})

    u, v, w = old.ids[:3]
    r, req3 = fresh()
    replayed = {**req3[u], v: old_req3[u][v]}  # ciphertext from an earlier round
    with pytest.raises(ClientRefusal, match=f"shares from {v} rejected"):
        r.clients[u].masked_input(replayed, r.inputs[u])
    r, req3 = fresh()
    misrouted = {**req3[u], v: req3[w][v]}  # v's ciphertext meant for w
    with pytest.raises(ClientRefusal, match="authentication failed"):
        r.clients[u].masked_input(misrouted, r.inputs[u])
    r, req3 = fresh()
    ct = bytearray(req3[u][v])
    ct[40] ^= 0x80
    with pytest.raises(ClientRefusal, match="authentication failed"):
        r.clients[u].masked_input({**req3[u], v: bytes(ct)}, r.inputs[u])
    r, req3 = fresh()
    with pytest.raises(ClientRefusal, match="not a neighbour"):
        r.clients[u].masked_input({**req3[u], 4242: req3[u][v]}, r.inputs[u])
    with pytest.raises(ClientRefusal, match="encoded input"):
        r.clients[u].masked_input(req3[u], r.inputs[u][:-1])


def test_client_refusal_at_stage3_becomes_a_dropout_and_round_stays_exact() -> None:
    r = _setup(13, "secagg", seed=6)
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids})
    victim, sender = r.ids[0], r.ids[1]
    tampered = bytearray(req3[victim][sender])
    tampered[-1] ^= 1
    req3[victim][sender] = bytes(tampered)
    ys = {}
    for u in r.ids:
        try:
            ys[u] = c[u].masked_input(req3[u], r.inputs[u])
        except ClientRefusal:
            assert u == victim
    req4 = s.collect_masked_inputs(ys)
    assert req4.dropouts == (victim,)
    res = s.unmask({u: c[u].unmask(req4.survivors, req4.dropouts) for u in req4.survivors})
    assert np.array_equal(res.total, r.expected(res.survivors))


def test_client_masked_input_equals_textbook_mask_sum() -> None:
    """The fused accumulation gives ``x + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)``
    computed mask by mask, over a length that spans several accumulation chunks."""
    for bits in (20, 32, 64):
        dtype = crypto.storage_dtype(bits)
        d = 2 * (masks._ACC_CHUNK_BYTES // np.dtype(dtype).itemsize) + 3
        r = Round(_params(8, "secaggplus", 0.25, 0.125), _ids(8), bits=bits, d=d, seed=5)
        s, c = r.server, r.clients
        req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
        req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids})
        for u in r.ids:
            client = c[u]
            assert client._b is not None and client._s_sk is not None
            expected = mod_add(
                r.inputs[u],
                masks.expand_mask(bytes(client._b), d, bits, domain=masks.MaskDomain.self_mask),
                bits,
            )
            for v in req3[u]:
                seed = crypto.derive_key(
                    crypto.agree(client._s_sk, req2[u][v].s_pk),
                    purpose=crypto.KeyPurpose.pairwise_mask,
                    context=r.context,
                    node_a=u,
                    node_b=v,
                )
                mask = masks.expand_mask(seed, d, bits, domain=masks.MaskDomain.pairwise)
                op = mod_add if u < v else mod_sub
                expected = op(expected, mask, bits)
            before = r.inputs[u].copy()
            y = client.masked_input(req3[u], r.inputs[u])
            assert np.array_equal(r.inputs[u], before)  # the caller's input is not touched
            assert y.dtype == dtype and np.array_equal(y, expected)


@pytest.mark.parametrize("bits", [24, 32, 64])
def test_exact_sum_with_dropouts_over_several_accumulation_chunks(bits: int) -> None:
    dtype = crypto.storage_dtype(bits)
    d = 2 * (masks._ACC_CHUNK_BYTES // np.dtype(dtype).itemsize) + 5
    params = _params(20, "secaggplus", 0.3, 0.1)
    r = Round(params, _ids(20), bits=bits, d=d, seed=8)
    res = r.run({3: set(r.ids[3 : 3 + params.max_dropouts])})
    assert len(res.dropouts) == params.max_dropouts
    assert np.array_equal(res.total, r.expected(res.survivors))


def _forge(replies: dict, holders: list[int], victim: int) -> None:
    for holder in holders:
        rep = replies[holder]
        forged = shamir.share_to_bytes(shamir.share_from_bytes(rep.self_mask_shares[victim]) + 1)
        replies[holder] = UnmaskReply(
            self_mask_shares={**rep.self_mask_shares, victim: forged}, key_shares=rep.key_shares
        )


def test_an_inconsistent_share_is_routed_around() -> None:
    """n = 8, D = 2: t = 6 of 8 holders; one bad share among the first t is skipped."""
    r = _setup(8, "secagg")
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids})
    req4 = s.collect_masked_inputs({u: c[u].masked_input(req3[u], r.inputs[u]) for u in req3})
    replies = {u: c[u].unmask(req4.survivors, req4.dropouts) for u in req4.survivors}
    victim = req4.survivors[3]
    holder = min(replies)  # the smallest share id is always among the first t
    _forge(replies, [holder], victim)
    result = s.unmask(replies)
    exact = np.sum([r.inputs[u].astype(np.uint64) for u in r.ids], axis=0) % 2**32
    assert np.array_equal(result.total.astype(np.uint64), exact)
    # 8 holders < 2t - 2 = 10: naming the holder would not be sound, so nobody is named.
    assert not any("inconsistent share" in rej.reason for rej in result.rejections)


def test_more_bad_shares_than_spares_abandon_naming_the_node() -> None:
    r = _setup(8, "secagg")
    s, c = r.server, r.clients
    req2 = s.collect_public_keys({u: c[u].advertise() for u in r.ids})
    req3 = s.route_shares({u: c[u].share_keys(req2[u]) for u in r.ids})
    req4 = s.collect_masked_inputs({u: c[u].masked_input(req3[u], r.inputs[u]) for u in req3})
    replies = {u: c[u].unmask(req4.survivors, req4.dropouts) for u in req4.survivors}
    victim = req4.survivors[3]
    _forge(replies, sorted(replies)[:3], victim)  # 3 bad of 8, t = 6: no clean 6-subset
    with pytest.raises(RoundAbandoned) as info:
        s.unmask(replies)
    assert info.value.stage is Stage.unmask
    assert f"self-mask seed of node {victim}" in info.value.reason


def test_stage_order_is_enforced_and_wipe_is_final() -> None:
    r = _setup(8, "secagg")
    client = r.clients[r.ids[0]]
    with pytest.raises(StageOrderError, match="expected stage 1"):
        client.masked_input({}, r.inputs[r.ids[0]])
    client.advertise()
    with pytest.raises(StageOrderError, match="run once, in order"):
        client.advertise()
    client.wipe()
    for call in (client.advertise, lambda: client.share_keys({}), client.to_state):
        with pytest.raises(StageOrderError, match="wiped"):
            call()
    with pytest.raises(StageOrderError, match="in order"):
        r.server.collect_masked_inputs({})


def test_unmask_wipes_client_secrets() -> None:
    r = _setup(8, "secagg", seed=8)
    r.run()
    for client in r.clients.values():
        assert client._b is None and client._c_sk is None and client._s_sk is None
        assert client._shares == {} and client._enc_keys == {}
        with pytest.raises(StageOrderError):
            client.unmask([], [])


def test_stage2_encryption_keys_are_reused_in_stage3_and_then_dropped() -> None:
    """Stage 3 decrypts with the AEAD keys derived in stage 2 (kept in the state until
    stage 3 ends); a state without them (older export) derives them again, same result."""
    r = _setup(8, "secaggplus", seed=4)
    s = r.server

    def resume(state: Mapping[str, bytes]) -> ClientSession:
        return ClientSession.from_state(state, r.params, vector_length=r.d, bits=32, cohort=r.ids)

    req2 = s.collect_public_keys({u: r.clients[u].advertise() for u in r.ids})
    req3 = s.route_shares({u: r.clients[u].share_keys(req2[u]) for u in r.ids})
    ys = {}
    for u in r.ids:
        state = r.clients[u].to_state()
        raw = state["enc_keys"]
        assert len(raw) == (8 + crypto.KEY_BYTES) * len(req2[u])
        cached = resume(state)
        derived = resume({k: v for k, v in state.items() if k != "enc_keys"})
        assert set(cached._enc_keys) == set(req2[u]) and not derived._enc_keys
        ys[u] = cached.masked_input(req3[u], r.inputs[u])
        assert np.array_equal(ys[u], derived.masked_input(req3[u], r.inputs[u]))
        assert "enc_keys" not in cached.to_state() and cached._enc_keys == {}
        with pytest.raises(ValueError, match="enc_keys"):
            resume({**state, "enc_keys": raw[:-1]})
        stranger = (2**64 - 2).to_bytes(8, "big") + bytes(crypto.KEY_BYTES)
        with pytest.raises(ValueError, match="not a neighbour"):
            resume({**state, "enc_keys": stranger})
        r.clients[u] = cached
    req4 = s.collect_masked_inputs(ys)
    res = s.unmask({u: r.clients[u].unmask(req4.survivors, req4.dropouts) for u in r.ids})
    assert np.array_equal(res.total, r.expected(r.ids))


def test_client_state_survives_a_process_boundary() -> None:
    """Flower starts a fresh process per message: sessions resume from exported state."""
    r = _setup(8, "secaggplus", seed=9)
    s = r.server

    def hop(u: int) -> ClientSession:
        state = r.clients[u].to_state()
        assert all(isinstance(v, bytes) for v in state.values())
        r.clients[u] = ClientSession.from_state(
            state, r.params, vector_length=r.d, bits=32, cohort=r.ids
        )
        return r.clients[u]

    keys = {u: r.clients[u].advertise() for u in r.ids}
    req2 = s.collect_public_keys(keys)
    req3 = s.route_shares({u: hop(u).share_keys(req2[u]) for u in r.ids})
    req4 = s.collect_masked_inputs({u: hop(u).masked_input(req3[u], r.inputs[u]) for u in r.ids})
    res = s.unmask({u: hop(u).unmask(req4.survivors, req4.dropouts) for u in r.ids})
    assert np.array_equal(res.total, r.expected(r.ids))
    with pytest.raises(ValueError, match="malformed"):
        ClientSession.from_state({"node_id": b"\x00"}, r.params, vector_length=r.d, bits=32)


def test_a_round_context_binds_the_client_spec_after_its_nonce() -> None:
    """spec_binding is SHA-256 over a label and the spec text (the formula worked here,
    from the documented label); the context ends with it after a random nonce, and
    context_binds accepts exactly that spec."""
    import hashlib

    from fl_app.secagg.protocol import context_binds, round_context, spec_binding

    spec = '{"run_key":"ab12","share":{"compression":"sketch"}}'
    want = hashlib.sha256(b"fl-app/secagg/spec/v1|" + spec.encode()).digest()
    assert spec_binding(spec) == want
    ctx = round_context(7, 3, bind=want)
    assert ctx.startswith(
        b"fl-app/secagg/round/v1" + (7).to_bytes(8, "big") + (3).to_bytes(8, "big")
    )
    assert len(ctx) == 22 + 16 + 16 + 32 and ctx.endswith(want)
    assert round_context(7, 3, bind=want) != ctx  # a fresh nonce each time
    assert context_binds(ctx, want)
    assert not context_binds(ctx, spec_binding(spec.replace("ab12", "21ba")))
    assert not context_binds(round_context(7, 3), want)  # an unbound context
    assert not context_binds(ctx, want[:31])
    assert not context_binds(b"other/label/v1" + ctx[22:], want)  # not an fl-app context
    short = ctx[: 22 + 16 + 7] + want  # a nonce under 8 bytes is no context of ours
    assert not context_binds(short, want)
    assert context_binds(ctx[: 22 + 16 + 8] + want, want)
    with pytest.raises(ValueError, match="32-byte"):
        round_context(7, 3, bind=want[:16])


def test_pairwise_masks_bind_the_round_terms() -> None:
    """Every pairwise mask is derived under the stage-3 round terms: the same terms at
    every client and the server unmask the exact sum (a dropout's masks rebuilt under the
    server's terms too); one client under other terms (a server that sent it its own bound,
    weights or model) leaves masks that cancel with nobody's: neither the sum nor that
    client's input can be read from the total."""
    n, mode, drop, corrupt = 8, "secaggplus", 0.25, 0.125
    t1, t2 = bytes(32), b"\x01" * 32
    params = _params(n, mode, drop, corrupt)
    ids = _ids(n)
    honest = Round(params, ids, seed=11)
    out = honest.run({3: {ids[2]}}, lambda u: t1, t1)
    np.testing.assert_array_equal(out.total, honest.expected(out.survivors))

    wrong_server = Round(params, ids, seed=11)
    out = wrong_server.run({3: {ids[2]}}, lambda u: t1, t2)
    assert not np.array_equal(out.total, wrong_server.expected(out.survivors))

    target = ids[0]
    isolated = Round(params, ids, seed=11)
    out = isolated.run(None, lambda u: t2 if u == target else t1, t1)
    others = isolated.expected([u for u in out.survivors if u != target])
    mod = np.uint64(2**isolated.bits)
    residual = (out.total.astype(np.uint64) - others.astype(np.uint64)) % mod
    assert not np.array_equal(residual, isolated.inputs[target].astype(np.uint64))
    assert not np.array_equal(out.total, isolated.expected(out.survivors))


def test_round_terms_cover_what_the_server_chooses_per_round_and_not_per_node_keys() -> None:
    """round_terms changes with every server-chosen term of a stage-3 instruction (spec,
    round, mu, clip norm, encoding bound, weighting, weight cap, distributed-DP round, any
    weight of the global model) and not with what legitimately differs per node (routed
    ciphertexts, the sender list, node-config keys such as partition-id)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fl_app.secagg import wire
    from fl_app.secagg.terms import content_terms

    base = {
        "fl-app.spec": '{"run_key":"k"}', "server-round": 3, "proximal-mu": 0.0,
        "fl-app.clip-norm": 1.5, wire.SECAGG_BOUND: 2.0, wire.SECAGG_WEIGHTING: "examples",
        wire.SECAGG_MAX_WEIGHT: 100.0, wire.SECAGG_DDP: '{"z":1}',
        wire.SECAGG_NODES: b"\x01", wire.SECAGG_CIPHERTEXTS: b"\x02", "partition-id": 0,
    }  # fmt: skip
    weights = {"w": np.arange(6, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}

    def content(config: dict, arrays: dict) -> bytes:
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        rd = RecordDict({"arrays": record, "config": ConfigRecord(config)})
        return content_terms(rd)

    ref = content(base, weights)
    assert len(ref) == 32 and content(dict(base), dict(weights)) == ref
    changed = {
        "fl-app.spec": '{"run_key":"K"}', "server-round": 4, "proximal-mu": 0.01,
        "fl-app.clip-norm": 1.5000001, wire.SECAGG_BOUND: 1e9, wire.SECAGG_WEIGHTING: "uniform",
        wire.SECAGG_MAX_WEIGHT: 1e30, wire.SECAGG_DDP: '{"z":0}',
    }  # fmt: skip
    for key, value in changed.items():
        assert content({**base, key: value}, weights) != ref, key
    other = {**weights, "w": np.arange(6, dtype=np.float32) * np.float32(1.0000001)}
    assert content(base, other) != ref
    for key, value in {wire.SECAGG_NODES: b"\x09", wire.SECAGG_CIPHERTEXTS: b"\x08",
                       "partition-id": 7}.items():  # fmt: skip
        assert content({**base, key: value}, weights) == ref, key
