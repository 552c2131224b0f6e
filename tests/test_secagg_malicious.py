"""``secagg.server_model=malicious``: signed keys and the consistency check, through the
real client stage handlers (:func:`~fl_app.testing.secagg_client.fixed_update_client`:
the ClientApp's own ``handle_key_stage`` and ``MaskedInputStage``).

Each attack is a lie of :class:`~fl_app.testing.adversary.AdversarialServer` rewriting
real instructions; the test names the client check it exercises, and fails when that
check is removed (the refusal it asserts would not happen, or a secret would leave):

* substituted keys at share-keys (the server's own X25519 pair for a neighbour);
* a split view of who dropped at unmask, after the survivors signed ``U3``;
* consistency signatures that are forged, too few, made on a different ``U3``, or a
  roster identity counted twice (at unmask, and among neighbours at share-keys).

Simulated clients sign with the in-process :class:`~fl_app.secagg.signing.SimulationRoster`;
the test plays a colluding client with that roster's key of one partition.
``honest_but_curious`` runs no such checks: the substituted key is used (the server
reads the shares it was sent), which the README's threat table states.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator

import numpy as np
import pytest

from fl_app.protocol import CONFIG_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg import crypto, signing
from fl_app.secagg.derive import derive_params
from fl_app.secagg.params import GraphMode, ServerModel
from fl_app.secagg.protocol import CIPHERTEXT_BYTES, _encryption_key
from fl_app.secagg.settings import SecAggSettings
from fl_app.secagg.vector import pack_ids, unpack_ids
from fl_app.secagg.wire import (
    SECAGG_CIPHERTEXTS,
    SECAGG_CONTEXT,
    SECAGG_IDENTITIES,
    SECAGG_KEYS,
    SECAGG_NODES,
    SECAGG_RECORD_KEY,
    SECAGG_REPLY_CIPHERTEXTS,
    SECAGG_REPLY_IDENTITY,
    SECAGG_REPLY_KEY_NODES,
    SECAGG_REPLY_NODES,
    SECAGG_REPLY_SIGNATURES,
    SECAGG_SIGNATURES,
    SECAGG_SIGNERS,
    SECAGG_SURVIVORS,
)
from fl_app.testing.adversary import AdversarialServer, split_view
from fl_app.testing.secagg_client import fixed_update_client
from tests.test_secagg_robust import _oracle

N = 10
DIM = 8
ARRAYS = {"w": np.zeros(DIM, np.float32)}
SIGNATURE = signing.SIGNATURE_BYTES


def _update(node: int) -> dict[str, np.ndarray]:
    u = np.random.default_rng(node % 2**32).normal(size=DIM)
    return {"w": (0.9 * u / np.linalg.norm(u)).astype(np.float32)}


def _server(
    model: ServerModel = ServerModel.malicious,
    mode: GraphMode = GraphMode.secagg,
    n: int = N,
    **settings: object,
) -> Iterator[AdversarialServer]:
    grid = InProcessGrid(fixed_update_client(_update), n, seed=N)
    kw: dict = {"mode": mode, "clip": 1.0, "stage_timeout_s": 5.0, "server_model": model}
    kw.update(settings)
    try:
        yield AdversarialServer(grid, SecAggSettings(**kw))
    finally:
        grid.close()


def _exact(nodes: list[int] | set[int]) -> np.ndarray:
    return np.sum([_update(v)["w"].astype(np.float64) for v in nodes], axis=0)


def _config(server: AdversarialServer, rnd: int, stage: int, node: int) -> dict:
    entry = next(e for e in server.sent(rnd, stage) if e.node == node)
    return dict(entry.message.content.config_records[CONFIG_KEY])


def _reply_record(server: AdversarialServer, rnd: int, stage: int, node: int) -> dict:
    entry = next(e for e in server.sent(rnd, stage) if e.node == node)
    assert entry.reply is not None and not entry.reply.has_error()
    return dict(entry.reply.content.config_records[SECAGG_RECORD_KEY])


def _neighbours(server: AdversarialServer, rnd: int, node: int) -> list[int]:
    return list(unpack_ids(_config(server, rnd, 2, node)[SECAGG_NODES]))


# -------------------------------------------------------------- honest rounds, dropouts
def test_malicious_rounds_stay_exact_under_random_dropouts() -> None:
    """Replies lost at any stage, consistency check included: the sum is exactly the
    one the property test's oracle (tests/test_secagg_robust.py) names, or the round is
    abandoned where the oracle says so (or the consistency check has fewer than t
    signers). The complete graph only (the malicious model refuses SecAgg+'s graph,
    tests below): a stage-1 dropout abandons the round (clients accept only the whole
    cohort as their neighbourhood), and unmasking needs the consistency quorum
    max(t, floor((n + C)/2) + 1) of signers, here max(7, 6) = 7 (n=10, D=3, C=1)."""
    rng = random.Random(2017)
    rnd = 0
    for mode in (GraphMode.secagg,):
        for server in _server(mode=mode, key_rounds=1, dropout_tolerance=0.3):
            params = derive_params(N, mode=mode.value, dropout_tolerance=0.3)
            ids = list(server.grid.node_ids)
            outcomes = set()
            for _ in range(4):
                rnd += 1
                rate = rng.choice([0.0, 0.08, 0.15])
                live: dict[int, set[int]] = {}
                alive = set(ids)
                lost: dict[int, set[int]] = {}
                for stage in (1, 2, 3, 5, 4):
                    gone = {u for u in alive if rng.random() < rate}
                    if stage == 1 and rnd % 4:
                        gone = set()  # stage-1 losses (abandoning) in one round of four
                    lost[stage], alive = gone, alive - gone
                    live[stage] = set(alive)
                out = server.run_round(rnd, ARRAYS, lost=lost)
                if live[1] != set(ids):
                    # A stage-1 dropout: no complete graph over the cohort, no stage 2.
                    assert out.decoded is None and not server.sent(rnd, 2), out.note
                    outcomes.add("abandoned")
                    continue
                graph = {u: _neighbours(server, rnd, u) for u in live[1]}
                oracle_live = {1: live[1], 2: live[2], 3: live[3], 4: live[4]}
                expected = _oracle(ids, oracle_live, graph, params.threshold, params.min_survivors)
                if expected is not None and len(set(expected) & live[5]) < 7:
                    expected = None
                if expected is None:
                    assert out.decoded is None, out.note
                    outcomes.add("abandoned")
                    continue
                assert out.decoded is not None, out.note
                assert out.num_contributors == len(expected)
                assert np.allclose(out.decoded.update["w"], _exact(expected), atol=1e-5)
                outcomes.add("exact with dropouts" if len(expected) < N else "exact")
            assert "exact with dropouts" in outcomes


# ------------------------------------------------------------------- substituted keys
@pytest.mark.parametrize("model", ["malicious", "honest_but_curious"])
def test_substituted_neighbour_keys(model: str) -> None:
    fake_c, fake_s = crypto.generate_private_key(), crypto.generate_private_key()
    swapped: dict[str, int] = {}

    def substitute(stage: int, node: int, config: dict) -> dict:
        if stage != 2 or swapped:
            return config
        first = unpack_ids(config[SECAGG_NODES])[0]
        keys = bytearray(config[SECAGG_KEYS])
        keys[: 2 * crypto.KEY_BYTES] = crypto.public_key_bytes(fake_c) + crypto.public_key_bytes(
            fake_s
        )
        config[SECAGG_KEYS] = bytes(keys)
        swapped.update(target=node, victim=first)
        return config

    for server in _server(ServerModel(model)):
        server.run_round(1, ARRAYS, [substitute])
        target, victim = swapped["target"], swapped["victim"]
        refusal = server.refusals(1, 2).get(target)
        if model == "malicious":
            # Checked before any share is encrypted: nothing for the fake key left.
            assert refusal is not None and "not signed by roster identity" in refusal
            return
        # honest_but_curious: the target encrypted its shares for the server's key, and
        # the server opens them (what this model does not protect against).
        assert refusal is None
        record = _reply_record(server, 1, 2, target)
        order = list(unpack_ids(record[SECAGG_REPLY_NODES]))
        i = order.index(victim)
        ct = record[SECAGG_REPLY_CIPHERTEXTS][i * CIPHERTEXT_BYTES : (i + 1) * CIPHERTEXT_BYTES]
        target_c_pk = next(
            e.reply.content.config_records[SECAGG_RECORD_KEY]["c-pk"][: crypto.KEY_BYTES]
            for e in server.sent(1, 1)
            if e.node == target and e.reply is not None
        )
        ctx = _config(server, 1, 2, target)[SECAGG_CONTEXT]
        key = _encryption_key(fake_c, target_c_pk, victim, target, ctx)
        plain = crypto.decrypt(key, ct, context=ctx, sender=target, recipient=victim)
        assert len(plain) > 0  # both of the target's shares held for the victim


# --------------------------------------------------------------------- split view
def test_a_split_view_after_the_consistency_check_is_refused() -> None:
    # Every survivor signed U3 (the target survived); at unmask half of them hear that
    # the target dropped. They refuse before revealing: no key share of the target.
    for server in _server():
        target = server.grid.node_ids[0]
        group = [v for v in server.grid.node_ids if v != target][:4]
        out = server.run_round(1, ARRAYS, [split_view(target, group)])
        assert out.decoded is None
        refusals = server.refusals(1, 4)
        assert set(group) <= set(refusals)
        assert all("differs from the survivor set" in refusals[v] for v in group)
        for e in server.sent(1, 4):
            if e.reply is not None and not e.reply.has_error():
                rec = e.reply.content.config_records[SECAGG_RECORD_KEY]
                assert target not in unpack_ids(rec[SECAGG_REPLY_KEY_NODES])


# -------------------------------------------------------- consistency signatures
def _signed(server: AdversarialServer, rnd: int) -> dict[int, tuple[str, bytes]]:
    """Consistency replies of round ``rnd``: node -> (identity, signature)."""
    out = {}
    for e in server.sent(rnd, 5):
        if e.reply is not None and not e.reply.has_error():
            rec = e.reply.content.config_records[SECAGG_RECORD_KEY]
            out[e.node] = (str(rec[SECAGG_REPLY_IDENTITY]), bytes(rec[SECAGG_REPLY_SIGNATURES]))
    return out


def _with_signers(config: dict, entries: list[tuple[int, str, bytes]]) -> dict:
    config[SECAGG_SIGNERS] = pack_ids([v for v, _, _ in entries])
    config[SECAGG_IDENTITIES] = json.dumps([name for _, name, _ in entries])
    config[SECAGG_SIGNATURES] = b"".join(sig for _, _, sig in entries)
    return config


ATTACKS = ["forged", "too_few", "other_set", "identity_reused"]
REASONS = {
    "forged": "does not verify",
    "too_few": "fewer than the 8 needed",
    "other_set": "does not verify",
    "identity_reused": "counted twice",
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_bad_consistency_signatures_are_refused(attack: str) -> None:
    for server in _server():
        _attack_consistency(server, attack)


def _attack_consistency(server: AdversarialServer, attack: str) -> None:
    # Complete graph, n=10, D=2, C=1: t=8; the quorum max(t, floor(11/2) + 1) = 8.
    t = 8
    ids = list(server.grid.node_ids)
    target = ids[0]
    told_dropped = set(ids[8:])  # "other_set": these 2 sign U3 without the target

    def at_check(stage: int, node: int, config: dict) -> dict:
        if attack == "other_set" and stage == 5 and node in told_dropped:
            u3 = [v for v in unpack_ids(config[SECAGG_SURVIVORS]) if v != target]
            config[SECAGG_SURVIVORS] = pack_ids(u3)
        return config

    def at_unmask(stage: int, node: int, config: dict) -> dict:
        if stage != 4:
            return config
        signers = list(unpack_ids(config[SECAGG_SIGNERS]))
        names = json.loads(config[SECAGG_IDENTITIES])
        sigs = config[SECAGG_SIGNATURES]
        entries = [
            (v, names[i], sigs[i * SIGNATURE : (i + 1) * SIGNATURE]) for i, v in enumerate(signers)
        ]
        if attack == "forged":
            v, name, sig = entries[0]
            entries[0] = (v, name, bytes([sig[0] ^ 1]) + sig[1:])
        elif attack == "too_few":
            entries = entries[: t - 1]
        elif attack == "other_set":
            # t signatures: the other group's honest ones, made on U3 without the
            # target, topped up with valid ones on this client's U3.
            other = [(v, *_signed(server, 1)[v]) for v in sorted(told_dropped)]
            valid = [e for e in entries if e[0] not in told_dropped]
            entries = other + valid[: t - len(other)]
        elif attack == "identity_reused":
            # A colluder c signs for a second node d under its own identity, bound to
            # d's real round keys: t valid signatures, t - 1 roster identities.
            outsider = ids[-1] if ids[-1] != node else ids[-2]
            c_entry = next(e for e in entries if e[0] not in (node, outsider))
            c_name = c_entry[1]
            stage2 = _config(server, 1, 2, node)
            ctx = stage2[SECAGG_CONTEXT]
            near = list(unpack_ids(stage2[SECAGG_NODES]))
            size = 2 * crypto.KEY_BYTES
            i = near.index(outsider)
            d_keys = stage2[SECAGG_KEYS][i * size : (i + 1) * size]
            u3 = unpack_ids(config[SECAGG_SURVIVORS])
            colluder = signing.SimulationRoster().signer(c_name)
            forged = colluder.sign(signing.survivors_message(ctx, outsider, c_name, d_keys, u3))
            rest = [e for e in entries if e[0] not in (outsider, c_entry[0])]
            entries = [c_entry, *rest[: t - 2], (outsider, c_name, forged)]
        return _with_signers(config, entries)

    out = server.run_round(1, ARRAYS, [at_check, at_unmask])
    assert out.decoded is None
    refusals = server.refusals(1, 4)
    sent = server.sent(1, 4)
    assert sent and len(refusals) == len(sent), refusals
    assert all(REASONS[attack] in r for r in refusals.values()), refusals


def test_a_roster_identity_reused_among_neighbours_is_refused() -> None:
    # The server shows a client two neighbours under one roster identity; the colluder
    # owning it signed the second node's real keys for it, so every signature verifies.
    hit: dict[str, int] = {}

    def reuse(stage: int, node: int, config: dict) -> dict:
        if stage != 2 or hit:
            return config
        nodes = list(unpack_ids(config[SECAGG_NODES]))
        names = json.loads(config[SECAGG_IDENTITIES])
        size = 2 * crypto.KEY_BYTES
        c_pk = config[SECAGG_KEYS][size : size + crypto.KEY_BYTES]
        s_pk = config[SECAGG_KEYS][size + crypto.KEY_BYTES : 2 * size]
        colluder = signing.SimulationRoster().signer(names[0])
        run_id, rnd = signing.parse_context(config[SECAGG_CONTEXT])
        sig = colluder.sign(signing.key_advert_message(run_id, rnd, nodes[1], names[0], c_pk, s_pk))
        names[1] = names[0]
        sigs = bytearray(config[SECAGG_SIGNATURES])
        sigs[SIGNATURE : 2 * SIGNATURE] = sig
        config[SECAGG_IDENTITIES] = json.dumps(names)
        config[SECAGG_SIGNATURES] = bytes(sigs)
        hit["node"] = node
        return config

    for server in _server():
        server.run_round(1, ARRAYS, [reuse])
        refusal = server.refusals(1, 2).get(hit["node"])
        assert refusal is not None and "used twice" in refusal, refusal


def test_ciphertexts_are_only_ever_sent_for_signed_keys() -> None:
    # Guard for the substituted-key test: an honest malicious-model round delivers every
    # share (the refusal above is the signature check's, not a broken round).
    for server in _server():
        out = server.run_round(1, ARRAYS)
        assert out.decoded is not None, out.note
        assert np.allclose(out.decoded.update["w"], _exact(server.grid.node_ids), atol=1e-5)
        cfg = _config(server, 1, 3, server.grid.node_ids[0])
        assert len(cfg[SECAGG_CIPHERTEXTS]) == CIPHERTEXT_BYTES * len(unpack_ids(cfg[SECAGG_NODES]))


# ------------------------------------------------------------ deployed identities
def test_deployed_sites_sign_with_node_key_files_and_the_roster(tmp_path) -> None:
    """``fl-app deploy node-key`` signing pairs, a roster file from ``deploy roster``,
    node configs naming them: a malicious-model round completes exactly; a site left off
    the roster makes its neighbours refuse (its keys verify against nothing), and a
    deployed site without its key files refuses, naming the node-config keys."""
    from fl_app.deploy.pki import create_signing_key, write_roster

    pubs = {}
    for i in range(N):
        _, pubs[f"site{i}"] = create_signing_key(tmp_path, f"site{i}")
    roster = write_roster(tmp_path / "roster.json", pubs)
    partial = write_roster(
        tmp_path / "partial.json", {k: v for k, v in pubs.items() if k != "site0"}
    )

    def deployed(roster_path: object, keys: bool = True):
        def node_config(i: int, n: int) -> dict:
            cfg = {"partition-id": 0, "num-partitions": 1, "site-name": f"site{i}"}
            if keys:
                cfg["signing-key-path"] = str(tmp_path / f"site{i}.sign")
                cfg["roster-path"] = str(roster_path)
            return cfg

        return node_config

    settings = SecAggSettings(
        mode=GraphMode.secagg, clip=1.0, stage_timeout_s=5.0, server_model=ServerModel.malicious
    )
    for case in ("roster", "partial", "no keys"):
        grid = InProcessGrid(
            fixed_update_client(_update),
            N,
            seed=N,
            node_config_fn=deployed(roster if case == "roster" else partial, case != "no keys"),
        )
        try:
            server = AdversarialServer(grid, settings)
            out = server.run_round(1, ARRAYS)
            if case == "roster":
                assert out.decoded is not None, out.note
                assert np.allclose(out.decoded.update["w"], _exact(grid.node_ids), atol=1e-5)
            elif case == "partial":
                # site0's own key is on no roster entry: it refuses at its first use
                # (stage 1), and without it the complete graph cannot form: the round
                # is abandoned before any share is encrypted.
                site0 = grid.node_ids[0]  # partition order: node i is site{i}
                refusals = server.refusals(1, 1)
                assert list(refusals) == [site0], refusals
                assert "does not match the roster entry of site-name 'site0'" in refusals[site0]
                assert out.decoded is None and not server.sent(1, 2)
            else:
                assert out.decoded is None
                refusals = server.refusals(1, 1)
                assert len(refusals) == N
                assert all("signing-key-path" in r for r in refusals.values())
        finally:
            grid.close()


def test_deploy_node_key_writes_the_signing_pair(tmp_path, capsys) -> None:
    import os

    from fl_app.cli.deploy import deploy_main

    deploy_main(["node-key", "--out", str(tmp_path), "--name", "clinic"])
    key = signing.load_signing_key(tmp_path / "clinic.sign")
    assert os.stat(tmp_path / "clinic.sign").st_mode & 0o077 == 0  # secret: owner only
    pub = (tmp_path / "clinic.sign.pub").read_text().strip()
    assert bytes.fromhex(pub) == signing.Signer("clinic", key).public_bytes()
    deploy_main(["roster", "--out", str(tmp_path / "r.json"), f"clinic={tmp_path}/clinic.sign.pub"])
    roster = signing.load_roster(tmp_path / "r.json")
    message = b"any message"
    assert roster.verify("clinic", message, key.sign(message))
    assert not roster.verify("other", message, key.sign(message))


# ------------------------------------------------------------------- signing units
def test_roster_files_are_checked_and_messages_bind_what_they_name(tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub = {n: signing.Signer(n, k).public_bytes().hex() for n, k in (("a", a), ("b", b))}
    bad = {
        "not json": "{",
        "empty": "{}",
        "short key": json.dumps({"a": pub["a"][:-2]}),
        "not hex": json.dumps({"a": "zz" * 32}),
        "shared key": json.dumps({"a": pub["a"], "b": pub["a"]}),
        "bad name": json.dumps({".hidden": pub["a"]}),
    }
    for why, text in bad.items():
        path = tmp_path / "roster.json"
        path.write_text(text)
        with pytest.raises(signing.RosterError, match="roster"):
            signing.load_roster(path)
            pytest.fail(f"roster accepted: {why}")
    path = tmp_path / "roster.json"
    path.write_text(json.dumps(pub))
    roster = signing.load_roster(path)
    k1, k2 = b"\x01" * 64, b"\x02" * 64
    msg = signing.survivors_message(b"ctx-bytes", 7, "a", k1, [3, 1, 2])
    # The set, not the order the server listed it in; other node, set, round or the
    # signer's round keys (fresh per run: no replay into a context the server chose) differ.
    assert msg == signing.survivors_message(b"ctx-bytes", 7, "a", k1, [2, 3, 1])
    for other in (
        signing.survivors_message(b"ctx-bytes", 8, "a", k1, [1, 2, 3]),
        signing.survivors_message(b"ctx-bytes", 7, "a", k1, [1, 2]),
        signing.survivors_message(b"ctx-bytez", 7, "a", k1, [1, 2, 3]),
        signing.survivors_message(b"ctx-bytes", 7, "a", k2, [1, 2, 3]),
    ):
        assert other != msg
    sig = a.sign(msg)
    assert roster.verify("a", msg, sig)
    assert not roster.verify("b", msg, sig)  # a's signature is not b's
    assert not roster.verify("c", msg, sig)  # not on the roster
    assert not roster.verify("a", msg, sig[:-1])
    keys = signing.key_advert_message(1, 2, 3, "a", b"\x01" * 32, b"\x02" * 32)
    assert keys != signing.key_advert_message(1, 3, 3, "a", b"\x01" * 32, b"\x02" * 32)
    assert keys != signing.key_advert_message(2, 2, 3, "a", b"\x01" * 32, b"\x02" * 32)
    assert keys != signing.key_advert_message(1, 2, 3, "a", b"\x02" * 32, b"\x01" * 32)
    from fl_app.secagg.protocol import round_context

    assert signing.parse_context(round_context(5, 9)) == (5, 9)
    with pytest.raises(signing.RosterError):
        signing.parse_context(b"not a context at all")


def test_keys_ahead_and_share_ahead_keep_their_signatures() -> None:
    # Round 1 advertises signed pairs for rounds 1-3; rounds 2 and 3 get their share-keys
    # stage on the previous unmask exchange (no stage 1 or 2 of their own), and every
    # client still verifies the pairs' signatures before sharing.
    for server in _server():
        ids = list(server.grid.node_ids)
        upcoming = functools.partial(lambda cohort, _: cohort, ids)
        for rnd in (1, 2, 3):
            out = server.run_round(rnd, ARRAYS, last_round=3, next_cohort=upcoming)
            assert out.decoded is not None, out.note
            assert np.allclose(out.decoded.update["w"], _exact(ids), atol=1e-5)
        assert not server.sent(2, 1) and not server.sent(2, 2) and not server.sent(3, 2)
        ahead = next(e for e in server.sent(2, 4))
        record = ahead.message.content.config_records["secagg-next"]
        assert len(record[SECAGG_SIGNATURES]) == SIGNATURE * len(unpack_ids(record[SECAGG_NODES]))


# ----------------------------------------------- red-team breaks (issue 16, review 2)
MALICIOUS = SecAggSettings(mode=GraphMode.secagg, clip=1.0, server_model=ServerModel.malicious)


def test_the_consistency_quorum_is_more_than_half_of_n_plus_c() -> None:
    # By hand: complete graph n=10, D=2, C=1 gives t=8 and floor(11/2)+1 = 6: quorum 8.
    # A client assuming more colluders than the round (C=9): floor(19/2)+1 = 10.
    # A threshold below half (t=3 at n=10, C=1, as SecAgg+'s t ~ k/2 was): 6.
    import dataclasses

    from fl_app.secagg.params import consistency_quorum

    p = derive_params(N, mode="secagg", dropout_tolerance=0.2)
    assert (p.threshold, p.max_corrupt) == (8, 1)
    assert consistency_quorum(p) == 8
    assert consistency_quorum(p, 9) == 10
    assert consistency_quorum(dataclasses.replace(p, threshold=3)) == 6


def test_disjoint_cliques_are_refused_at_share_keys() -> None:
    # a1b: disjoint cliques, each shown only itself as its graph, under SecAgg+'s
    # thresholds for n=12 (k=8, t=6: a clique of 6 gives each member t-1 neighbours,
    # and t signers): the server would learn each clique's sum. Every client refuses
    # before encrypting a share.
    from fl_app.testing.adversary import sparse_graph

    for server in _server(n=12):
        ids = list(server.grid.node_ids)
        out = server.run_round(1, ARRAYS, [sparse_graph([ids[:6], ids[6:]])])
        assert out.decoded is None
        refusals = server.refusals(1, 2)
        assert len(refusals) == 12, refusals
        assert all("only the complete graph over the cohort" in r for r in refusals.values())
        assert not server.sent(1, 3)


def test_a_made_up_cohort_is_refused_at_share_keys() -> None:
    # a2: the server announces 14 members where 10 exist, with SecAgg+ parameters for 14
    # (k=12, t=8, floor 10: the 9 real neighbours fit them), so floors, survivor counts
    # and n_min would count 14; no client has a signed key for the 4 made-up ids, so
    # its neighbourhood is not the cohort: refused before any share leaves.
    from fl_app.testing.adversary import made_up_cohort

    for server in _server():
        fakes = [2**40 + i for i in range(4)]
        lie = made_up_cohort(fakes, mode="secaggplus", dropout_tolerance=0.3)
        out = server.run_round(1, ARRAYS, [lie])
        assert out.decoded is None
        refusals = server.refusals(1, 2)
        assert len(refusals) == N, refusals
        assert all("9 of this client's 13 cohort peers" in r for r in refusals.values())
        assert not server.sent(1, 3)


def test_consistency_signatures_do_not_replay_into_another_run(monkeypatch) -> None:
    # The server reuses run 1's round context for run 2 (same run id, round and nodes:
    # restarted clients) and presents run 1's consistency signatures on the same U3.
    # Each signature binds its signer's round keys, fresh in run 2: none verifies.
    first = InProcessGrid(fixed_update_client(_update), N, seed=N)
    try:
        server = AdversarialServer(first, MALICIOUS)
        assert server.run_round(1, ARRAYS).decoded is not None
        node = first.node_ids[0]
        ctx = _config(server, 1, 2, node)[SECAGG_CONTEXT]
        old = _config(server, 1, 4, node)
    finally:
        first.close()
    monkeypatch.setattr("strategies.secagg.aggregation.round_context", lambda run_id, rnd, **_: ctx)

    def replay(stage: int, node: int, config: dict) -> dict:
        if stage == 4:
            for key in (SECAGG_SIGNERS, SECAGG_IDENTITIES, SECAGG_SIGNATURES):
                config[key] = old[key]
        return config

    for server in _server():
        out = server.run_round(1, ARRAYS, [replay])
        assert _config(server, 1, 2, node)[SECAGG_CONTEXT] == ctx  # the context reused
        assert out.decoded is None
        refusals = server.refusals(1, 4)
        assert len(refusals) == N, refusals
        assert all("does not verify" in r for r in refusals.values()), refusals


def test_an_unmarked_process_never_uses_the_simulation_roster(monkeypatch) -> None:
    # a3: a deployed SuperNode with only partition-id in its node config. Without the
    # simulation entry point's mark it refuses at its first signature, naming the keys.
    for server in _server():
        monkeypatch.delenv(signing.SIMULATION_SECRET_ENV)
        out = server.run_round(1, ARRAYS)
        assert out.decoded is None
        refusals = server.refusals(1, 1)
        assert len(refusals) == N, refusals
        assert all("'signing-key-path'" in r and "'roster-path'" in r for r in refusals.values())
        with pytest.raises(signing.RosterError, match="not started by a simulation"):
            signing.SimulationRoster()


def _deployed_grid(tmp_path, policy=None) -> InProcessGrid:
    from fl_app.deploy.pki import create_signing_key, write_roster

    pubs = {}
    for i in range(N):
        _, pubs[f"site{i}"] = create_signing_key(tmp_path, f"site{i}")
    roster = write_roster(tmp_path / "roster.json", pubs)

    def node_config(i: int, n: int) -> dict:
        return {
            "partition-id": 0,
            "num-partitions": 1,
            "site-name": f"site{i}",
            "signing-key-path": str(tmp_path / f"site{i}.sign"),
            "roster-path": str(roster),
        }

    client = fixed_update_client(_update, policy=policy)
    return InProcessGrid(client, N, seed=N, node_config_fn=node_config)


def test_a_signing_key_readable_by_others_is_refused(tmp_path) -> None:
    # a4 (a): site3's key file is 0644; it refuses at its first use (stage 1), naming
    # the file and the fix. Without it there is no complete graph: nothing is shared.
    import os

    grid = _deployed_grid(tmp_path)
    os.chmod(tmp_path / "site3.sign", 0o644)
    try:
        server = AdversarialServer(grid, MALICIOUS)
        out = server.run_round(1, ARRAYS)
        refusals = server.refusals(1, 1)
        site3 = grid.node_ids[3]
        assert list(refusals) == [site3], refusals
        assert f"chmod 600 {tmp_path / 'site3.sign'}" in refusals[site3]
        assert out.decoded is None and not server.sent(1, 2)
    finally:
        grid.close()


@pytest.mark.parametrize("explicit", [False, True])
def test_a_roster_site_refuses_honest_but_curious_unless_its_policy_says_so(
    tmp_path, explicit: bool
) -> None:
    # a4 (c): a site with a key and roster and no explicit secagg_min_server_model would
    # otherwise accept the cheaper thresholds a server downgrades it to.
    from fl_app.client.policy_file import parse_policy

    policy = parse_policy({"secagg_min_server_model": "honest_but_curious"}) if explicit else None
    grid = _deployed_grid(tmp_path, policy)
    try:
        server = AdversarialServer(grid, SecAggSettings(mode=GraphMode.secaggplus, clip=1.0))
        out = server.run_round(1, ARRAYS)
        refusals = server.refusals(1, 2)
        if explicit:
            assert not refusals and out.decoded is not None, refusals
            return
        assert len(refusals) == N and out.decoded is None
        assert all("secagg_min_server_model" in r for r in refusals.values()), refusals
        assert not server.sent(1, 3)
    finally:
        grid.close()


def test_secaggplus_with_the_malicious_model_is_a_config_error() -> None:
    # Explicit rather than a silent switch to the complete graph: the user asked for
    # SecAgg+'s O(log n) cost, which this model cannot give safely.
    from fl_app.config.compose import compose_config
    from fl_app.config.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        compose_config("config", ["secagg=secaggplus", "secagg.clip=1",
                                  "secagg.server_model=malicious"])  # fmt: skip
    assert info.value.field == "secagg.server_model"
    assert "Use secagg=secagg with secagg.server_model=malicious" in str(info.value)
    cfg = compose_config("config", ["secagg=secagg", "secagg.clip=1",
                                    "secagg.server_model=malicious"])  # fmt: skip
    assert cfg.secagg.server_model.value == "malicious"
    with pytest.raises(ValueError, match="Run with secagg=secagg"):
        SecAggSettings(mode=GraphMode.secaggplus, server_model=ServerModel.malicious)


def test_signing_units_key_mode_round_keys_and_the_simulation_mark(tmp_path, monkeypatch) -> None:
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = tmp_path / "k.sign"
    path.write_bytes(signing.signing_key_pem(Ed25519PrivateKey.generate()))
    for mode, ok in ((0o600, True), (0o400, True), (0o700, True), (0o640, False),
                     (0o604, False), (0o620, False), (0o602, False)):  # fmt: skip
        os.chmod(path, mode)
        if ok:
            signing.load_signing_key(path)
        else:
            with pytest.raises(signing.RosterError, match=f"mode {mode:o}.*chmod 600"):
                signing.load_signing_key(path)
    with pytest.raises(signing.RosterError, match="cannot load it"):
        signing.load_signing_key(tmp_path / "absent.sign")
    with pytest.raises(signing.RosterError, match="c_pk"):
        signing.survivors_message(b"ctx", 1, "a", b"\x01" * 63, [1])
    monkeypatch.delenv(signing.SIMULATION_SECRET_ENV, raising=False)
    assert not signing.in_simulation()
    first = signing.start_simulation_roster()
    assert signing.in_simulation() and len(first) == 32
    assert signing.start_simulation_roster() == first  # drawn once, then inherited
    assert signing.SimulationRoster().secret == first


def test_share_keys_round_shape_checks_with_the_sites_own_colluder_bound() -> None:
    # Complete graph n=10, D=2: t=8. With the site assuming C colluders: 2t > n + C
    # holds for C=5 (16 > 15), not for C=6 (16 = 16); the returned C sizes the quorum.
    from fl_app.client.policy import SitePolicy
    from fl_app.secagg.client import SecAggStageError
    from fl_app.secagg.client.checks import _check_malicious_round

    p = derive_params(N, mode="secagg", dropout_tolerance=0.2)
    cohort = list(range(1, N + 1))
    peers = cohort[1:]
    assert _check_malicious_round(p, cohort, 1, peers, SitePolicy()) == 1
    assert (
        _check_malicious_round(p, cohort, 1, peers, SitePolicy(secagg_min_corrupt_clients=5)) == 5
    )
    assert (
        _check_malicious_round(p, cohort, 1, peers, SitePolicy(secagg_min_corrupt_fraction=0.5))
        == 5
    )
    with pytest.raises(SecAggStageError, match="t=8 with n=10 and C=6"):
        _check_malicious_round(p, cohort, 1, peers, SitePolicy(secagg_min_corrupt_clients=6))
    with pytest.raises(
        SecAggStageError, match=r"9 of this client's 9 cohort peers .* \(1 others\)"
    ):
        _check_malicious_round(p, cohort, 1, [*peers, 99], SitePolicy())
    with pytest.raises(
        SecAggStageError, match=r"8 of this client's 9 cohort peers .* \(0 others\)"
    ):
        _check_malicious_round(p, cohort, 1, peers[1:], SitePolicy())
