"""fl_app/client/ module by module, without a federation: the refusals and their codes,
the site's identity and file names, the downgrade guard, the site policy's epsilon checks
and the site budget ledger across renamed runs, the hidden-mode metrics filter and the
Context.state memory of the privacy stores.

Expected values are written by hand: wire codes from the protocol's table, file names
and digests from the documented formulas (SHA-256 via hashlib), sums worked out in the
comments. The whole-client behaviour is tested through the in-process grid elsewhere
(test_secagg_downgrade.py, test_site_budget.py, test_client_audit.py).
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fl_app.client.audit import client_audit_path
from fl_app.client.budget import account_site_release, site_accountant
from fl_app.client.downgrade import PROTECTED_RUNS_KEY, refuse_downgrade
from fl_app.client.enforce import artifact, enforce_epsilon, enforce_request, site_policy
from fl_app.client.identity import partition, site_hash, site_identity
from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.client.refusal import BudgetExhausted, ClientRefusal, PolicyRefusal, secagg_refusal
from fl_app.client.state import ContextMemory
from fl_app.client.train import hidden_mode_public
from fl_app.client_spec import ClientSpec

# The wire codes (fl_app/protocol.py's table): a refusal, a spent budget.
CLIENT_REFUSED, BUDGET_EXHAUSTED = 1001, 1002
# The instruction config key of the secure-aggregation stage (stage 3: the masked input).
SECAGG_STAGE_KEY = "fl-app.secagg-stage"


def _context(**node_config: Any) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


# ------------------------------------------------------------------------ refusals
def test_refusal_codes() -> None:
    assert ClientRefusal("x").code == CLIENT_REFUSED
    assert BudgetExhausted("x").code == BUDGET_EXHAUSTED
    budget = PolicyRefusal(PolicyViolation("max_epsilon", "too much"))
    assert (budget.code, budget.field) == (BUDGET_EXHAUSTED, "max_epsilon")
    other = PolicyRefusal(PolicyViolation("require_secure_aggregation", "plain"))
    assert (other.code, other.field) == (CLIENT_REFUSED, "require_secure_aggregation")


def test_a_secagg_refusal_names_the_policy_field_it_rests_on() -> None:
    class FieldError(Exception):
        field = "secagg_min_cohort_size"
        detail = "cohort of 2"

    named = secagg_refusal(FieldError("ignored text"))
    assert isinstance(named, PolicyRefusal) and named.field == "secagg_min_cohort_size"
    assert "secure aggregation: cohort of 2" in str(named) and "ignored" not in str(named)
    plain = secagg_refusal(ValueError("bad stage"))
    assert type(plain) is ClientRefusal and str(plain) == "secure aggregation: bad stage"
    assert plain.code == CLIENT_REFUSED


# ------------------------------------------------------------------------ identity
def test_site_identity_forms(tmp_path: Path) -> None:
    assert site_identity({"site-name": "hospital-a.2"}) == "site-hospital-a.2"
    data = tmp_path / "x" / ".." / "site.npz"
    digest = hashlib.sha256(str((tmp_path / "site.npz").resolve()).encode()).hexdigest()
    assert site_identity({"data-path": str(data)}) == f"data-{digest[:16]}"
    # site-name wins over data-path; an empty one does not count.
    assert site_identity({"site-name": "a", "data-path": str(data)}) == "site-a"
    assert site_identity({"site-name": "", "partition-id": 4}) == "partition-4"
    assert site_identity({}) == "partition-0"
    assert site_identity({"site-name": "n" * 64}) == "site-" + "n" * 64


@pytest.mark.parametrize("name", [".hidden", "a/b", "n" * 65, "a b", "../x"])
def test_unsafe_site_names_are_refused_naming_the_key(name: str) -> None:
    with pytest.raises(ClientRefusal, match=r"node-config site-name=.* it names this site's"):
        site_identity({"site-name": name})


def test_partition_and_its_refusal() -> None:
    assert partition(_context()) == (0, 1)
    assert partition(_context(**{"partition-id": 2, "num-partitions": 5})) == (2, 5)
    with pytest.raises(ClientRefusal, match="partition-id/num-partitions must be integers"):
        partition(_context(**{"partition-id": "two"}))
    with pytest.raises(ClientRefusal, match="partition-id must be an integer, got 'two'"):
        site_identity({"partition-id": "two"})


def test_site_hash_is_48_bits_of_hmac_sha256_under_the_sites_own_secret(tmp_path: Path) -> None:
    state = tmp_path / "dp" / "state"  # created, parents included, on first use
    value = site_hash("site-hospital-a", state)
    key = state / "site-secret-site-hospital-a.key"
    secret = key.read_bytes()
    assert len(secret) == 32 and key.stat().st_mode & 0o777 == 0o600
    # Expected: the standard library's HMAC (not the code's cryptography HMAC).
    mac = std_hmac.new(secret, b"site-hospital-a", hashlib.sha256).hexdigest()
    assert value == int(mac[:12], 16) and value < 2**48
    assert float(value) == value  # exact as a float64 metric
    # Not the unkeyed digest any node can compute from the roster's site names.
    assert value != int(hashlib.sha256(b"site-hospital-a").hexdigest()[:12], 16)
    # Stable across restarts; the secret is not rewritten; no temporary file is left.
    assert site_hash("site-hospital-a", state) == value and key.read_bytes() == secret
    assert sorted(p.name for p in state.iterdir()) == [key.name]
    # Another site in the same folder has its own secret; another folder, another one.
    site_hash("site-hospital-b", state)
    assert (state / "site-secret-site-hospital-b.key").read_bytes() != secret
    assert site_hash("site-hospital-a", tmp_path / "other") != value


def test_site_secret_created_by_another_process_first_is_the_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two SuperNodes sharing a state folder race to create the secret: the loser
    reads the winner's, so both present one identity (what the server's check needs)."""
    import os

    import fl_app.client.identity as identity

    theirs = bytes(range(32))
    real_link = os.link

    def link_after_the_other(src: Any, dst: Any) -> None:
        Path(dst).write_bytes(theirs)  # the other process linked first
        real_link(src, dst)

    monkeypatch.setattr(identity.os, "link", link_after_the_other)
    value = site_hash("site-x", tmp_path)
    mac = std_hmac.new(theirs, b"site-x", hashlib.sha256).hexdigest()
    assert value == int(mac[:12], 16)
    assert [p.name for p in tmp_path.iterdir()] == ["site-secret-site-x.key"]


def test_site_secret_of_the_wrong_size_is_refused_word_for_word(tmp_path: Path) -> None:
    key = tmp_path / "site-secret-site-x.key"
    key.write_bytes(b"short")
    with pytest.raises(ClientRefusal) as err:
        site_hash("site-x", tmp_path)
    assert str(err.value) == (
        f"{key} holds 5 bytes, not this site's 32-byte identity secret: restore it from a "
        "backup of the dp-state-dir, or delete it to give the site a new identity (the "
        "server then counts its local-DP releases afresh)"
    )


def test_audit_file_names_keep_unsafe_parts_out() -> None:
    d = Path("/logs")
    assert client_audit_path(d, "run1", "site-a") == d / "audit-run1-site-a.jsonl"
    assert client_audit_path(d, "run1", 3) == d / "audit-run1-partition-3.jsonl"
    assert client_audit_path(d, "../up", "site-a") == d / "audit-unknown-site-a.jsonl"
    assert client_audit_path(d, "run1", "site-../x") == d / "audit-run1-partition-unknown.jsonl"
    assert client_audit_path(d, "run1", "other-a") == d / "audit-run1-partition-unknown.jsonl"


# ----------------------------------------------------------------------- downgrade
def _secure(ddp: bool = False) -> Any:
    return SimpleNamespace(ddp=object() if ddp else None)


def test_a_run_that_trained_securely_refuses_a_plain_or_noiseless_round() -> None:
    ctx = _context()
    spec = ClientSpec(run_key="k1")
    refuse_downgrade(ctx, spec, "train", _secure(ddp=True), local_dp=False)
    assert ctx.state.config_records[PROTECTED_RUNS_KEY]["run:k1"] == "ddp,ddp-schedule:none,secagg"
    with pytest.raises(PolicyRefusal, match="already trained under secure aggregation with "):
        refuse_downgrade(ctx, spec, "train", None, local_dp=False)
    with pytest.raises(PolicyRefusal, match="has no distributed-DP noise") as err:
        refuse_downgrade(ctx, spec, "train", _secure(ddp=False), local_dp=False)
    assert err.value.field == "require_secure_aggregation"
    # Another run key starts unmarked (the site policy guards that case).
    refuse_downgrade(ctx, ClientSpec(run_key="k2"), "train", None, local_dp=False)
    # Evaluation stays allowed: this spec hid no per-client metrics.
    refuse_downgrade(ctx, spec, "evaluate", None, local_dp=False)


def test_local_dp_and_hidden_metrics_marks() -> None:
    ctx = _context()
    hidden = ClientSpec(run_key="k", hide_client_metrics=True)
    with pytest.raises(PolicyRefusal, match="is a plain one"):
        refuse_downgrade(ctx, hidden, "train", None, local_dp=False)
    refuse_downgrade(ctx, hidden, "train", None, local_dp=True)
    assert ctx.state.config_records[PROTECTED_RUNS_KEY]["run:k"] == "hide-metrics,local-dp"
    plain = ClientSpec(run_key="k")
    with pytest.raises(ClientRefusal, match="already trained under local DP") as err:
        refuse_downgrade(ctx, plain, "train", None, local_dp=False)
    assert type(err.value) is ClientRefusal
    with pytest.raises(ClientRefusal, match="this client does not evaluate in it"):
        refuse_downgrade(ctx, plain, "evaluate", None, local_dp=False)


def test_marks_survive_a_restart_in_the_sites_state_dir(tmp_path: Path) -> None:
    config = {"site-name": "a", "dp-state-dir": str(tmp_path)}
    refuse_downgrade(_context(**config), ClientSpec(run_key="k"), "train", _secure(), False)
    stored = tmp_path / "protected-runs-site-a.json"
    assert json.loads(stored.read_text()) == {"k": ["secagg"]}
    with pytest.raises(PolicyRefusal, match="already trained under secure aggregation"):
        refuse_downgrade(_context(**config), ClientSpec(run_key="k"), "train", None, False)
    stored.write_text("{not json")
    with pytest.raises(ClientRefusal, match=r"unreadable .*; restore or delete it"):
        refuse_downgrade(_context(**config), ClientSpec(run_key="k"), "train", None, False)
    stored.write_text(json.dumps({"k": "secagg"}))
    with pytest.raises(ClientRefusal, match="not a run-key -> marks mapping"):
        refuse_downgrade(_context(**config), ClientSpec(run_key="k"), "train", None, False)


# ------------------------------------------------------------- epsilon and budget
def test_enforce_epsilon_this_run_and_the_sites_total() -> None:
    policy = SitePolicy(max_epsilon=2.0)
    enforce_epsilon(None, "local DP", 99.0, 99.0)  # no policy: nothing to enforce
    enforce_epsilon(policy, "local DP", 2.0, 2.0)  # the bound itself is allowed
    with pytest.raises(PolicyRefusal, match=r"local DP epsilon would reach 2\.5") as err:
        enforce_epsilon(policy, "local DP", 2.5)
    assert err.value.code == BUDGET_EXHAUSTED
    with pytest.raises(PolicyRefusal) as err:
        enforce_epsilon(policy, "record-level", 1.5, 3.75)
    # The site's total over other runs is not told to this server.
    assert "3.75" not in str(err.value) and "past its max_epsilon 2" in str(err.value)


def test_a_renamed_run_does_not_reset_the_sites_budget(tmp_path: Path) -> None:
    ctx = _context(**{"site-name": "a", "dp-state-dir": str(tmp_path)})
    policy = SitePolicy(max_epsilon=1.0)
    account_site_release(policy, ctx, str(tmp_path), "k1", "local DP", 0.6, 1e-5, False)
    # Run k2 at 0.5: the site's total would be 0.6 + 0.5 = 1.1 > 1.0.
    with pytest.raises(PolicyRefusal, match="site's total epsilon"):
        account_site_release(policy, ctx, str(tmp_path), "k2", "local DP", 0.5, 1e-5, False)
    lines = (tmp_path / "site-budget-site-a.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_key"] for line in lines] == ["k1"]  # nothing recorded
    # 0.4 fits: 0.6 + 0.4 = 1.0.
    account_site_release(policy, ctx, str(tmp_path), "k2", "local DP", 0.4, 1e-5, False)


def test_a_bounded_site_needs_its_own_state_dir(tmp_path: Path) -> None:
    ctx = _context(**{"site-name": "a"})
    with pytest.raises(PolicyRefusal, match='--node-config "dp-state-dir=/path"') as err:
        account_site_release(
            SitePolicy(max_epsilon=1.0), ctx, str(tmp_path), "k", "local DP", 0.1, 1e-5, False
        )
    assert err.value.field == "max_epsilon" and not list(tmp_path.iterdir())


# ----------------------------------------------------------- metrics and memory
def test_hidden_mode_keeps_only_the_public_numbers() -> None:
    metrics = {
        "dp-epsilon": 1.5,
        "dp-delta": 1e-5,
        "dp-rounds": 2.0,
        "dp-partition-id": 3.0,
        "dp-site-hash": 7.0,
        "dp-local-epsilon": 0.5,
        "dp-local-releases": 2.0,
        "dp-steps": 40.0,
        "dp-sample-rate": 0.1,
        "dp-noise-multiplier": 1.1,
        "train-loss": 0.3,
    }
    kept = {k: v for k, v in metrics.items() if k.startswith("dp-")}
    for leaky in ("dp-steps", "dp-sample-rate", "dp-noise-multiplier"):
        del kept[leaky]  # each gives the site's record count to within a batch
    assert hidden_mode_public(metrics) == kept


def test_context_memory() -> None:
    ctx = _context()
    memory = ContextMemory(ctx, "fl-app.test")
    assert memory.get() is None
    memory.put("text")
    assert memory.get() == "text" and ctx.state.config_records["fl-app.test"]["state"] == "text"
    ctx.state["fl-app.test"] = ConfigRecord({"state": 3})
    assert memory.get() is None  # a foreign record is no memory


# ------------------------------------------- exact refusals and log lines (mutmut)
_EVAL_REFUSED = (
    "federated evaluation: this run trained under a threat model that hides per-client "
    "numbers from the server; this client does not evaluate in it"
)


def test_downgrade_refusals_word_for_word() -> None:
    ctx = _context()
    refuse_downgrade(ctx, ClientSpec(run_key="k"), "train", _secure(), local_dp=False)
    with pytest.raises(PolicyRefusal) as err:
        refuse_downgrade(ctx, ClientSpec(run_key="k"), "train", None, local_dp=False)
    assert err.value.field == "require_secure_aggregation"
    assert str(err.value) == (
        "site policy `require_secure_aggregation`: this run already trained under secure "
        "aggregation; this train instruction is a "
        "plain one (a downgrade: the server would see this client's update), refused"
    )
    with pytest.raises(PolicyRefusal) as err:
        refuse_downgrade(
            ctx, ClientSpec(run_key="k", hide_client_metrics=True), "train", None, False
        )
    assert err.value.field == "require_secure_aggregation"
    assert str(err.value) == (
        "site policy `require_secure_aggregation`: "
        "this run's threat model hides per-client numbers from the server, but this train "
        "instruction is a plain one (no secure aggregation, no local noise: the server would "
        "see the update), refused"
    )
    ddp = _context()
    refuse_downgrade(ddp, ClientSpec(run_key="k"), "train", _secure(ddp=True), False)
    refuse_downgrade(ddp, ClientSpec(run_key="k"), "train", _secure(ddp=True), False)  # same: ok
    with pytest.raises(PolicyRefusal) as err:
        refuse_downgrade(ddp, ClientSpec(run_key="k"), "train", _secure(ddp=False), False)
    assert str(err.value) == (
        "site policy `require_secure_aggregation`: "
        "this run already trained under secure aggregation with distributed DP; this train "
        "instruction has no distributed-DP noise (a downgrade: the server would see this "
        "client's update), refused"
    )
    local = _context()
    refuse_downgrade(local, ClientSpec(run_key="k"), "train", None, local_dp=True)
    with pytest.raises(ClientRefusal) as local_err:
        refuse_downgrade(local, ClientSpec(run_key="k"), "train", None, local_dp=False)
    assert str(local_err.value) == (
        "this run already trained under local DP; this train instruction has no local noise "
        "(a downgrade: the server would see the un-noised update), refused"
    )
    # Local DP alone (this spec hid nothing) is enough to stop evaluation.
    assert local.state.config_records[PROTECTED_RUNS_KEY]["run:k"] == "local-dp"
    with pytest.raises(ClientRefusal) as eval_err:
        refuse_downgrade(local, ClientSpec(run_key="k"), "evaluate", None, False)
    assert str(eval_err.value) == _EVAL_REFUSED


def test_marks_accumulate_per_run_and_hidden_metrics_stick() -> None:
    ctx = _context()
    hidden = ClientSpec(run_key="k", hide_client_metrics=True)
    refuse_downgrade(ctx, hidden, "train", _secure(), False)
    # A secure object without a ddp attribute is a round without distributed DP.
    refuse_downgrade(ctx, hidden, "train", SimpleNamespace(), False)
    refuse_downgrade(ctx, ClientSpec(run_key="k2"), "train", _secure(), False)
    record = ctx.state.config_records[PROTECTED_RUNS_KEY]
    assert dict(record) == {"run:k": "hide-metrics,secagg", "run:k2": "secagg"}
    with pytest.raises(ClientRefusal) as err:  # hide-metrics alone stops evaluation
        refuse_downgrade(ctx, hidden, "evaluate", None, False)
    assert str(err.value) == _EVAL_REFUSED
    refuse_downgrade(ctx, ClientSpec(run_key="k2"), "evaluate", None, False)


def test_mark_file_is_sorted_json_in_a_new_nested_dir_and_write_errors_refuse(
    tmp_path: Path,
) -> None:
    state = tmp_path / "new" / "nested"
    config = {"site-name": "a", "dp-state-dir": str(state)}
    refuse_downgrade(_context(**config), ClientSpec(run_key="k"), "train", _secure(), False)
    refuse_downgrade(_context(**config), ClientSpec(run_key="a"), "train", _secure(), False)
    stored = state / "protected-runs-site-a.json"
    assert stored.read_text(encoding="utf-8") == '{"a": ["secagg"], "k": ["secagg"]}'
    assert sorted(p.name for p in state.iterdir()) == ["protected-runs-site-a.json"]
    blocked = tmp_path / "file"
    blocked.write_text("")
    ctx = _context(**{"site-name": "a", "dp-state-dir": str(blocked / "sub")})
    with pytest.raises(ClientRefusal, match=r"^protected-runs file .*: cannot write it \("):
        refuse_downgrade(ctx, ClientSpec(run_key="k"), "train", _secure(), False)


def test_site_identity_refusal_word_for_word() -> None:
    with pytest.raises(ClientRefusal) as err:
        site_identity({"site-name": "a/b"})
    assert str(err.value) == (
        "node-config site-name='a/b' must be 1-64 letters, digits, '_', '-' or '.' (not "
        "starting with '.'): it names this site's files"
    )


def test_a_secagg_refusal_without_detail_quotes_the_error() -> None:
    class FieldOnly(Exception):
        field = "secagg_min_security_bits"

    refusal = secagg_refusal(FieldOnly("security_bits=30 is below the site's 40"))
    assert isinstance(refusal, PolicyRefusal) and refusal.field == "secagg_min_security_bits"
    assert str(refusal) == (
        "site policy `secagg_min_security_bits`: secure aggregation: security_bits=30 is "
        "below the site's 40"
    )


def test_site_total_refusal_field_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="fl_app.client"),
        pytest.raises(PolicyRefusal) as err,
    ):
        enforce_epsilon(SitePolicy(max_epsilon=2.0), "local DP", 1.5, 3.75)
    assert (err.value.field, err.value.code) == ("max_epsilon", BUDGET_EXHAUSTED)
    assert [r.getMessage() for r in caplog.records] == [
        "site budget: local DP epsilon 1.5 this run, 3.75 over every run on this site's "
        "data, above max_epsilon 2"
    ]


def test_site_budget_refusals_and_log_word_for_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(PolicyRefusal) as err:
        account_site_release(
            SitePolicy(max_epsilon=1.0),
            _context(**{"site-name": "a"}),
            str(tmp_path),
            "k",
            "local DP",
            0.1,
            1e-5,
            False,
        )
    assert str(err.value) == (
        "site policy `max_epsilon`: the site bounds its epsilon but keeps no state directory "
        'of its own: start the SuperNode with --node-config "dp-state-dir=/path" (the '
        "server's state_dir is not trusted with the site's budget ledger)"
    )
    # A simulated partition keeps the spec's state directory even with a bound.
    sim = _context(**{"partition-id": 2})
    with caplog.at_level(logging.INFO, logger="fl_app.client"):
        account_site_release(
            SitePolicy(max_epsilon=1.0), sim, str(tmp_path), "k", "local DP", 0.25, 1e-5, False
        )
    assert [r.getMessage() for r in caplog.records] == [
        "site budget: local DP epsilon 0.25 this run; over every run on this site's data "
        "epsilon 0.25, delta 1e-05 (basic composition)"
    ]
    line = json.loads((tmp_path / "site-budget-partition-2.jsonl").read_text())
    assert line == {
        "version": 1,
        "run_key": "k",
        "kind": "local DP",
        "epsilon": 0.25,
        "delta": 1e-5,
    }


def test_site_budget_ledger_checks(tmp_path: Path) -> None:
    ctx = _context(**{"site-name": "a", "dp-state-dir": str(tmp_path)})
    policy = SitePolicy(max_epsilon=1.0)
    account_site_release(policy, ctx, str(tmp_path), "k1", "local DP", 0.6, 1e-5, False)
    # The same run growing replaces its own spend: 0.7, not 0.6 + 0.7.
    account_site_release(policy, ctx, str(tmp_path), "k1", "local DP", 0.7, 1e-5, True)
    # Its state says it released before, but the ledger has no line for it: lost ledger.
    with pytest.raises(ClientRefusal) as err:
        account_site_release(policy, ctx, str(tmp_path), "k3", "local DP", 0.1, 1e-5, True)
    assert str(err.value).startswith("site budget ledger: this run's local DP state records")
    assert "has none for run 'k3'" in str(err.value)
    # The per-run check names the kind.
    with pytest.raises(PolicyRefusal, match=r"^site policy `max_epsilon`: local DP epsilon would"):
        account_site_release(policy, ctx, str(tmp_path), "k1", "local DP", 2.5, 1e-5, True)
    ledger = tmp_path / "site-budget-site-a.jsonl"
    ledger.write_text(ledger.read_text() + "garbage\n")
    with pytest.raises(ClientRefusal, match=r"^site budget ledger: site budget ledger .* line 3"):
        account_site_release(policy, ctx, str(tmp_path), "k1", "local DP", 0.8, 1e-5, True)
    other = _context(**{"site-name": "b", "dp-state-dir": str(tmp_path)})
    (tmp_path / "site-budget-site-b.jsonl").mkdir()  # cannot be appended to
    with pytest.raises(ClientRefusal, match=r"^site budget ledger: \[Errno"):
        account_site_release(policy, other, str(tmp_path), "k", "local DP", 0.1, 1e-5, False)


# ------------------------------------------------ the policy applied to a request
def _spec(local_noise: float | None = None, clips: bool = False, dpsgd: bool = False) -> Any:
    from fl_app.client_spec import ClientDpSpec
    from fl_app.config.schema import DpSgdConfig

    client_dp = ClientDpSpec(local_noise_multiplier=local_noise) if clips else None
    return ClientSpec(run_key="k", client_dp=client_dp, dpsgd=DpSgdConfig() if dpsgd else None)


def test_the_artifact_a_reply_releases() -> None:
    secure: dict[str, int] = {SECAGG_STAGE_KEY: 3}
    plain: dict[str, int] = {}
    assert artifact(_spec(), "train", plain) == "update"
    assert artifact(_spec(clips=True), "train", plain) == "clipped_update"
    assert artifact(_spec(local_noise=2.0, clips=True), "train", plain) == "noised_update"
    assert artifact(_spec(clips=True), "train", secure) == "masked_update"
    assert artifact(_spec(), "train", {SECAGG_STAGE_KEY: 2}) == "update"
    assert artifact(_spec(), "evaluate", plain) == "evaluation_metrics"


def test_enforce_request_passes_the_instruction_as_it_is() -> None:
    enforce_request(None, _spec(), "train", {})  # no policy: anything goes
    only_masked = SitePolicy(allowed_artifacts=frozenset({"masked_update"}))
    enforce_request(only_masked, _spec(clips=True), "train", {SECAGG_STAGE_KEY: 3})
    with pytest.raises(PolicyRefusal) as err:
        enforce_request(only_masked, _spec(clips=True), "train", {})
    assert err.value.field == "allowed_artifacts" and "`clipped_update`" in str(err.value)
    secure_only = SitePolicy(require_secure_aggregation=True)
    enforce_request(secure_only, _spec(), "train", {SECAGG_STAGE_KEY: 3})
    with pytest.raises(PolicyRefusal, match="require_secure_aggregation"):
        enforce_request(secure_only, _spec(), "train", {SECAGG_STAGE_KEY: 2})
    dpsgd_only = SitePolicy(require_record_level_dp=True)
    enforce_request(dpsgd_only, _spec(dpsgd=True), "train", {})
    with pytest.raises(PolicyRefusal, match="require_record_level_dp"):
        enforce_request(dpsgd_only, _spec(), "train", {})
    # A bounded site trains only where it accounts an epsilon: DP-SGD or local DP.
    bounded = SitePolicy(max_epsilon=3.0)
    enforce_request(bounded, _spec(dpsgd=True), "train", {})
    enforce_request(bounded, _spec(local_noise=2.0, clips=True), "train", {})
    for unaccounted in (_spec(), _spec(clips=True)):
        with pytest.raises(PolicyRefusal, match="max_epsilon"):
            enforce_request(bounded, unaccounted, "train", {})
    enforce_request(
        SitePolicy(allowed_artifacts=frozenset({"evaluation_metrics"})), _spec(), "evaluate", {}
    )


def test_site_policy_from_node_config(tmp_path: Path) -> None:
    assert site_policy(_context()) is None
    assert site_policy(_context(**{"policy-path": ""})) is None
    path = tmp_path / "policy.yaml"
    path.write_text("max_epsilon: 4.0\n")
    assert site_policy(_context(**{"policy-path": str(path)})) == SitePolicy(max_epsilon=4.0)
    # A site holding a signing key gets the untrusted-server floor.
    keyed = site_policy(_context(**{"policy-path": str(path), "signing-key-path": "/k"}))
    assert keyed is not None and keyed.secagg_min_server_model == "malicious"
    assert keyed.max_epsilon == 4.0 and keyed.require_secure_aggregation
    path.write_text("max_epsilon: -1\n")
    with pytest.raises(ClientRefusal, match=r"^site policy: policy file .*`max_epsilon`"):
        site_policy(_context(**{"policy-path": str(path)}))


def test_site_accountant_accounts_one_kind_of_release(tmp_path: Path) -> None:
    ctx = _context(**{"site-name": "a", "dp-state-dir": str(tmp_path)})
    account = site_accountant(
        SitePolicy(max_epsilon=1.0), ctx, str(tmp_path), "k", "record-level", 2e-6
    )
    account(0.5, False)
    line = json.loads((tmp_path / "site-budget-site-a.jsonl").read_text())
    assert line == {
        "version": 1,
        "run_key": "k",
        "kind": "record-level",
        "epsilon": 0.5,
        "delta": 2e-6,
    }
    with pytest.raises(ClientRefusal, match="has none for run 'k2'"):
        site_accountant(None, ctx, str(tmp_path), "k2", "record-level", 2e-6)(0.1, True)
    with pytest.raises(PolicyRefusal, match="max_epsilon"):
        site_accountant(SitePolicy(max_epsilon=1.0), ctx, str(tmp_path), "k", "record-level", 2e-6)(
            1.5, True
        )
