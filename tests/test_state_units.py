"""fl_app/privacy/state.py as a unit: the per-run state files and the site's budget ledger.

These files are the only memory of spent privacy across restarts, so every check that
refuses a lost, rewound, corrupt or foreign file is pinned here with inputs written by
hand (JSON literals, the file names the docstrings promise, sums worked out in the
comments), not with values the module computes. The stores are built as the ClientApp
builds them (fl_app.client.state: memory in a Context.state record). Killed mutants of
state.py (mutmut, tests/mutants-accepted.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fl_app.client.state import LOCAL_DP_RECORD, STATE_RECORD, dpsgd_store, local_dp_store
from fl_app.privacy.history import DpSgdEvent, PrivacyHistory
from fl_app.privacy.state import (
    ClientPrivacyState,
    DpSgdState,
    LocalDpState,
    LocalDpStore,
    PrivacyStateError,
    SiteBudgetLedger,
    SiteSpend,
)

HISTORY = PrivacyHistory((DpSgdEvent(1.5, 0.25, 8), DpSgdEvent(2.0, 0.5, 4)))  # 12 steps
HISTORY_JSON = {
    "version": 1,
    "events": [
        {"noise_multiplier": 1.5, "sample_rate": 0.25, "steps": 8},
        {"noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 4},
    ],
}


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _dpsgd_text(**fields: object) -> str:
    raw: dict[str, object] = {"version": 1, "noise_multiplier": 1.25, "history": HISTORY_JSON}
    raw.update(fields)
    return json.dumps(raw)


# ----------------------------------------------------------------------- DpSgdState
def test_dpsgd_state_json_is_sorted_versioned_and_round_trips() -> None:
    state = DpSgdState(HISTORY, 1.25)
    text = state.to_json()
    assert json.loads(text) == {"version": 1, "noise_multiplier": 1.25, "history": HISTORY_JSON}
    assert list(json.loads(text)) == ["history", "noise_multiplier", "version"]  # sort_keys
    assert DpSgdState.from_json(text) == state
    assert DpSgdState.from_json(_dpsgd_text()) == state
    unset = DpSgdState.from_json(_dpsgd_text(noise_multiplier=None))
    assert unset == DpSgdState(HISTORY, None) and unset.noise_multiplier is None
    as_int = DpSgdState.from_json(_dpsgd_text(noise_multiplier=2))
    assert as_int.noise_multiplier == 2.0 and isinstance(as_int.noise_multiplier, float)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "privacy state is not valid JSON"),
        ("[1]", "privacy state has an unknown version"),
        (_dpsgd_text(version=2), "privacy state has an unknown version"),
        (json.dumps({"noise_multiplier": 1.0, "history": HISTORY_JSON}), "unknown version"),
        (_dpsgd_text(noise_multiplier=True), "noise_multiplier is invalid: True"),
        (_dpsgd_text(noise_multiplier="1.0"), "noise_multiplier is invalid: '1.0'"),
        (_dpsgd_text(noise_multiplier=0), "noise_multiplier is invalid: 0"),
        (_dpsgd_text(noise_multiplier=-1.5), "noise_multiplier is invalid: -1.5"),
        ('{"version": 1, "noise_multiplier": Infinity}', "noise_multiplier is invalid: inf"),
        ('{"version": 1, "noise_multiplier": NaN}', "noise_multiplier is invalid: nan"),
        (_dpsgd_text(history={"version": 1, "events": "x"}), "privacy state history is invalid"),
        (_dpsgd_text(history=None), "privacy state history is invalid"),
    ],
)
def test_dpsgd_state_refuses_malformed_files(text: str, match: str) -> None:
    with pytest.raises(PrivacyStateError, match=match):
        DpSgdState.from_json(text)


def test_a_tiny_positive_noise_multiplier_is_kept() -> None:
    assert DpSgdState.from_json(_dpsgd_text(noise_multiplier=1e-300)).noise_multiplier == 1e-300


# ----------------------------------------- ClientPrivacyState (memory: Context.state)
def test_dpsgd_state_file_names(tmp_path: Path) -> None:
    ctx = _context()
    assert dpsgd_store(ctx, tmp_path, "run_1-A", 3).path == (
        tmp_path / "dpsgd-run_1-A-partition-3.json"
    )
    assert dpsgd_store(ctx, str(tmp_path), "k", "site-a.b").path == (
        tmp_path / "dpsgd-k-site-a.b.json"
    )
    longest_key, longest_site = "k" * 64, "s" * 80
    assert dpsgd_store(ctx, tmp_path, longest_key, longest_site).path.name == (
        f"dpsgd-{longest_key}-{longest_site}.json"
    )


@pytest.mark.parametrize(
    ("run_key", "site", "what"),
    [
        ("", "site-a", "run key ''"),
        ("k" * 65, "site-a", "run key"),
        ("a.b", "site-a", "run key 'a.b'"),
        ("a/b", "site-a", "run key"),
        ("k", "", "site identity ''"),
        ("k", "s" * 81, "site identity"),
        ("k", ".hidden", "site identity '.hidden'"),
        ("k", "a/b", "site identity"),
    ],
)
def test_unsafe_file_name_parts_are_refused(run_key: str, site: str, what: str) -> None:
    with pytest.raises(PrivacyStateError, match=f"{what}.*is not a safe file-name component"):
        dpsgd_store(_context(), "/nonexistent", run_key, site)
    with pytest.raises(PrivacyStateError, match="is not a safe file-name component"):
        local_dp_store(_context(), "/nonexistent", run_key, site)


def test_none_run_key_and_site_are_refused_not_crashing() -> None:
    with pytest.raises(PrivacyStateError, match="run key None"):
        dpsgd_store(_context(), "/x", None, "s")  # type: ignore[arg-type]
    with pytest.raises(PrivacyStateError, match="site identity None"):
        local_dp_store(_context(), "/x", "k", None)  # type: ignore[arg-type]
    with pytest.raises(PrivacyStateError, match="site identity None"):
        SiteBudgetLedger("/x", None)  # type: ignore[arg-type]


def test_dpsgd_save_writes_the_file_and_memory_then_load_reads_them(tmp_path: Path) -> None:
    ctx = _context()
    store = dpsgd_store(ctx, tmp_path / "deep" / "dir", "k", "site-a")
    fresh = store.load()
    assert fresh == DpSgdState(PrivacyHistory(), None) and not store.path.exists()
    state = DpSgdState(HISTORY, 1.25)
    store.save(state)
    assert json.loads(store.path.read_text()) == json.loads(_dpsgd_text())
    assert ctx.state.config_records[STATE_RECORD]["state"] == store.path.read_text()
    # Memory and file agree; the server saw exactly the 12 recorded steps: allowed.
    assert store.load(steps_seen_by_server=12) == state
    # A restarted node (no memory) trusts the file.
    assert dpsgd_store(_context(), tmp_path / "deep" / "dir", "k", "site-a").load(12) == state


def test_dpsgd_load_refuses_fewer_steps_than_the_server_saw_without_quoting_them(
    tmp_path: Path,
) -> None:
    store = dpsgd_store(_context(), tmp_path, "k", "site-a")
    store.save(DpSgdState(HISTORY, 1.25))
    with pytest.raises(PrivacyStateError, match="lost or replaced") as err:
        store.load(steps_seen_by_server=13)
    text = str(err.value).replace(str(tmp_path), "")
    assert "13" not in text and "12" not in text
    with pytest.raises(PrivacyStateError, match="lost or replaced"):
        dpsgd_store(_context(), tmp_path / "other", "k", "site-a").load(1)
    # Fresh state, nothing seen: fine.
    assert dpsgd_store(_context(), tmp_path / "other", "k", "site-a").load(0).history == (
        PrivacyHistory()
    )


def test_dpsgd_load_refuses_a_missing_or_disagreeing_file(tmp_path: Path) -> None:
    ctx = _context()
    store = dpsgd_store(ctx, tmp_path, "k", "site-a")
    store.save(DpSgdState(HISTORY, 1.25))
    store.path.write_text(DpSgdState(HISTORY, 1.5).to_json())
    with pytest.raises(PrivacyStateError, match="disagrees with this node's in-memory"):
        store.load()
    store.path.unlink()
    with pytest.raises(PrivacyStateError, match="is missing although this node has spent"):
        store.load()
    # Memory that is not a string (a foreign record) counts as none.
    ctx.state[STATE_RECORD] = ConfigRecord({"state": 3})
    assert store.load() == DpSgdState(PrivacyHistory())
    ctx.state[STATE_RECORD] = ConfigRecord({"other": "x"})
    assert store.load() == DpSgdState(PrivacyHistory())


# ----------------------------------------------------------------------- local DP
def test_local_state_json_and_validation() -> None:
    state = LocalDpState(3, 4.0)
    assert json.loads(state.to_json()) == {
        "version": 1,
        "kind": "local-dp",
        "releases": 3,
        "noise_multiplier": 4.0,
    }
    assert list(json.loads(state.to_json())) == ["kind", "noise_multiplier", "releases", "version"]
    assert LocalDpState.from_json(state.to_json()) == state
    zero = LocalDpState.from_json(
        '{"version": 1, "kind": "local-dp", "releases": 0, "noise_multiplier": 2}'
    )
    assert zero == LocalDpState(0, 2.0) and isinstance(zero.noise_multiplier, float)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"version": 2}, "unknown format"),
        ({"kind": "dpsgd"}, "unknown format"),
        ({"kind": None}, "unknown format"),
        ({"version": None}, "unknown format"),
        ({"releases": True}, "releases is invalid: True"),
        ({"releases": 1.0}, "releases is invalid: 1.0"),
        ({"releases": -1}, "releases is invalid: -1"),
        ({"releases": None}, "releases is invalid: None"),
        ({"noise_multiplier": True}, "noise_multiplier is invalid: True"),
        ({"noise_multiplier": "4"}, "noise_multiplier is invalid: '4'"),
        ({"noise_multiplier": 0.0}, "noise_multiplier is invalid: 0.0"),
        ({"noise_multiplier": -4.0}, "noise_multiplier is invalid: -4.0"),
        ({"noise_multiplier": math.inf}, "noise_multiplier is invalid: inf"),
        ({"noise_multiplier": math.nan}, "noise_multiplier is invalid: nan"),
        ({"noise_multiplier": None}, "noise_multiplier is invalid: None"),
    ],
)
def test_local_state_refuses_malformed_files(fields: dict[str, object], match: str) -> None:
    raw = {"version": 1, "kind": "local-dp", "releases": 2, "noise_multiplier": 4.0, **fields}
    with pytest.raises(PrivacyStateError, match=match):
        LocalDpState.from_json(json.dumps(raw))


def test_local_state_refuses_non_json_and_non_objects() -> None:
    with pytest.raises(PrivacyStateError, match="local DP state is not valid JSON"):
        LocalDpState.from_json("{")
    with pytest.raises(PrivacyStateError, match="local DP state has an unknown format"):
        LocalDpState.from_json("[]")


def test_local_store_file_name_save_and_boundaries(tmp_path: Path) -> None:
    ctx = _context()
    store = local_dp_store(ctx, tmp_path, "run-9", "data-ab12")
    assert store.path == tmp_path / "localdp-run-9-data-ab12.json"
    assert store.load(4.0) == LocalDpState(0, 4.0)
    store.save(LocalDpState(2, 4.0))
    assert json.loads(store.path.read_text())["releases"] == 2
    assert ctx.state.config_records[LOCAL_DP_RECORD]["state"] == store.path.read_text()
    assert store.load(4.0, releases_seen_by_server=2) == LocalDpState(2, 4.0)  # equal: fine
    with pytest.raises(PrivacyStateError) as err:
        store.load(4.0, releases_seen_by_server=3)
    assert "received 3 local-DP releases" in str(err.value) and "records 2" in str(err.value)
    with pytest.raises(PrivacyStateError) as err:
        store.load(2.5)
    assert "noise multiplier 4, this run asks for 2.5" in str(err.value)
    # A fresh store with releases already seen by the server: the state was lost.
    with pytest.raises(PrivacyStateError, match="received 1 local-DP releases"):
        local_dp_store(_context(), tmp_path / "new", "run-9", "data-ab12").load(4.0, 1)
    with pytest.raises(PrivacyStateError, match=r"local DP state file .* is missing"):
        store.path.unlink()
        store.load(4.0)


def test_local_store_refuses_memory_that_disagrees(tmp_path: Path) -> None:
    ctx = _context()
    store = local_dp_store(ctx, tmp_path, "k", "site-a")
    store.save(LocalDpState(2, 4.0))
    store.path.write_text(LocalDpState(1, 4.0).to_json())
    with pytest.raises(PrivacyStateError, match="disagrees with this node's in-memory state"):
        store.load(4.0)
    ctx.state[LOCAL_DP_RECORD] = ConfigRecord({"state": 5})  # not a string: no memory
    assert store.load(4.0) == LocalDpState(1, 4.0)


# ------------------------------------------------------------------ site ledger
def _spend_text(**fields: object) -> str:
    raw: dict[str, object] = {
        "version": 1,
        "run_key": "k1",
        "kind": "record-level",
        "epsilon": 1.5,
        "delta": 1e-5,
    }
    raw.update(fields)
    return json.dumps(raw)


def test_site_spend_json_round_trips() -> None:
    spend = SiteSpend("k1", "local DP", 2.0, 1e-6)
    assert json.loads(spend.to_json()) == {
        "version": 1,
        "run_key": "k1",
        "kind": "local DP",
        "epsilon": 2.0,
        "delta": 1e-6,
    }
    assert list(json.loads(spend.to_json())) == ["delta", "epsilon", "kind", "run_key", "version"]
    assert SiteSpend.from_json(spend.to_json()) == spend
    zeros = SiteSpend.from_json(_spend_text(epsilon=0, delta=0))
    assert zeros == SiteSpend("k1", "record-level", 0.0, 0.0)
    assert isinstance(zeros.epsilon, float) and isinstance(zeros.delta, float)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nope", "not valid JSON"),
        ("[]", "unknown format"),
        (_spend_text(version=0), "unknown format"),
        (_spend_text(run_key=7), "field run_key is invalid: 7"),
        (_spend_text(run_key="a.b"), "field run_key is invalid: 'a.b'"),
        (_spend_text(run_key=""), "field run_key is invalid: ''"),
        (_spend_text(kind="central"), "field kind is 'central', not one of"),
        (_spend_text(epsilon=True), "field epsilon is invalid: True"),
        (_spend_text(epsilon="1"), "field epsilon is invalid: '1'"),
        (_spend_text(epsilon=-0.5), "field epsilon is invalid: -0.5"),
        (_spend_text(epsilon=math.inf), "field epsilon is invalid: inf"),
        (_spend_text(delta=False), "field delta is invalid: False"),
        (_spend_text(delta=-1e-9), "field delta is invalid: -1e-09"),
        (_spend_text(delta=math.nan), "field delta is invalid: nan"),
        (_spend_text(delta=None), "field delta is invalid: None"),
    ],
)
def test_site_spend_refuses_malformed_lines(text: str, match: str) -> None:
    with pytest.raises(PrivacyStateError, match=match):
        SiteSpend.from_json(text)


def test_site_ledger_path_lines_and_line_numbers(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path / "new" / "dir", "site-x")
    assert ledger.path == tmp_path / "new" / "dir" / "site-budget-site-x.jsonl"
    assert ledger.entries() == []
    first, second = SiteSpend("k1", "record-level", 1.0, 1e-5), SiteSpend("k1", "local DP", 2, 0)
    ledger.record(first)
    ledger.record(second)
    lines = ledger.path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        json.loads(first.to_json()),
        json.loads(second.to_json()),
    ]
    assert ledger.path.read_text().endswith("\n")
    assert ledger.entries() == [first, second]
    with ledger.path.open("a") as fh:
        fh.write(_spend_text(kind="bad") + "\n")
    with pytest.raises(PrivacyStateError) as err:
        ledger.entries()
    assert f"site budget ledger {ledger.path} line 3: field kind is 'bad'" in str(err.value)
    assert "refusing until an operator repairs it" in str(err.value)


def test_site_ledger_record_refuses_an_unknown_kind(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path, "site-x")
    with pytest.raises(PrivacyStateError, match="kind 'central' is not one of"):
        ledger.record(SiteSpend("k1", "central", 1.0, 0.0))
    assert not ledger.path.exists()


def test_site_ledger_total_by_hand(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path, "site-x")
    # Run a: record-level 1.0 then 2.0 (its latest/largest: 2.0, delta 2e-6); local DP
    # 3.0 with delta 1e-6. A run counts its larger kind: epsilon 3.0, delta 2e-6.
    for spend in (
        SiteSpend("a", "record-level", 1.0, 1e-6),
        SiteSpend("a", "record-level", 2.0, 2e-6),
        SiteSpend("a", "local DP", 3.0, 1e-6),
        # Run b: a lower second line does not lower it (max, not last): 0.5, 4e-6.
        SiteSpend("b", "record-level", 0.5, 4e-6),
        SiteSpend("b", "record-level", 0.25, 3e-6),
    ):
        ledger.record(spend)
    # New run c at (0.125, 1e-7): 3.0 + 0.5 + 0.125 and 2e-6 + 4e-6 + 1e-7.
    eps, delta = ledger.total("c", "record-level", 0.125, 1e-7)
    assert eps == 3.625 and delta == pytest.approx(6.1e-6, rel=1e-12)
    # Run b's new value below its record keeps the record; above it replaces it.
    assert ledger.total("b", "record-level", 0.1, 1e-9) == (3.5, pytest.approx(6e-6, rel=1e-12))
    assert ledger.total("b", "record-level", 1.0, 5e-6) == (4.0, pytest.approx(7e-6, rel=1e-12))
    # Run a's record-level reaching 2.5 stays below its local 3.0; reaching 3.5 raises it.
    assert ledger.total("a", "record-level", 2.5, 0.0)[0] == 3.5
    assert ledger.total("a", "record-level", 3.5, 0.0)[0] == 4.0


def test_site_ledger_check_recorded(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path, "site-x")
    ledger.check_recorded("k1", "local DP", spent=False)
    ledger.record(SiteSpend("k2", "local DP", 1.0, 0.0))
    with pytest.raises(PrivacyStateError) as err:
        ledger.check_recorded("k1", "local DP", spent=True)  # another run's line only
    assert "this run's local DP state records releases" in str(err.value)
    assert f"{ledger.path} has none for run 'k1'" in str(err.value)
    ledger.check_recorded("k2", "local DP", spent=True)
    with pytest.raises(PrivacyStateError, match="has none for run 'k2'"):
        ledger.check_recorded("k2", "record-level", spent=True)  # same run, other kind


def test_refusals_say_what_to_do(tmp_path: Path) -> None:
    """Each refusal ends with what happens next (nothing is trained or released until an
    operator acts), the part of the message an operator acts on."""
    ctx = _context()
    store = dpsgd_store(ctx, tmp_path, "k", "site-a")
    store.save(DpSgdState(HISTORY, 1.25))
    store.path.write_text(DpSgdState(HISTORY, 1.5).to_json())
    with pytest.raises(PrivacyStateError) as err:
        store.load()
    assert str(err.value) == (
        f"privacy state file {store.path} disagrees with this node's in-memory state: "
        "refusing to train until an operator resolves it"
    )
    store.path.unlink()
    with pytest.raises(PrivacyStateError) as err:
        store.load()
    assert str(err.value) == (
        f"privacy state file {store.path} is missing although this node has spent privacy "
        "budget in this run: refusing to restart accounting from zero"
    )
    local = local_dp_store(_context(), tmp_path, "k", "site-a")
    local.save(LocalDpState(2, 4.0))
    with pytest.raises(PrivacyStateError) as err:
        local.load(2.5)
    assert str(err.value) == (
        f"local DP state file {local.path} was written for noise multiplier 4, this run asks "
        "for 2.5: the releases would be accounted with the wrong noise; refusing"
    )
    with pytest.raises(PrivacyStateError) as err:
        local.load(4.0, releases_seen_by_server=3)
    assert str(err.value) == (
        f"the server received 3 local-DP releases from this site but the state at "
        f"{local.path} records 2: the state file was lost or replaced; refusing to release"
    )
    local.path.unlink()
    with pytest.raises(PrivacyStateError) as err:
        local.load(4.0)
    assert str(err.value) == (
        f"local DP state file {local.path} is missing although this node has released "
        "updates in this run: refusing to restart accounting from zero"
    )
    ledger = SiteBudgetLedger(tmp_path, "site-a")
    with pytest.raises(PrivacyStateError) as err:
        ledger.check_recorded("k", "local DP", spent=True)
    assert str(err.value) == (
        f"this run's local DP state records releases but the site budget ledger "
        f"{ledger.path} has none for run 'k': the ledger was lost or replaced; refusing to "
        "release until an operator restores it"
    )


def test_local_state_keeps_a_noise_multiplier_below_one() -> None:
    text = '{"version": 1, "kind": "local-dp", "releases": 1, "noise_multiplier": 0.5}'
    assert LocalDpState.from_json(text) == LocalDpState(1, 0.5)


def test_the_stores_keep_their_memory_in_any_state_memory(tmp_path: Path) -> None:
    """fl_app.privacy.state has no Flower import: its stores take any StateMemory (the
    ClientApp's is fl_app.client.state.ContextMemory); the rules are the same."""

    class Memory:
        def __init__(self) -> None:
            self.text: str | None = None

        def get(self) -> str | None:
            return self.text

        def put(self, text: str) -> None:
            self.text = text

    memory = Memory()
    store = ClientPrivacyState(memory, tmp_path, "k", "site-a")
    store.save(DpSgdState(HISTORY, 1.25))
    assert memory.text == store.path.read_text() == DpSgdState(HISTORY, 1.25).to_json()
    memory.text = DpSgdState(HISTORY, 1.5).to_json()
    with pytest.raises(PrivacyStateError, match="disagrees with this node's in-memory"):
        store.load()
    local_memory = Memory()
    local = LocalDpStore(local_memory, tmp_path, "k", "site-a")
    local.save(LocalDpState(2, 4.0))
    assert local_memory.text == local.path.read_text() == LocalDpState(2, 4.0).to_json()
    local.path.unlink()
    with pytest.raises(PrivacyStateError, match=r"local DP state file .* is missing"):
        local.load(4.0)
