"""A deviating server against real secure-aggregation clients: every lie is refused.

The server side is the real :class:`~strategies.secagg.SecureAggregation`; each lie
(:mod:`fl_app.testing.adversary`) rewrites its instructions before they reach clients
that run the ClientApp's own stage handlers (:func:`fixed_update_client`: the same
``handle_key_stage`` and ``MaskedInputStage`` the ClientApp calls). Guarantees:

* stage-4 lists are checked against the cohort received at stage 2: padded ids,
  repeated ids and neighbours that never shared are refused, and survivors are
  counted against the client's own floor, not the server's word;
* parameters weaker than the site's floor (security bits, dropout tolerance, assumed
  colluders, hand-picked ``(k, t)``, distributed DP's ``n_min``) are refused at the
  stage that carries them, with the policy field named;
* a split view of who dropped never yields ``t`` shares of both secrets of a node;
* a replayed or out-of-order round is refused;
* ``b_u``, ``s_sk_u`` and ``c_sk_u`` leave ``Context.state`` when the masked input is
  built, everything after stage 4, and nothing of a round outlives an abandoned round
  but the shares its unmask would have needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest

from fl_app.client.policy import SitePolicy
from fl_app.protocol import CONFIG_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.derive import derive_params
from fl_app.secagg.params import GraphMode, ServerModel
from fl_app.secagg.settings import SecAggSettings
from fl_app.secagg.vector import unpack_ids
from fl_app.secagg.wire import (
    SECAGG_DDP,
    SECAGG_NODES,
    SECAGG_RECORD_KEY,
    SECAGG_REPLY_KEY_NODES,
    SECAGG_REPLY_SELF_MASK_NODES,
)
from fl_app.testing.adversary import (
    AdversarialServer,
    claim_dropout,
    pad_survivors,
    sparse_graph,
    split_view,
    weaker_params,
)
from fl_app.testing.secagg_client import fixed_update_client

N = 10
DIM = 16
RNG = np.random.default_rng(16)
UPDATES = {}


def _update(node: int) -> dict[str, np.ndarray]:
    if node not in UPDATES:
        u = RNG.normal(size=DIM)
        UPDATES[node] = {"w": (0.9 * u / np.linalg.norm(u)).astype(np.float32)}
    return UPDATES[node]


def _server(policy: SitePolicy | None = None, n: int = N, **settings: object) -> Iterator:
    grid = InProcessGrid(fixed_update_client(_update, policy=policy), n, seed=n)
    kw: dict = {"mode": GraphMode.secaggplus, "clip": 1.0, "stage_timeout_s": 5.0}
    kw.update(settings)
    server = AdversarialServer(grid, SecAggSettings(**kw))
    try:
        yield server
    finally:
        grid.close()


@pytest.fixture
def server() -> Iterator[AdversarialServer]:
    yield from _server()


ARRAYS = {"w": np.zeros(DIM, np.float32)}


def _exact(server: AdversarialServer, nodes: list[int]) -> np.ndarray:
    return np.sum([_update(v)["w"].astype(np.float64) for v in nodes], axis=0)


def test_honest_rounds_through_the_harness_are_exact(server: AdversarialServer) -> None:
    for rnd in (1, 2):
        out = server.run_round(rnd, ARRAYS, last_round=3)
        assert out.decoded is not None, out.note
        got = out.decoded.update["w"]
        assert np.allclose(got, _exact(server, server.grid.node_ids), atol=1e-5)


# ------------------------------------------------------------- stage-4 lists
def test_survivor_list_padded_with_outside_ids_is_refused(server: AdversarialServer) -> None:
    params = derive_params(N, mode="secaggplus", dropout_tolerance=0.2)
    floor = params.min_survivors  # 8 of 10
    fakes = [2**40 + i for i in range(floor)]  # enough to pass any count
    out = server.run_round(1, ARRAYS, [pad_survivors(fakes, keep=floor - 1)])
    assert out.decoded is None
    refusals = server.refusals(1, 4)
    assert len(refusals) == len(server.sent(1, 4)) > 0
    assert all("not in the cohort" in r for r in refusals.values()), refusals


def test_survivor_list_with_repeated_ids_is_refused(server: AdversarialServer) -> None:
    def repeat(stage: int, node: int, config: dict) -> dict:
        if stage == 4:
            ids = unpack_ids(config["fl-app.secagg.survivors"])
            config["fl-app.secagg.survivors"] = np.asarray(ids + ids[:3], ">u8").tobytes()
        return config

    out = server.run_round(1, ARRAYS, [repeat])
    assert out.decoded is None
    assert all("listed twice" in r for r in server.refusals(1, 4).values())


def test_a_client_listed_as_dropout_after_its_input_arrived_reveals_nothing(
    server: AdversarialServer,
) -> None:
    target = server.grid.node_ids[0]
    out = server.run_round(1, ARRAYS, [claim_dropout(target)])
    assert out.decoded is None  # the target refuses; nobody returns its b-shares
    assert "not listed as a survivor" in server.refusals(1, 4)[target]
    b_holders = _share_senders(server, 1, target, SECAGG_REPLY_SELF_MASK_NODES)
    assert b_holders == set()


def _share_senders(server: AdversarialServer, rnd: int, node: int, key: str) -> set[int]:
    """Clients whose stage-4 reply handed the server a share of ``node``'s secret."""
    out = set()
    for e in server.sent(rnd, 4):
        if e.reply is None or e.reply.has_error():
            continue
        rec = e.reply.content.config_records[SECAGG_RECORD_KEY]
        if node in unpack_ids(rec[key]):
            out.add(e.node)
    return out


@pytest.mark.parametrize("split", [1, 3, 5])
def test_split_view_never_yields_both_secrets_of_a_node(split: int) -> None:
    # Complete graph on 10 (k = 9, t = 8): tell `split` holders that the target dropped.
    for server in _server(mode=GraphMode.secagg, server_model=ServerModel.malicious):
        target = server.grid.node_ids[0]
        others = [v for v in server.grid.node_ids if v != target]
        server.run_round(1, ARRAYS, [split_view(target, others[:split])])
        params = derive_params(N, mode="secagg", dropout_tolerance=0.2)
        b = _share_senders(server, 1, target, SECAGG_REPLY_SELF_MASK_NODES)
        s = _share_senders(server, 1, target, SECAGG_REPLY_KEY_NODES)
        assert not b & s  # an honest client answers for one secret of a node only
        assert len(b) + len(s) <= params.degree + 1 < 2 * params.threshold
        assert min(len(b), len(s)) < params.threshold


def test_neighbour_that_never_shared_cannot_be_listed(server: AdversarialServer) -> None:
    # The server drops node 0's stage-2 shares on their way to everyone but lists 0 as
    # a survivor at stage 4: its neighbours never got its shares, so 0 is not in U2.
    target = server.grid.node_ids[0]

    def withhold(stage: int, node: int, config: dict) -> dict:
        if stage != 3:
            return config
        senders = unpack_ids(config["fl-app.secagg.nodes"])
        if target in senders:
            i = senders.index(target)
            raw = config["fl-app.secagg.ciphertexts"]
            size = len(raw) // len(senders)
            config["fl-app.secagg.nodes"] = np.asarray(
                senders[:i] + senders[i + 1 :], ">u8"
            ).tobytes()
            config["fl-app.secagg.ciphertexts"] = raw[: i * size] + raw[(i + 1) * size :]
        return config

    server.run_round(1, ARRAYS, [withhold])
    refusals = server.refusals(1, 4)
    assert refusals and all("never sent this client their shares" in r for r in refusals.values())


# ------------------------------------------------------------ weaker parameters
STRICT = SitePolicy(secagg_max_dropout_tolerance=0.2)
# The site assumes >= 2 of 10 collude; the honest server derives for 0.2 (C = 2).
COLLUDERS = SitePolicy(secagg_min_corrupt_fraction=0.2)


@pytest.mark.parametrize(
    ("lie", "field", "policy"),
    [
        (weaker_params(security_bits=10), "secagg_min_security_bits", None),
        (weaker_params(corrupt_fraction=0.0), "secagg_min_corrupt_fraction", COLLUDERS),
        (weaker_params(dropout_tolerance=0.3), "secagg_max_dropout_tolerance", STRICT),
        (weaker_params(custom=(4, 4)), "secagg_allow_custom_params", None),
    ],
    ids=["security-bits", "corrupt-fraction", "dropout-tolerance", "custom"],
)
def test_weaker_parameters_are_refused_at_stage_2(
    lie: object, field: str, policy: SitePolicy | None
) -> None:
    extra = {"corrupt_fraction": 0.2} if policy is COLLUDERS else {}
    for server in _server(policy, **extra):
        # The honest parameters pass the same site's policy.
        assert server.run_round(1, ARRAYS, last_round=3).decoded is not None
        out = server.run_round(2, ARRAYS, [lie], last_round=3)  # type: ignore[list-item]
        assert out.decoded is None
        refusals = server.refusals(2, 2)
        assert len(refusals) == N
        assert all(f"site policy `{field}`" in r for r in refusals.values()), refusals


def test_custom_threshold_with_2t_equal_k_plus_1_is_refused_even_when_opted_in() -> None:
    # n = 6, complete graph k = 5, t = 3: 2t = k + 1, two disjoint sets of 3 honest
    # holders (one per secret) would hand the server a client's input.
    for server in _server(SitePolicy(secagg_allow_custom_params=True), n=6, mode=GraphMode.secagg):
        out = server.run_round(1, ARRAYS, [weaker_params(custom=(5, 3))])
        assert out.decoded is None
        assert all("2t > degree+1" in r for r in server.refusals(1, 2).values())
    # Opted in, valid custom parameters (k = 5, t = 4) run.
    for server in _server(SitePolicy(secagg_allow_custom_params=True), n=6, mode=GraphMode.secagg):
        out = server.run_round(1, ARRAYS, [weaker_params(custom=(5, 4))])
        assert out.decoded is not None, out.note


def test_distributed_dp_n_min_below_the_site_floor_is_refused_at_stage_3() -> None:
    from fl_app.privacy.distributed import DdpPlan

    plan = DdpPlan(
        clip=1.0, dim=DIM, bits=32, noise_multiplier=1.0, max_cohort=N, dropout_tolerance=0.2
    )

    def fewer(stage: int, node: int, config: dict) -> dict:
        if stage == 3:
            raw = json.loads(config[SECAGG_DDP])
            # 4 of 10 survivors, shares scaled up to keep the stated sigma: a server
            # that would unmask a sum of 4 inputs (more than half may drop).
            raw["share_std"] *= math.sqrt(raw["min_survivors"] / 4)
            raw["min_survivors"] = 4
            config[SECAGG_DDP] = json.dumps(raw, sort_keys=True)
        return config

    for server in _server(bits=32):
        server.ddp = plan
        server.__post_init__()
        out = server.run_round(1, ARRAYS, [fewer])
        assert out.decoded is None
        refusals = server.refusals(1, 3)
        assert len(refusals) == N
        assert all("secagg_max_dropout_tolerance" in r for r in refusals.values())
    for server in _server(SitePolicy(ddp_min_noise_multiplier=2.0), bits=32):
        server.ddp = plan  # z = 1 < 2
        server.__post_init__()
        server.run_round(1, ARRAYS)
        assert all("ddp_min_noise_multiplier" in r for r in server.refusals(1, 3).values())


# -------------------------------------------------------------- round order
def test_replayed_and_out_of_order_rounds_are_refused(server: AdversarialServer) -> None:
    for rnd in (1, 2):
        assert server.run_round(rnd, ARRAYS, last_round=4).decoded is not None
    stage1 = server.sent(1, 1)[0]
    stage3 = server.sent(2, 3)[0]
    stage4 = server.sent(2, 4)[0]
    assert "moved on to round" in str(server.replay(stage1).refusal)
    assert "already sent its masked input for round 2" in str(server.replay(stage3).refusal)
    assert server.replay(stage4).refusal is not None
    # Re-running round 2 from stage 1 (fresh keys, a new cohort) is refused too.
    rerun = server.replay(stage1, {"server-round": 2})
    assert "already sent its masked input for round 2" in str(rerun.refusal)
    # The run goes on: round 3 still works for everyone.
    out = server.run_round(3, ARRAYS, last_round=4)
    assert out.decoded is not None and out.num_contributors == N, out.note


# ---------------------------------------------------------------- secrets
SECRETS = {"b", "c_sk", "s_sk", "enc_keys"}


def test_round_secrets_leave_the_state_as_soon_as_they_are_used() -> None:
    for server in _server(key_rounds=1):
        out = server.run_round(1, ARRAYS, last_round=2)
        assert out.decoded is not None
        for node in server.grid.node_ids:
            assert server.state_after[(1, 1, node)] == frozenset()  # keys in the key store
            after2 = server.state_after[(1, 2, node)]
            assert SECRETS - {"enc_keys"} <= after2  # needed to mask
            after3 = server.state_after[(1, 3, node)]
            assert not after3 & SECRETS and "shares" in after3  # shares kept for stage 4
            assert server.state_after[(1, 4, node)] == frozenset()


def test_an_abandoned_round_leaves_no_key_or_seed(server: AdversarialServer) -> None:
    # Stage 4 never reaches anyone (the server abandons after stage 3).
    victims = server.grid.node_ids[:3]
    for v in victims:  # too many stage-3 dropouts: abandoned before unmasking
        server.grid.drop_at(v, message_type="train", nth=3)
    out = server.run_round(1, ARRAYS, last_round=3)
    assert out.decoded is None and "abandoned" in out.note
    from fl_app.secagg.client import STATE_KEY

    for node in server.grid.node_ids:
        record = server.grid.context(node).state.get(STATE_KEY)
        keys = set(record.keys()) if record is not None else set()
        assert not keys & SECRETS, (node, keys)


# ------------------------------------------------- through the real driver and app
def _lie_through_the_app(tmp_path, lie, overrides: list[str]) -> list[dict]:
    """Run fl-app's ServerApp and ClientApp on N in-process nodes with ``lie`` applied to
    the server's instructions; the run's metrics.jsonl rows."""
    from fl_app.client.app import app as client_app
    from fl_app.config.compose import compose_config
    from fl_app.server.app import run_experiment
    from fl_app.testing.adversary import LyingGrid

    base = ["runtime=inprocess", "federated_eval_every=0", "server_eval=false",
            "secagg.clip=2.0", "secagg.stage_timeout_s=5"]  # fmt: skip
    cfg = compose_config("config", [*base, *overrides])
    grid = InProcessGrid(client_app, N, seed=cfg.seed)
    try:
        run_experiment(LyingGrid(grid, lie), cfg, tmp_path, progress=False)
    finally:
        grid.close()
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_lies_through_the_real_driver_and_client_app(tmp_path) -> None:
    # Round 1: padded survivor list; round 2: weaker parameters; round 3: honest.
    pad = pad_survivors([2**40 + i for i in range(N)], keep=3)
    weak = weaker_params(security_bits=10)

    def lie(rnd: int, stage: int, node: int, config: dict) -> dict:
        if rnd == 1:
            return pad(stage, node, config)
        if rnd == 2:
            return weak(stage, node, config)
        return config

    # secagg.key_rounds=1: stage 2 in every round (no share-ahead)
    lines = _lie_through_the_app(
        tmp_path, lie, ["secagg=secaggplus", "secagg.key_rounds=1", "num_rounds=3"]
    )
    assert [r["model_updated"] for r in lines] == [False, False, True]
    assert len(lines[0]["failures"]) == N
    assert all("not in the cohort" in f["reason"] for f in lines[0]["failures"])
    assert len(lines[1]["failures"]) == N
    field = "site policy `secagg_min_security_bits`"
    assert all(field in f["reason"] for f in lines[1]["failures"])
    assert lines[2]["secagg_contributors"] == N


# ------------------------------------------- split view plus colluding neighbours
def test_a_sparse_graph_under_the_malicious_model_is_refused_before_any_share() -> None:
    # SecAgg+ on 10 clients under the malicious model: the graph is the server's choice
    # and a client cannot tell an honestly drawn Harary graph from one built around a
    # victim (colluders next to it, or disjoint cliques: red-team report, breaks 1).
    # Every client refuses at stage 2, before it encrypts a share; nothing is masked.
    for server in _server(n=10, mode=GraphMode.secagg, server_model=ServerModel.malicious):
        params = derive_params(10, mode="secaggplus", dropout_tolerance=0.2)
        assert (params.degree, params.threshold) == (8, 6)  # what the lie sends
        out = server.run_round(1, ARRAYS, [sparse_graph()])
        assert out.decoded is None
        refusals = server.refusals(1, 2)
        assert len(refusals) == 10, refusals
        assert all("only the complete graph over the cohort" in r for r in refusals.values())
        assert not server.sent(1, 3)


def test_honest_but_curious_thresholds_do_not_survive_a_split_view_with_a_colluder() -> None:
    # What secagg.server_model=honest_but_curious does not protect (README threat table):
    # its semi-honest thresholds (k = 6, t = 4 at n = 10: 2t > k + 1 but not k + 2) let
    # the same split view plus one colluding neighbour collect t shares of *both* of the
    # target's secrets, i.e. its input. The mode assumes a server following the protocol.
    for server in _server(n=10, mode=GraphMode.secaggplus):
        assert server.settings.server_model is ServerModel.honest_but_curious  # the default
        target = server.grid.node_ids[0]
        colluder = _split_view_with_a_colluder(server, target)
        b = _share_senders(server, 1, target, SECAGG_REPLY_SELF_MASK_NODES) - {colluder}
        s = _share_senders(server, 1, target, SECAGG_REPLY_KEY_NODES) - {colluder}
        assert not b & s and len(b) >= 1 and len(s) >= 1  # the split view was delivered
        t = 4  # semi-honest threshold at n = 10 (test_secagg_server_model.py, by hand)
        assert len(b) + 1 >= t and len(s) + 1 >= t


def _split_view_with_a_colluder(server: AdversarialServer, target: int) -> int:
    """Round 1 with the target's honest holders split in halves; returns the colluder."""
    split: dict[str, set[int]] = {}

    def lie(stage: int, node: int, config: dict) -> dict:
        if stage == 4 and not split:
            first = next(e for e in server.sent(1, 2) if e.node == target)
            rec = first.message.content.config_records[CONFIG_KEY]
            neighbours = sorted(unpack_ids(rec[SECAGG_NODES]))
            honest = [target, *neighbours[1:]]  # neighbours[0] colludes
            split["colluder"] = {neighbours[0]}
            split["dropped"] = set(honest[len(honest) // 2 + len(honest) % 2 :])
        if node in split.get("dropped", ()):
            return split_view(target, split["dropped"])(stage, node, config)
        return config

    server.run_round(1, ARRAYS, [lie])
    return next(iter(split["colluder"]))


# ------------------------------------------------ tiny cohorts, switched-off noise
def _fewer_colluders(stage: int, node: int, config: dict) -> dict:
    """Stage 2: parameters re-derived for C = 0 (what floor(0.1 * n) gives below 10)."""
    from fl_app.secagg.wire import SECAGG_PARAMS

    if stage == 2:
        raw = json.loads(config[SECAGG_PARAMS])
        weak = derive_params(
            raw["num_clients"],
            mode=raw["mode"],
            dropout_tolerance=raw["dropout_tolerance"],
            corrupt_fraction=0.0,
            min_corrupt=0,
        )
        config[SECAGG_PARAMS] = json.dumps(weak.to_config(), sort_keys=True)
    return config


def test_a_tiny_cohort_assuming_no_colluder_is_refused_by_default() -> None:
    # 5 clients: floor(0.1 * 5) = 0 colluders passed the default floor, so a server
    # running [target, sybil, ...] with C = 0 thresholds was accepted. The default site
    # assumes at least 1; the honest derivation (C = 1) runs.
    for server in _server(n=5):
        assert server.run_round(1, ARRAYS, last_round=3).decoded is not None
        out = server.run_round(2, ARRAYS, [_fewer_colluders], last_round=3)
        assert out.decoded is None
        refusals = server.refusals(2, 2)
        assert len(refusals) == 5
        assert all("site policy `secagg_min_corrupt_clients`" in r for r in refusals.values())
    # A site that sets a minimum cohort size refuses smaller cohorts, field named.
    for server in _server(SitePolicy(secagg_min_cohort_size=8), n=5):
        assert server.run_round(1, ARRAYS).decoded is None
        refusals = server.refusals(1, 2)
        assert len(refusals) == 5
        assert all("site policy `secagg_min_cohort_size`" in r for r in refusals.values())


def test_distributed_dp_noise_switched_off_is_refused_without_a_policy_file() -> None:
    # share_std = 1e-12 (z ~ 1e-12): accepted when the default floor was unset.
    from fl_app.privacy.distributed import DdpPlan

    plan = DdpPlan(
        clip=1.0, dim=DIM, bits=32, noise_multiplier=1.0, max_cohort=N, dropout_tolerance=0.2
    )

    def silent(stage: int, node: int, config: dict) -> dict:
        if stage == 3:
            raw = json.loads(config[SECAGG_DDP])
            raw["share_std"] = 1e-12
            config[SECAGG_DDP] = json.dumps(raw, sort_keys=True)
        return config

    for server in _server(bits=32):  # policy None: the ClientApp's defaults
        server.ddp = plan
        server.__post_init__()
        assert server.run_round(1, ARRAYS, last_round=3).decoded is not None  # z = 1 runs
        out = server.run_round(2, ARRAYS, [silent], last_round=3)
        assert out.decoded is None
        refusals = server.refusals(2, 3)
        assert len(refusals) == N
        assert all("site policy `ddp_min_noise_multiplier`" in r for r in refusals.values())


# ------------------------------------------------ one client, a spec of its own
def test_a_client_sent_a_spec_of_its_own_refuses_before_training(tmp_path) -> None:
    # The isolation attack on the count sketch (docs/compression.md): a server hands one
    # client its own run key, so its own sketch hashes, and unsketches the masked sum with
    # them. The round context binds the spec (protocol.spec_binding): the target's context
    # names the others' spec, so it refuses at stage 3, before training, and the round
    # goes on without it; nothing of the target is in the sum.
    from fl_app.protocol import SPEC_KEY

    targets: list[int] = []

    def own_spec(rnd: int, stage: int, node: int, config: dict) -> dict:
        if stage == 3 and rnd == 1 and (not targets or node == targets[0]):
            targets[:1] = [node]
            spec = json.loads(config[SPEC_KEY])
            spec["run_key"] = spec["run_key"][::-1]  # same form, other hashes
            config[SPEC_KEY] = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return config

    (line,) = _lie_through_the_app(
        tmp_path,
        own_spec,
        ["secagg=secagg", "secagg.server_model=malicious", "share.compression=sketch",
         "share.artifact=compressed", "share.ratio=0.25", "num_rounds=1"],
    )  # fmt: skip
    assert [f["node"] for f in line["failures"]] == targets
    assert "does not bind the client spec" in line["failures"][0]["reason"]
    assert line["model_updated"] is True
    assert line["secagg_contributors"] == N - 1
