"""Red-team pass 3 on the malicious server model, each break through the real client.

B1: a site with a signing key and roster (set up for a server it does not trust) and no
policy file answered a plain train (raw update) and a federated evaluation (per-client
metrics): the malicious floor was applied only at the key stages. Now one effective
policy serves every handler.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client_spec import encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.protocol import CONFIG_KEY, SERVER_ROUND, SPEC_KEY
from fl_app.server.app import initial_arrays
from fl_app.weights import to_array_record


def _identity_site(tmp_path: Path, policy: str | None) -> Iterator[Context]:
    """A deployed site's context (key, roster, site-name, optional policy file), inside
    an in-process grid (which sets Flower's task identity for Message)."""
    from fl_app.deploy.pki import create_signing_key, write_roster
    from fl_app.runtime.inprocess import InProcessGrid

    _, pub = create_signing_key(tmp_path, "site0")
    roster = write_roster(tmp_path / "roster.json", {"site0": pub})
    node_config: dict[str, Any] = {
        "partition-id": 0,
        "num-partitions": 1,
        "site-name": "site0",
        "signing-key-path": str(tmp_path / "site0.sign"),
        "roster-path": str(roster),
    }
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(policy, encoding="utf-8")
        node_config["policy-path"] = str(tmp_path / "policy.yaml")
    grid = InProcessGrid(client_app, 1, seed=0, node_config_fn=lambda i, n: node_config)
    try:
        yield grid.context(grid.node_ids[0])
    finally:
        grid.close()


def _plain(context: Context, message_type: str) -> Message:
    cfg = compose_config("config", ["runtime=inprocess", "secagg=off", "dataset.num_partitions=3"])
    config = {SPEC_KEY: encode_spec(spec_from_config(cfg, run_key="fresh-run")), SERVER_ROUND: 1}
    content = RecordDict(
        {"arrays": to_array_record(initial_arrays(cfg)), CONFIG_KEY: ConfigRecord(config)}
    )
    msg = Message(content, dst_node_id=context.node_id, message_type=message_type)
    return client_app(msg, context)


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_a_roster_site_without_a_policy_refuses_plain_instructions(
    tmp_path: Path, message_type: str
) -> None:
    for context in _identity_site(tmp_path, None):
        reply = _plain(context, message_type)
        assert reply.has_error(), "a roster site answered a plain instruction"
        assert "site policy `require_secure_aggregation`" in reply.error.reason
    # The same holds when the policy file exists but does not name the field.
    (tmp_path / "other").mkdir()
    for context in _identity_site(tmp_path / "other", "allow_seeded_noise: true\n"):
        reply = _plain(context, message_type)
        assert reply.has_error() and "`require_secure_aggregation`" in reply.error.reason


def test_a_roster_site_that_opts_out_explicitly_is_not_refused_for_it(tmp_path: Path) -> None:
    # Control: the refusal comes from the identity floor, not from the instruction.
    for context in _identity_site(tmp_path, "require_secure_aggregation: false\n"):
        reply = _plain(context, "evaluate")
        assert not reply.has_error() or "require_secure_aggregation" not in reply.error.reason


# B2: the colluder bound C was a fraction of the cohort, which the server picks: in a
# federation of 20 with 2 colluders (the policy's 0.1), a 12-cohort holding both passed
# with C = max(floor(0.1 * 12), 1) = 1, t = 7 (2t = 14 > n + C = 13), and a split view
# plus the 2 colluders' signatures recovered a victim's input. C is now taken over the
# federation: max(floor(0.1 * 20), 1) = 2, so 2t = 14 <= n + C = 14 and every client
# refuses at share-keys, before any share is encrypted.
def _packed_round(corrupt_fraction: float, dropout_tolerance: float) -> tuple[Any, Any]:
    import numpy as np

    from fl_app.client.policy import SitePolicy
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.secagg.params import GraphMode, ServerModel
    from fl_app.secagg.settings import SecAggSettings
    from fl_app.testing.adversary import AdversarialServer
    from fl_app.testing.secagg_client import fixed_update_client

    def update(node: int) -> dict[str, Any]:
        return {"w": np.full(4, 0.25, np.float32)}

    client = fixed_update_client(update, policy=SitePolicy(secagg_min_server_model="malicious"))
    grid = InProcessGrid(client, 20, seed=11)
    try:
        settings = SecAggSettings(
            mode=GraphMode.secagg,
            dropout_tolerance=dropout_tolerance,
            corrupt_fraction=corrupt_fraction,
            clip=1.0,
            stage_timeout_s=10.0,
            server_model=ServerModel.malicious,
        )
        server = AdversarialServer(grid, settings)
        out = server.run_round(1, {"w": np.zeros(4, np.float32)}, cohort=grid.node_ids[:12])
        return out, server.refusals(1, 2)
    finally:
        grid.close()


def test_the_colluder_bound_is_over_the_federation_not_the_packed_cohort() -> None:
    out, refusals = _packed_round(0.1, 0.45)
    assert (out.params.num_clients, out.params.threshold, out.params.max_corrupt) == (12, 7, 1)
    assert out.decoded is None and len(refusals) == 12, refusals
    assert all("`secagg_min_corrupt_fraction`" in r for r in refusals.values()), refusals
    assert all("t=7 with n=12 and C=2" in r for r in refusals.values()), refusals
    assert all("floor(0.1 * 20 sites in the federation)" in r for r in refusals.values())


def test_a_cohort_whose_thresholds_cover_the_federations_colluders_is_accepted() -> None:
    # Control: C = floor(0.2 * 12) = 2 on the server, D = floor(0.3 * 12) = 3, t = 9:
    # 2t = 18 > n + C = 14 and t > C: accepted, and the sum of 12 inputs of 0.25 is 3.
    import numpy as np

    out, refusals = _packed_round(0.2, 0.3)
    assert not refusals and out.decoded is not None, refusals
    assert (out.params.threshold, out.params.max_corrupt) == (9, 2)
    np.testing.assert_allclose(out.decoded.update["w"], np.full(4, 3.0), atol=1e-3)


# W1: the simulation mark is an environment variable; a deployed SuperNode or ClientApp
# started by a process that once simulated must not inherit it (it would accept
# partition-<i> identities derived from that secret instead of refusing without a roster).
def test_processes_started_for_a_deployment_never_inherit_the_simulation_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import time

    from fl_app.deploy.procs import ProcessGroup, deploy_env
    from fl_app.secagg import signing

    monkeypatch.setenv(signing.SIMULATION_SECRET_ENV, "ab" * 32)
    assert signing.in_simulation()
    env = deploy_env()
    assert signing.SIMULATION_SECRET_ENV not in env and env["PYTHONUNBUFFERED"] == "1"
    # Even an environment handed over with the mark in it (not built by deploy_env).
    group = ProcessGroup(tmp_path / "logs")
    probe = "import os; print('mark=' + repr(os.environ.get('FL_APP_SIMULATION_ROSTER_SECRET')))"
    group.start("probe", [sys.executable, "-c", probe], dict(env, **{
        signing.SIMULATION_SECRET_ENV: "cd" * 32}), tmp_path)  # fmt: skip
    proc = group.procs["probe"]
    proc.wait(timeout=30)
    for _ in range(50):
        if "mark=" in group.log("probe"):
            break
        time.sleep(0.1)
    assert "mark=None" in group.log("probe"), group.log("probe")


# W2: the roster is the trust anchor. A group/world-writable one is refused, naming the
# file and the fix; one that changes between share-keys and the consistency check
# (an identity added: its key could then vouch for a survivor set) is refused.
def _roster_grid(tmp_path: Path, n: int = 5) -> Any:
    import numpy as np

    from fl_app.deploy.pki import create_signing_key, write_roster
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.testing.secagg_client import fixed_update_client

    pubs = {}
    for i in range(n):
        _, pubs[f"site{i}"] = create_signing_key(tmp_path, f"site{i}")
    roster = write_roster(tmp_path / "roster.json", pubs)

    def node_config(i: int, m: int) -> dict[str, Any]:
        return {
            "partition-id": 0,
            "num-partitions": 1,
            "site-name": f"site{i}",
            "signing-key-path": str(tmp_path / f"site{i}.sign"),
            "roster-path": str(roster),
        }

    client = fixed_update_client(lambda node: {"w": np.full(4, 0.25, np.float32)})
    return InProcessGrid(client, n, seed=5, node_config_fn=node_config), roster


def _malicious_server(grid: Any) -> Any:
    from fl_app.secagg.params import GraphMode, ServerModel
    from fl_app.secagg.settings import SecAggSettings
    from fl_app.testing.adversary import AdversarialServer

    settings = SecAggSettings(
        mode=GraphMode.secagg, clip=1.0, stage_timeout_s=10.0, server_model=ServerModel.malicious
    )
    return AdversarialServer(grid, settings)


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_roster_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    import os

    import numpy as np

    grid, roster = _roster_grid(tmp_path)
    os.chmod(roster, mode)
    try:
        server = _malicious_server(grid)
        out = server.run_round(1, {"w": np.zeros(4, np.float32)})
        refusals = server.refusals(1, 1)
        assert out.decoded is None and len(refusals) == 5, refusals
        assert all(f"chmod 644 {roster}" in r for r in refusals.values()), refusals
        assert all(f"mode {mode:o}" in r for r in refusals.values()), refusals
    finally:
        grid.close()


def test_a_roster_changed_mid_round_is_refused(tmp_path: Path) -> None:
    import json

    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    grid, roster = _roster_grid(tmp_path)
    try:
        server = _malicious_server(grid)
        out = server.run_round(1, {"w": np.zeros(4, np.float32)})
        assert out.decoded is not None, out.note  # control: an unchanged roster works
        np.testing.assert_allclose(out.decoded.update["w"], np.full(4, 1.25), atol=1e-3)

        def swap(stage: int, node: int, cfg: dict[str, Any]) -> dict[str, Any]:
            if stage == 5:  # before the consistency check reaches the clients
                entries = json.loads(roster.read_text())
                extra = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
                entries["intruder"] = extra
                roster.write_text(json.dumps(entries))
            return cfg

        out = server.run_round(2, {"w": np.zeros(4, np.float32)}, lies=[swap])
        refusals = server.refusals(2, 5)
        assert out.decoded is None and len(refusals) == 5, (out.note, refusals)
        assert all("changed since this round's share-keys" in r for r in refusals.values())
    finally:
        grid.close()


# W3: the run id a client signs for is Flower's run id of its Context. A server naming
# another one at stage 1 (key adverts) or in the stage-2 round context is refused.
@pytest.mark.parametrize("where", [1, 2])
def test_a_run_id_other_than_flowers_is_refused(where: int) -> None:
    import struct

    import numpy as np

    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.secagg.signing import parse_context
    from fl_app.secagg.wire import SECAGG_CONTEXT, SECAGG_RUN_ID
    from fl_app.testing.secagg_client import fixed_update_client

    grid = InProcessGrid(fixed_update_client(lambda node: {"w": np.ones(4, np.float32)}), 4)
    try:
        server = _malicious_server(grid)

        def other_run(stage: int, node: int, cfg: dict[str, Any]) -> dict[str, Any]:
            if where == 1 and stage == 1:
                cfg[SECAGG_RUN_ID] = struct.pack(">Q", 2)  # the grid's run is 1
            if where == 2 and stage == 2:
                raw = cfg[SECAGG_CONTEXT]
                assert parse_context(raw)[0] == 1
                cfg[SECAGG_CONTEXT] = raw.replace(struct.pack(">Q", 1), struct.pack(">Q", 2), 1)
                assert parse_context(cfg[SECAGG_CONTEXT])[0] == 2
            return cfg

        out = server.run_round(1, {"w": np.zeros(4, np.float32)}, lies=[other_run])
        refusals = server.refusals(1, where)
        assert out.decoded is None and len(refusals) == 4, (out.note, refusals)
        assert all("names run 2, but this client runs in Flower run 1" in r
                   for r in refusals.values()), refusals  # fmt: skip
    finally:
        grid.close()


# B2 for distributed DP: under the malicious model the server knows the noise shares of
# the C colluders among the survivors, so the client's floor counts n_min - C shares.
def test_the_distributed_dp_floor_counts_only_shares_beyond_the_colluders() -> None:
    from fl_app.client.policy import PolicyViolation, SitePolicy

    # share_std 0.5, bound 1, n_min 5: z = 0.5*sqrt(5) = 1.118 with no colluders,
    # 0.5*sqrt(5 - 1) = 1.0 with C = 1 (by hand).
    kw = {"cohort": 6, "min_survivors": 5, "share_std": 0.5, "bound": 1.0}
    SitePolicy(ddp_min_noise_multiplier=1.1).check_ddp(**kw)
    with pytest.raises(PolicyViolation, match=r"is 1 from the 4 noise shares beyond C=1"):
        SitePolicy(ddp_min_noise_multiplier=1.1).check_ddp(**kw, colluders=1)
    SitePolicy(ddp_min_noise_multiplier=1.0).check_ddp(**kw, colluders=1)
    with pytest.raises(PolicyViolation, match="is 0 from the 0 noise shares beyond C=5"):
        SitePolicy(ddp_min_noise_multiplier=0.01).check_ddp(**kw, colluders=5)
