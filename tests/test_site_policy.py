"""Site data-use policy (node-config ``policy-path``): strict parsing, and refusals
before training that name the policy field, reach the server as structured errors and
the site's audit log, while the run goes on with the other sites."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl_app.audit import verify
from fl_app.client.app import app as client_app
from fl_app.client.audit import client_audit_path
from fl_app.client.identity import AUDIT_DIR_KEY, POLICY_PATH_KEY
from fl_app.client.policy import (
    ARTIFACTS,
    PolicyError,
    PolicyViolation,
    SitePolicy,
    released_artifact,
)
from fl_app.client.policy_file import load_policy, parse_policy
from fl_app.config.compose import compose_config
from fl_app.protocol import BUDGET_EXHAUSTED, CLIENT_REFUSED
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import run_experiment


# ------------------------------------------------------------------ parsing
def test_policy_parses_yaml_and_json_and_defaults_allow_everything(tmp_path: Path) -> None:
    y = tmp_path / "p.yaml"
    y.write_text(
        "allowed_artifacts: [masked_update]\nmax_epsilon: 4\nrequire_secure_aggregation: true\n"
    )
    p = load_policy(y)
    assert p == SitePolicy(frozenset({"masked_update"}), 4.0, True, False)
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"require_record_level_dp": True}))
    assert load_policy(j) == SitePolicy(require_record_level_dp=True)
    assert parse_policy({}) == SitePolicy() and SitePolicy().allowed_artifacts == set(ARTIFACTS)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_epsilonn: 3\n", "`max_epsilonn`"),
        ("allowed_artifacts: [weights]\n", "['weights']"),
        ("allowed_artifacts: update\n", "`allowed_artifacts`"),
        ("max_epsilon: -1\n", "`max_epsilon`"),
        ("max_epsilon: .inf\n", "`max_epsilon`"),
        ("max_epsilon: true\n", "`max_epsilon`"),
        ("require_secure_aggregation: 'yes'\n", "`require_secure_aggregation`"),
        ("max_epsilon: 1\nmax_epsilon: 9\n", "duplicate policy field `max_epsilon`"),
        ("[1, 2]\n", "mapping"),
        ("", "empty"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_malformed_policy_is_refused_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert words in str(info.value)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_artifacts_and_request_checks() -> None:
    kw = {"client_clips": False, "local_noise": False}
    assert released_artifact("evaluate", secure=True, **kw) == "evaluation_metrics"
    assert released_artifact("train", secure=True, client_clips=True, local_noise=False) == (
        "masked_update"
    )
    assert released_artifact("train", secure=False, client_clips=True, local_noise=True) == (
        "noised_update"
    )
    assert released_artifact("train", secure=False, client_clips=True, local_noise=False) == (
        "clipped_update"
    )
    assert released_artifact("train", secure=False, **kw) == "update"
    strict = SitePolicy(
        frozenset({"masked_update"}),
        2.0,
        require_secure_aggregation=True,
        require_record_level_dp=True,
    )
    ok = {"secure": True, "record_level_dp": True, "accounts_epsilon": True}
    strict.check_request("train", artifact="masked_update", **ok)
    cases = [
        ("evaluate", "evaluation_metrics", ok, "allowed_artifacts"),
        ("train", "masked_update", {**ok, "secure": False}, "require_secure_aggregation"),
        ("train", "masked_update", {**ok, "record_level_dp": False}, "require_record_level_dp"),
        ("train", "masked_update", {**ok, "accounts_epsilon": False}, "max_epsilon"),
    ]
    for message_type, artifact, flags, field in cases:
        with pytest.raises(PolicyViolation) as info:
            strict.check_request(message_type, artifact=artifact, **flags)
        assert info.value.field == field and f"`{field}`" in str(info.value)
    strict.check_epsilon("record-level", 2.0)
    with pytest.raises(PolicyViolation, match="above the site's max_epsilon 2"):
        strict.check_epsilon("record-level", 2.0001)
    SitePolicy().check_epsilon("local", 1e9)  # no bound


# --------------------------------------------------------- through the app
def _cfg(*overrides: str) -> Any:
    return compose_config(
        "config",
        [
            "runtime=inprocess",
            "federated_eval_every=0",
            "train.local_epochs=1",
            "num_rounds=2",
            *overrides,
        ],
    )


def _run(
    cfg: Any, tmp: Path, policies: dict[int, str], n: int
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Path]]:
    audit_dir = tmp / "site-audit"
    files = {}
    for pid, text in policies.items():
        files[pid] = tmp / f"policy-{pid}.yaml"
        files[pid].write_text(text)

    def node_config(pid: int, num: int) -> dict[str, Any]:
        cfg_: dict[str, Any] = {
            "partition-id": pid,
            "num-partitions": num,
            AUDIT_DIR_KEY: str(audit_dir),
        }
        if pid in files:
            cfg_[POLICY_PATH_KEY] = str(files[pid])
        return cfg_

    grid = InProcessGrid(client_app, n, seed=cfg.seed, node_config_fn=node_config)
    try:
        summary = run_experiment(grid, cfg, tmp / "run", progress=False)
    finally:
        grid.close()
    lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    run_key = json.loads((tmp / "run" / "run.json").read_text())["run_key"]
    paths = [client_audit_path(audit_dir, run_key, pid) for pid in range(n)]
    for path in paths:
        assert verify(path).ok
    return summary, lines, paths


def _events(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(r["event"], r["data"]) for r in map(json.loads, path.read_text().splitlines())]


def test_policies_refuse_before_training_and_the_run_goes_on(tmp_path: Path) -> None:
    policies = {
        1: "require_secure_aggregation: true\n",
        2: "allowed_artifacts: [masked_update, evaluation_metrics]\n",
        3: "max_epsilonn: 3\n",
        4: "allowed_artifacts: [update]\n",  # trains, but refuses to evaluate
    }
    cfg = _cfg("dataset.num_partitions=5", "federated_eval_every=1")
    summary, lines, paths = _run(cfg, tmp_path, policies, 5)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    for line in lines:
        assert line["clients_accepted"] == 2 and line["model_updated"]
        by_node = sorted(f["reason"] for f in line["failures"])
        assert len(by_node) == 3
        assert any("`require_secure_aggregation`" in r for r in by_node)
        assert any("`allowed_artifacts`" in r and "`update`" in r for r in by_node)
        assert any("unknown policy field `max_epsilonn`" in r for r in by_node)
        # node 1 (plaintext evaluation under require_secure_aggregation), node 3 (bad
        # file), node 4 (policy)
        assert line["eval_clients_rejected"] == 3
    # The site's own log: one refusal per refused instruction, naming the policy field.
    refused = {
        pid: [
            (d["message_type"], d["policy_field"], d["code"])
            for e, d in _events(p)
            if e == "client.refused"
        ]
        for pid, p in enumerate(paths)
    }
    assert refused[0] == []
    assert refused[1] == [
        ("train", "require_secure_aggregation", CLIENT_REFUSED),
        ("evaluate", "require_secure_aggregation", CLIENT_REFUSED),
    ] * 2
    assert refused[2] == [("train", "allowed_artifacts", CLIENT_REFUSED)] * 2
    assert refused[3] == [("train", None, CLIENT_REFUSED), ("evaluate", None, CLIENT_REFUSED)] * 2
    assert refused[4] == [("evaluate", "allowed_artifacts", CLIENT_REFUSED)] * 2
    trains = [d for e, d in _events(paths[4]) if e == "client.round"]
    assert [(d["artifact"], d["policy"]) for d in trains] == [("update", "ok")] * 2
    # A site that requires secure aggregation sends nothing per client in plaintext:
    # no evaluation reply either (an evaluation is its un-noised loss and accuracy).
    assert [d for e, d in _events(paths[1]) if e == "client.round"] == []
    evals = [d["artifact"] for e, d in _events(paths[2]) if e == "client.round"]
    assert evals == ["evaluation_metrics"] * 2  # node 2 refuses to train, not to evaluate


def test_max_epsilon_policy_refuses_the_dpsgd_round_past_it(tmp_path: Path) -> None:
    base = ("privacy=dpsgd", "dataset.num_partitions=3")
    control = run_experiment(
        InProcessGrid(client_app, 3, seed=0),
        _cfg(*base, "num_rounds=1"),
        tmp_path / "c",
        progress=False,
    )
    eps1 = max(c["epsilon"] for c in control["privacy"]["record_level"]["per_client"].values())
    # Round 2 composes twice the steps: its ε is well above 1.05 x round 1's.
    policy = f"max_epsilon: {eps1 * 1.05}\nrequire_record_level_dp: true\n"
    summary, lines, paths = _run(_cfg(*base), tmp_path, {0: policy, 1: policy, 2: policy}, 3)
    assert lines[0]["clients_accepted"] == 3
    assert lines[1]["clients_accepted"] == 0 and not lines[1]["model_updated"]
    assert lines[1]["clients_budget_exhausted"] == 3
    assert all("`max_epsilon`" in f["reason"] for f in lines[1]["failures"])
    for path in paths:
        events = _events(path)
        assert [e for e, _ in events] == ["run.start", "client.round", "client.refused"]
        first, refusal = events[1][1], events[2][1]
        assert 0 < first["epsilon"]["record_level"] <= eps1 * 1.05 and first["policy"] == "ok"
        assert (refusal["round"], refusal["policy_field"], refusal["code"]) == (
            2,
            "max_epsilon",
            BUDGET_EXHAUSTED,
        )
    # Refused before the accountant's state was saved: each site's ledger holds round 1
    # only, as the control run's does.
    for name in ("c", "run"):
        states = sorted((tmp_path / name / "client-state").glob("dpsgd-*.json"))
        assert len(states) == 3
        steps = [json.loads(f.read_text())["history"] for f in states]
        if name == "c":
            expected = steps
    assert steps == expected
    assert summary["status"] == "completed"


def test_max_epsilon_policy_refuses_a_round_without_client_side_accounting(tmp_path: Path) -> None:
    cfg = _cfg("dataset.num_partitions=3", "num_rounds=1")
    _summary, lines, paths = _run(cfg, tmp_path, {0: "max_epsilon: 5\n"}, 3)
    assert lines[0]["clients_accepted"] == 2
    (refusal,) = [d for e, d in _events(paths[0]) if e == "client.refused"]
    assert (
        refusal["policy_field"] == "max_epsilon"
        and "no client-side accounting" in refusal["reason"]
    )


# ----------------------------------------------------- secure-aggregation floor
def test_secagg_floor_parses_and_refuses_bad_values(tmp_path: Path) -> None:
    p = parse_policy(
        {
            "secagg_max_dropout_tolerance": 0.25,
            "secagg_min_corrupt_fraction": 0.2,
            "secagg_min_security_bits": 60,
            "secagg_min_correctness_bits": 30,
            "secagg_allow_custom_params": True,
            "ddp_min_noise_multiplier": 0.7,
        }
    )
    assert (p.secagg_max_dropout_tolerance, p.secagg_min_corrupt_fraction) == (0.25, 0.2)
    assert (p.secagg_min_security_bits, p.secagg_min_correctness_bits) == (60, 30)
    assert p.secagg_allow_custom_params and p.ddp_min_noise_multiplier == 0.7
    # Safe defaults without any file: the project's own secagg defaults pass them.
    d = SitePolicy()
    assert (d.secagg_max_dropout_tolerance, d.secagg_min_corrupt_fraction) == (0.5, 0.1)
    assert (d.secagg_min_security_bits, d.secagg_min_correctness_bits) == (40, 20)
    assert not d.secagg_allow_custom_params and d.ddp_min_noise_multiplier == 0.25
    assert (d.secagg_min_corrupt_clients, d.secagg_min_cohort_size) == (1, 3)
    # An explicit null opts out of the distributed-DP floor; absent keeps the default.
    assert parse_policy({"ddp_min_noise_multiplier": None}).ddp_min_noise_multiplier is None
    assert parse_policy({}).ddp_min_noise_multiplier == 0.25
    for bad in (
        {"secagg_max_dropout_tolerance": 1.0},
        {"secagg_min_corrupt_fraction": -0.1},
        {"secagg_min_security_bits": 1.5},
        {"secagg_allow_custom_params": "yes"},
        {"ddp_min_noise_multiplier": 0},
    ):
        with pytest.raises(PolicyError, match=f"`{next(iter(bad))}`"):
            parse_policy(bad)


def test_secagg_floor_decisions_on_worked_examples() -> None:
    from fl_app.secagg.derive import custom_params, derive_params

    site = SitePolicy()
    # ceil((1 - 0.5) * 10) = 5; ceil(0.5 * 3) = 2; never below 2.
    assert [site.survivor_floor(n) for n in (10, 3, 2, 1)] == [5, 2, 2, 2]
    site.check_secagg_params(derive_params(10, mode="secaggplus"))  # the project default
    # 20 clients: the site wants C >= floor(0.1 * 20) = 2 colluders assumed; 0.0 gives
    # fewer (0, or a derivation's floor of 1).
    with pytest.raises(PolicyViolation) as info:
        site.check_secagg_params(derive_params(20, mode="secagg", corrupt_fraction=0.0))
    assert info.value.field == "secagg_min_corrupt_fraction"
    with pytest.raises(PolicyViolation) as info:
        site.check_secagg_params(derive_params(100, security_bits=20))
    assert info.value.field == "secagg_min_security_bits"
    # A custom (k, t) only with the opt-in, and then 2t > k + 1 exactly: n = 6, k = 5 is
    # the complete graph; t = 3 gives 2t = 6 = k + 1 (refused by custom_params itself
    # now, and by the site a second time), t = 4 is the smallest valid threshold.
    opted = SitePolicy(secagg_allow_custom_params=True)
    valid = custom_params(6, 5, 4, max_dropouts=1, max_corrupt=1)
    with pytest.raises(PolicyViolation) as info:
        site.check_secagg_params(valid)
    assert info.value.field == "secagg_allow_custom_params"
    opted.check_secagg_params(valid)
    from fl_app.secagg.params import SecAggConfigError

    with pytest.raises(SecAggConfigError, match="4 <= t <= 6"):
        custom_params(6, 5, 3, max_dropouts=1)
    # Distributed DP: n_min = 4 of 10 is below ceil(0.5 * 10) = 5; z = 0.4 * sqrt(9) / 1.0.
    with pytest.raises(PolicyViolation, match="4 of 10"):
        site.check_ddp(cohort=10, min_survivors=4, share_std=1.0, bound=1.0)
    strict = SitePolicy(ddp_min_noise_multiplier=1.3)
    with pytest.raises(PolicyViolation) as info:
        strict.check_ddp(cohort=10, min_survivors=9, share_std=0.4, bound=1.0)  # z = 1.2
    assert info.value.field == "ddp_min_noise_multiplier"
    strict.check_ddp(cohort=10, min_survivors=9, share_std=0.5, bound=1.0)  # z = 1.5


def test_secagg_policy_refusal_reaches_the_server_as_a_structured_error(tmp_path: Path) -> None:
    # Every site demands 60 security bits; the server derives 40-bit parameters. (Key
    # exchange stages carry no run key, so they are not in the site's own audit log.)
    cfg = _cfg("secagg=secaggplus", "secagg.clip=2.0", "secagg.stage_timeout_s=5", "num_rounds=1")
    policy = tmp_path / "policy.yaml"
    policy.write_text("secagg_min_security_bits: 60\n")

    def node_config(pid: int, num: int) -> dict[str, Any]:
        return {"partition-id": pid, "num-partitions": num, POLICY_PATH_KEY: str(policy)}

    grid = InProcessGrid(client_app, 3, seed=cfg.seed, node_config_fn=node_config)
    try:
        run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not line["model_updated"] and "abandoned" in line["note"]
    assert len(line["failures"]) == 3
    assert all(
        f"client error (code {CLIENT_REFUSED}): site policy `secagg_min_security_bits`"
        in f["reason"]
        for f in line["failures"]
    ), line["failures"]
