"""The site's epsilon cap (policy ``max_epsilon``) bounds its spend over every run.

Per-run accounting files are named by the server's run key, so a server that renames
the run gets a fresh per-run count; the site's budget ledger
(:class:`fl_app.privacy.state.SiteBudgetLedger`) is named by the site identity and
composes every run (red-team finding r9: release 3 under a new run key trained at
epsilon 2.14 against a cap of 2.36 that release 2 had already hit). Also: a budget
refusal sent to the server quotes no DP-SGD steps (they give the record count, r11).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client_spec import ClientDpSpec
from fl_app.config.compose import compose_config
from fl_app.config.schema import Accountant
from fl_app.privacy.state import PrivacyStateError, SiteBudgetLedger, SiteSpend
from fl_app.protocol import BUDGET_EXHAUSTED, CLIP_NORM_KEY, SPEC_KEY

# ---------------------------------------------------------------- the ledger alone


def test_ledger_sums_each_runs_latest_epsilon_and_delta(tmp_path: Path) -> None:
    """Basic composition over runs: sum of each (run, kind)'s largest epsilon/delta."""
    ledger = SiteBudgetLedger(tmp_path, "site-a")
    assert ledger.total("k1", "record-level", 1.0, 1e-5) == (1.0, 1e-5)  # empty ledger
    ledger.record(SiteSpend("k1", "record-level", 1.0, 1e-5))
    ledger.record(SiteSpend("k1", "record-level", 1.5, 1e-5))  # same run, one more round
    ledger.record(SiteSpend("k2", "local DP", 0.75, 1e-6))
    # k1's 1.5 and k2's 0.75, plus a new run k3 at 0.5: 2.75; delta 1e-5 + 1e-6 + 1e-5.
    eps, delta = ledger.total("k3", "record-level", 0.5, 1e-5)
    assert eps == pytest.approx(2.75, abs=1e-12)
    assert delta == pytest.approx(2.1e-5, rel=1e-12)
    # k2 also DP-SGD-trained the updates it noised: the same releases, the larger epsilon
    # (0.75) and delta (1e-5) count once, not 0.75 + 0.5.
    ledger.record(SiteSpend("k2", "record-level", 0.5, 1e-5))
    eps, delta = ledger.total("k3", "record-level", 0.5, 1e-5)
    assert eps == pytest.approx(2.75, abs=1e-12)
    assert delta == pytest.approx(3e-5, rel=1e-12)
    # k1 going on to 2.0 replaces its 1.5 (a run's epsilon includes its earlier rounds).
    assert ledger.total("k1", "record-level", 2.0, 1e-5)[0] == pytest.approx(2.75, abs=1e-12)
    # Another site sharing the directory has its own ledger.
    assert SiteBudgetLedger(tmp_path, "site-b").total("k1", "local DP", 0.1, 0.0)[0] == 0.1


def test_ledger_refuses_a_torn_line_and_a_lost_ledger(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path, "partition-0")
    ledger.check_recorded("k1", "record-level", spent=False)  # nothing spent: fine
    with pytest.raises(PrivacyStateError, match="lost or replaced"):
        ledger.check_recorded("k1", "record-level", spent=True)
    ledger.record(SiteSpend("k1", "record-level", 1.0, 1e-5))
    ledger.check_recorded("k1", "record-level", spent=True)
    with pytest.raises(PrivacyStateError, match="lost or replaced"):
        ledger.check_recorded("k1", "local DP", spent=True)
    with ledger.path.open("a") as fh:
        fh.write('{"version": 1, "run_key": "k2", "kind": "record-level", "eps')
    with pytest.raises(PrivacyStateError, match="line 2"):
        ledger.total("k1", "record-level", 1.0, 1e-5)
    ledger.path.write_text(json.dumps({**json.loads(SiteSpend("k", "x", 1, 0).to_json())}))
    with pytest.raises(PrivacyStateError, match="kind"):
        ledger.entries()
    with pytest.raises(PrivacyStateError, match="safe"):
        SiteBudgetLedger(tmp_path, "../x")


# ------------------------------------------------------------- through the client


def _train_message(
    cfg: Any,
    run_key: str,
    client_dp: Any = None,
    extra: dict[str, Any] | None = None,
    **node_config: Any,
) -> Message:
    """A fresh node's reply to round 1 of ``cfg`` under ``run_key`` (partition 0)."""
    from fl_app.client.app import app as client_app
    from fl_app.client_spec import encode_spec, spec_from_config
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import initial_arrays
    from fl_app.weights import to_array_record

    grid = InProcessGrid(client_app, 3, seed=0)
    spec = spec_from_config(cfg, run_key, client_dp)
    config: dict[str, Any] = {SPEC_KEY: encode_spec(spec), "server-round": 1}
    if client_dp is not None:
        config[CLIP_NORM_KEY] = 1.0
    config.update(extra or {})
    content = RecordDict(
        {"arrays": to_array_record(initial_arrays(cfg)), "config": ConfigRecord(config)}
    )
    msg = Message(content, dst_node_id=grid.node_ids[0], message_type="train")
    context = Context(
        run_id=1,
        node_id=grid.node_ids[0],
        node_config={"partition-id": 0, "num-partitions": 3, **node_config},
        state=RecordDict(),
        run_config={},
    )
    return client_app(msg, context)


def _dpsgd_cfg(state_dir: Path, *overrides: str) -> Any:
    return compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=dpsgd",
            "dataset.num_partitions=3",
            "train.local_epochs=1",
            f"privacy.dpsgd.state_dir={state_dir}",
            "privacy.dpsgd.accountant=rdp",  # fastest; the refusal, not the value, is tested
            *overrides,
        ],
    )


def test_renaming_the_run_does_not_rewind_the_sites_dpsgd_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Red-team r9's sequence: a cap that admits one DP-SGD round but not two. Round 2
    under run key k1 is refused; so is round 1 under a new key k2 (per run it is only
    epsilon_1, under the cap, but it is the site's second release on the same data).
    The refusal the server receives quotes no steps; the site's own log keeps them."""
    probe = _train_message(_dpsgd_cfg(tmp_path / "probe"), "probe")
    assert not probe.has_error(), probe.error
    eps1 = float(probe.content["metrics"]["dp-epsilon"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"max_epsilon: {eps1 * 1.1}\n")
    site_dir = tmp_path / "site-state"
    node = {"policy-path": str(policy), "dp-state-dir": str(site_dir)}
    cfg = _dpsgd_cfg(tmp_path / "server-chosen")

    first = _train_message(cfg, "k1", **node)
    assert not first.has_error(), first.error
    assert float(first.content["metrics"]["dp-epsilon"]) == eps1
    with caplog.at_level(logging.WARNING, logger="fl_app.client"):
        second = _train_message(cfg, "k1", **node)
        renamed = _train_message(cfg, "k2", **node)
    assert second.has_error() and second.error.code == BUDGET_EXHAUSTED
    assert renamed.has_error() and renamed.error.code == BUDGET_EXHAUSTED
    assert "max_epsilon" in renamed.error.reason and "every run" in renamed.error.reason
    # One release on the site's data, recorded before it was made; nothing for k2.
    lines = (site_dir / "site-budget-partition-0.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_key"] for line in lines] == ["k1"]
    assert json.loads(lines[0])["epsilon"] == eps1
    assert not list(site_dir.glob("dpsgd-k2-*"))
    assert not (tmp_path / "server-chosen").exists()  # the site's own directory only

    # r11: the per-run budget refusal (the server's max_epsilon) names no steps.
    budget = _dpsgd_cfg(tmp_path / "b", f"privacy.dpsgd.max_epsilon={eps1 * 1.1}")
    assert not _train_message(budget, "r").has_error()
    with caplog.at_level(logging.WARNING, logger="fl_app.client"):
        refused = _train_message(budget, "r")
    assert refused.has_error() and refused.error.code == BUDGET_EXHAUSTED
    assert "step" not in refused.error.reason.lower()
    state = json.loads(next((tmp_path / "b").glob("dpsgd-r-*.json")).read_text())
    steps = sum(event["steps"] for event in state["history"]["events"])
    assert steps > 0 and f"{steps} steps spent" in caplog.text


def test_the_lost_state_refusal_quotes_no_steps(tmp_path: Path) -> None:
    """Under secure aggregation and local DP the server sends the rounds it saw, not
    steps; a site whose state is lost refuses without telling it the step count (rounds
    x steps per round gives the record count to within a batch)."""
    from fl_app.privacy.state import ROUNDS_SEEN_KEY

    assert not _train_message(_dpsgd_cfg(tmp_path / "probe"), "p").has_error()
    state = json.loads(next((tmp_path / "probe").glob("dpsgd-p-*.json")).read_text())
    per_round = sum(event["steps"] for event in state["history"]["events"])
    reply = _train_message(_dpsgd_cfg(tmp_path / "lost"), "l", extra={ROUNDS_SEEN_KEY: 3})
    assert reply.has_error() and "lost or replaced" in reply.error.reason
    text = reply.error.reason.replace(str(tmp_path), "")  # the tmp path may hold digits
    assert str(3 * per_round) not in text and str(per_round) not in text


def test_a_deployed_site_with_a_cap_keeps_its_ledger_in_its_own_directory(
    tmp_path: Path,
) -> None:
    """Without node-config dp-state-dir the ledger would live where the server's spec
    says, and a server naming a fresh directory would reset the site's budget."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_epsilon: 100\n")
    reply = _train_message(
        _dpsgd_cfg(tmp_path / "server-chosen"),
        "k1",
        **{"policy-path": str(policy), "site-name": "hospital-a"},
    )
    assert reply.has_error() and "dp-state-dir" in reply.error.reason
    assert "max_epsilon" in reply.error.reason
    assert not (tmp_path / "server-chosen").exists()  # refused before anything was written


Z = 4.0
DELTA = 1e-5


def _pld_local_epsilon(releases: int) -> float:
    """dp-accounting's PLD for local DP's Gaussian releases (replace-one sensitivity 2C,
    noise std zC: GaussianDpEvent(z / 2), as in test_local_dp_state)."""
    ref = PLDAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(Z / 2), releases)
    return float(ref.get_epsilon(DELTA))


def test_renaming_the_run_does_not_rewind_the_sites_local_dp_budget(tmp_path: Path) -> None:
    """A cap of 1.5 x epsilon(1 release): one release fits, and a second under a new run
    key is refused (the site's total is at least twice epsilon(1 release))."""
    cap = 1.5 * _pld_local_epsilon(1)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"max_epsilon: {cap}\n")
    node = {"policy-path": str(policy), "dp-state-dir": str(tmp_path / "site")}
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=local",
            f"privacy.noise_multiplier={Z}",
            f"privacy.delta={DELTA}",
            "privacy.accountant=prv",
            "dataset.num_partitions=3",
            "train.local_epochs=1",
            "server_eval=false",
        ],
    )
    local = ClientDpSpec(local_noise_multiplier=Z, delta=DELTA, accountant=Accountant.prv)
    first = _train_message(cfg, "k1", local, **node)
    assert not first.has_error(), first.error
    reported = float(first.content["metrics"]["dp-local-epsilon"])
    assert _pld_local_epsilon(1) * (1 - 1e-6) <= reported <= _pld_local_epsilon(1) * 1.01
    renamed = _train_message(cfg, "k2", local, **node)
    assert renamed.has_error() and renamed.error.code == BUDGET_EXHAUSTED
    assert "every run" in renamed.error.reason
    lines = (tmp_path / "site" / "site-budget-partition-0.jsonl").read_text().splitlines()
    assert [(json.loads(x)["run_key"], json.loads(x)["kind"]) for x in lines] == [
        ("k1", "local DP")
    ]


def test_model_card_says_the_record_count_is_public_within_what_epsilon_reveals() -> None:
    """Record-level epsilon is sent in plaintext even where the threat model hides the
    steps (it pins the count to within about a batch, red-team r5): the model card says
    the count is not secret instead of implying it is."""
    from fl_app.release.caveats import not_protected

    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=local",
            "privacy.record_level=true",
            "privacy.dpsgd.noise_multiplier=1.0",
        ],
    )
    text = " ".join(not_protected(cfg))
    assert "record-level epsilon" in text
    assert "within about a batch, so the record count is not secret" in text
