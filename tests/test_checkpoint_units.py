"""fl_app/server/checkpoint.py as a unit: writing, verifying and choosing a checkpoint.

tests/test_checkpoint.py drives whole runs (kill, resume, rollback); this file pins each
function on run directories built by hand, with expected hashes from ``hashlib`` over
the bytes on disk, manifests written as JSON literals, and every refusal (tampered
file, malformed manifest, rewound ledger, ledger behind the audit log, foreign run key)
checked by the message it promises. Kills mutants of checkpoint.py (mutmut,
tests/mutants-accepted.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fl_app.audit import verify_head_signature
from fl_app.config.compose import compose_config, config_hash, config_to_dict
from fl_app.config.errors import ConfigError
from fl_app.config.schema import AppConfig
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent
from fl_app.server.checkpoint import (
    CheckpointError,
    in_model_order,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_manifest,
    restore_strategy_state,
    run_config_hash,
    seal_checkpoint,
    strategy_state,
    write_checkpoint_files,
)
from fl_app.server.resume import ResumePlan, check_resume, plan_resume, set_aside_abandoned

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5], np.float32)}


class _Audit:
    """The two things seal_checkpoint reads of an AuditLog: append, then (seq, head)."""

    def __init__(self, seq: int = 6) -> None:
        self.records: list[tuple[str, Any]] = []
        self.seq = seq
        self.head = "0" * 64

    def append(self, event: str, data: Any) -> None:
        self.records.append((event, json.loads(json.dumps(data))))
        self.seq += 1
        self.head = hashlib.sha256(f"{self.seq}".encode()).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(run_dir: Path, rnd: int, *, ledger: str | None = None, key: str = "rk") -> Path:
    run_json = run_dir / "run.json"
    chash = json.loads(run_json.read_text())["config_hash"] if run_json.is_file() else "c" * 64
    files = write_checkpoint_files(
        run_dir,
        rnd=rnd,
        arrays=MODEL,
        strategy_arrays={},
        ledger_json=ledger,
        server_state={"round": rnd, "run_key": key},
        config_hash=chash,
    )
    # A log 10 records longer per round: each checkpoint has its own anchor (seq 10r+1).
    seal_checkpoint(run_dir, rnd=rnd, files=files, config_hash=chash, audit=_Audit(10 * rnd))
    return run_dir / "checkpoints" / f"round-{rnd:04d}"


# --------------------------------------------------------------- strategy state
class _Plain:
    def __init__(self) -> None:
        self.lr = 0.1


class _Strategy:
    def __init__(self) -> None:
        self.m_t: dict[str, np.ndarray] | None = None
        self.v_t = {"b": np.zeros(1), "w": np.ones((2, 3))}
        self.empty: dict[str, np.ndarray] = {}
        self.mixed = {"a": np.zeros(1), "b": 3}
        self.int_keys = {1: np.zeros(1)}
        self.name = "x"


def test_strategy_state_takes_only_nonempty_str_to_array_dicts() -> None:
    state = strategy_state(_Strategy())
    assert list(state) == ["v_t/b", "v_t/w"]
    assert np.array_equal(state["v_t/w"], np.ones((2, 3)))
    assert strategy_state(_Plain()) == {}


def test_in_model_order_checks_names_and_shapes_and_copies() -> None:
    arrays = {"b": np.array([2.0], np.float32), "w": np.zeros((2, 3), np.float32)}
    ordered = in_model_order(arrays, MODEL, "model")
    assert list(ordered) == ["w", "b"] and ordered["b"] is not arrays["b"]
    with pytest.raises(
        CheckpointError, match=r"model: array names \['b'\] differ from the model's"
    ):
        in_model_order({"b": arrays["b"]}, MODEL, "model")
    with pytest.raises(CheckpointError, match=r"x: 'w' has shape \(3, 2\), the model \(2, 3\)"):
        in_model_order({"b": arrays["b"], "w": np.zeros((3, 2))}, MODEL, "x")


def test_restore_strategy_state_sets_each_attribute_in_model_order() -> None:
    target = _Strategy()
    restore_strategy_state(
        target,
        {"m_t/b": np.array([1.0]), "m_t/w": np.full((2, 3), 2.0), "v_t/x": np.array([3.0])},
        MODEL,
    )
    assert target.m_t is not None and list(target.m_t) == ["w", "b"]
    assert np.array_equal(target.m_t["w"], np.full((2, 3), 2.0))
    assert list(target.v_t) == ["x"]  # not the model's names: kept as read
    for bad in ("noslash", "attr/"):
        with pytest.raises(CheckpointError, match=f"entry '{bad}' is not 'attribute/name'"):
            restore_strategy_state(_Strategy(), {bad: np.zeros(1)}, MODEL)
    for attr in ("absent", "name"):
        with pytest.raises(CheckpointError, match=f"strategy state '{attr}', which _Strategy"):
            restore_strategy_state(_Strategy(), {f"{attr}/w": np.zeros(1)}, MODEL)


# ----------------------------------------------------------------------- writing
def test_written_files_hash_to_what_the_manifest_lists(tmp_path: Path) -> None:
    files = write_checkpoint_files(
        tmp_path,
        rnd=3,
        arrays=MODEL,
        strategy_arrays={"m_t/w": np.ones(2)},
        ledger_json='{"l": 1}',
        server_state={"round": 3, "b": 1, "a": [1]},
        config_hash="h" * 64,
    )
    d = tmp_path / "checkpoints" / "round-0003"
    assert (
        list(files)
        == sorted(files)
        == [
            "model.safetensors",
            "privacy_ledger.json",
            "server_state.json",
            "strategy_state.safetensors",
        ]
    )
    assert all(files[name] == _sha(d / name) for name in files)
    assert (d / "privacy_ledger.json").read_text() == '{"l": 1}\n'
    assert (d / "server_state.json").read_text() == (
        '{\n "a": [\n  1\n ],\n "b": 1,\n "round": 3\n}\n'
    )
    assert not (d / "manifest.json").exists()
    audit = _Audit()
    key = Ed25519PrivateKey.generate()
    manifest = seal_checkpoint(
        tmp_path, rnd=3, files=files, config_hash="h" * 64, audit=audit, signing_key=key
    )
    assert audit.records == [("checkpoint.saved", {"round": 3, "files": files})]
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk == manifest
    assert {k: v for k, v in on_disk.items() if k != "created_at"} == {
        "format": 1,
        "round": 3,
        "config_hash": "h" * 64,
        "files": files,
        "audit": {"file": "audit.jsonl", "seq": 7, "head": audit.head},
    }
    assert on_disk["created_at"].endswith("+00:00")
    signed = json.loads((d / "audit_head.sig.json").read_text())
    assert signed["seq"] == 7 and signed["head"] == audit.head
    assert verify_head_signature(key.public_key(), signed)
    ck = load_checkpoint(d)
    assert ck.round == 3 and ck.audit_anchor == (7, audit.head)
    assert ck.ledger_json == '{"l": 1}\n' and ck.server_state == {"round": 3, "b": 1, "a": [1]}
    assert list(ck.arrays) == ["b", "w"] and np.array_equal(ck.arrays["w"], MODEL["w"])
    assert np.array_equal(ck.strategy_arrays["m_t/w"], np.ones(2))


def test_no_ledger_no_signature_and_an_interrupted_directory_is_replaced(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints" / "round-0012"
    d.mkdir(parents=True)
    (d / "stale.txt").write_text("left by a killed round")
    files = write_checkpoint_files(
        tmp_path,
        rnd=12,
        arrays=MODEL,
        strategy_arrays={},
        ledger_json=None,
        server_state={"round": 12},
        config_hash="h",
    )
    assert sorted(p.name for p in d.iterdir()) == [
        "model.safetensors",
        "server_state.json",
        "strategy_state.safetensors",
    ]
    assert "privacy_ledger.json" not in files
    seal_checkpoint(tmp_path, rnd=12, files=files, config_hash="h", audit=_Audit())
    assert not (d / "audit_head.sig.json").exists()
    assert load_checkpoint(d).ledger_json is None
    with pytest.raises(CheckpointError, match="already holds a complete checkpoint"):
        write_checkpoint_files(
            tmp_path,
            rnd=12,
            arrays=MODEL,
            strategy_arrays={},
            ledger_json=None,
            server_state={},
            config_hash="h",
        )


def test_list_and_prune_see_only_complete_round_directories(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path) == []
    for rnd in (2, 10, 1):
        _write(tmp_path, rnd)
    root = tmp_path / "checkpoints"
    (root / "round-0004").mkdir()  # interrupted: no manifest
    (root / "round-0005.rolledback-1").mkdir()
    (root / "round-005").mkdir()  # fewer than 4 digits
    (root / "round-0006").write_text("a file")
    assert list_checkpoints(tmp_path) == [
        (1, root / "round-0001"),
        (2, root / "round-0002"),
        (10, root / "round-0010"),
    ]
    assert prune_checkpoints(tmp_path, 0) == [] and prune_checkpoints(tmp_path, -1) == []
    assert len(list_checkpoints(tmp_path)) == 3
    assert prune_checkpoints(tmp_path, 2) == [1]
    assert [r for r, _ in list_checkpoints(tmp_path)] == [2, 10]
    assert (root / "round-0004").is_dir()  # only complete checkpoints are pruned
    set_aside_abandoned(tmp_path, [10], 3)
    assert (root / "round-0010.rolledback-3").is_dir() and not (root / "round-0010").exists()


# ----------------------------------------------------------------------- reading
def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize(
    "case",
    [
        "not-json",
        "list",
        "extra-key",
        "format",
        "round",
        "files-list",
        "files-missing-required",
        "files-unknown",
        "audit-list",
        "audit-seq",
        "audit-head",
    ],
)
def test_malformed_manifests_are_refused(tmp_path: Path, case: str) -> None:
    d = _write(tmp_path, 4)
    m = _manifest(d)
    text = None
    if case == "not-json":
        text = "{"
    elif case == "list":
        text = "[]"
    elif case == "extra-key":
        m["extra"] = 1
    elif case == "format":
        m["format"] = 2
    elif case == "round":
        m["round"] = 5
    elif case == "files-list":
        m["files"] = list(m["files"])
    elif case == "files-missing-required":
        del m["files"]["strategy_state.safetensors"]
    elif case == "files-unknown":
        m["files"]["notes.txt"] = "0" * 64
    elif case == "audit-list":
        m["audit"] = []
    elif case == "audit-seq":
        m["audit"]["seq"] = "7"
    else:
        m["audit"]["head"] = 7
    (d / "manifest.json").write_text(text if text is not None else json.dumps(m))
    match = "unreadable" if case == "not-json" else "not a valid checkpoint manifest"
    with pytest.raises(CheckpointError, match=f"{match}.*restore the checkpoint from a backup"):
        read_manifest(d)


def test_a_manifest_in_a_misnamed_directory_is_refused(tmp_path: Path) -> None:
    d = _write(tmp_path, 4)
    other = d.rename(d.with_name("round-4"))
    with pytest.raises(CheckpointError, match="not a valid checkpoint manifest"):
        read_manifest(other)
    assert read_manifest(_write(tmp_path, 5))["round"] == 5
    (tmp_path / "checkpoints" / "round-0005" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="unreadable"):
        read_manifest(tmp_path / "checkpoints" / "round-0005")


def test_tampered_missing_or_inconsistent_files_are_refused(tmp_path: Path) -> None:
    d = _write(tmp_path, 2, ledger="{}")
    expected = _manifest(d)["files"]["privacy_ledger.json"]
    (d / "privacy_ledger.json").write_text("{} ")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    found = hashlib.sha256(b"{} ").hexdigest()
    assert f"SHA-256 {found[:16]}…, but the manifest lists {expected[:16]}…" in str(err.value)
    assert "the checkpoint was modified; refusing to resume" in str(err.value)
    (d / "privacy_ledger.json").unlink()
    with pytest.raises(CheckpointError, match=r"privacy_ledger\.json: missing or unreadable"):
        load_checkpoint(d)
    d = _write(tmp_path, 3)
    state = (d / "server_state.json").read_text().replace('"round": 3', '"round": 4')
    (d / "server_state.json").write_text(state)
    m = _manifest(d)
    m["files"]["server_state.json"] = hashlib.sha256(state.encode()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="server_state round differs from the manifest's"):
        load_checkpoint(d)


# ------------------------------------------------------------------------ resume
@functools.cache
def _base_cfg() -> AppConfig:
    return compose_config("config", ["runtime=inprocess", "privacy=central"])


def _cfg(run_dir: Path, *, num_rounds: int | None = None, z: float | None = None) -> AppConfig:
    cfg = dataclasses.replace(_base_cfg(), resume=str(run_dir))
    if num_rounds is not None:
        cfg = dataclasses.replace(cfg, num_rounds=num_rounds)
    if z is not None:
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, noise_multiplier=z))
    return cfg


def _run_dir(tmp_path: Path, *, status: str = "running", **extra: Any) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    cfg = _cfg(run_dir)
    manifest = {"config_hash": run_config_hash(cfg), "run_key": "rk", "status": status, **extra}
    (run_dir / "run.json").write_text(json.dumps(manifest))
    return run_dir


def test_run_config_hash_ignores_how_to_run_not_what(tmp_path: Path) -> None:
    cfg = _base_cfg()
    plain = dataclasses.replace(cfg, resume=None, rollback_to=None, audit_signing_key=None)
    assert run_config_hash(cfg) == config_hash(plain)
    how = dataclasses.replace(plain, resume="/r", rollback_to=2, audit_signing_key="/k.pem")
    assert run_config_hash(how) == config_hash(plain)
    assert run_config_hash(dataclasses.replace(plain, seed=plain.seed + 1)) != config_hash(plain)


def test_check_resume_refuses_what_is_not_the_same_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a run directory") as err:
        check_resume(_cfg(tmp_path / "nowhere"))
    assert err.value.field == "resume"
    run_dir = _run_dir(tmp_path)
    assert check_resume(_cfg(run_dir)) == run_dir
    assert check_resume(dataclasses.replace(_cfg(run_dir), rollback_to=1)) == run_dir
    # Another config, no config.yaml: the hash is quoted.
    other = _cfg(run_dir, num_rounds=7)
    with pytest.raises(ConfigError) as err:
        check_resume(other)
    assert err.value.field == "resume"
    recorded = json.loads((run_dir / "run.json").read_text())["config_hash"]
    assert f"{run_config_hash(other)[:16]}… != run's {recorded[:16]}…" in str(err.value)
    # With the run's config.yaml: the first differing field, both values.
    import yaml

    theirs = config_to_dict(dataclasses.replace(_cfg(run_dir), resume=None))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(theirs))
    with pytest.raises(ConfigError) as err:
        check_resume(other)
    assert err.value.field == "num_rounds"
    assert f"num_rounds: run has {theirs['num_rounds']!r}, now 7" in str(err.value)
    assert "pass the same overrides, or start a new run" in str(err.value)
    # A field only one side has is named with "<absent>".
    del theirs["seed"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(theirs))
    with pytest.raises(ConfigError) as err:
        check_resume(_cfg(run_dir, num_rounds=7))
    assert err.value.field == "num_rounds"  # sorted: num_rounds before seed
    nested = config_to_dict(dataclasses.replace(_cfg(run_dir), resume=None))
    nested["privacy"]["noise_multiplier"] = 123.0
    (run_dir / "config.yaml").write_text(yaml.safe_dump(nested))
    with pytest.raises(ConfigError) as err:
        check_resume(_cfg(run_dir, num_rounds=7))
    assert err.value.field == "num_rounds"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(nested))
    ours = _cfg(run_dir, z=2.5)
    with pytest.raises(ConfigError) as err:
        check_resume(ours)
    assert err.value.field == "privacy.noise_multiplier"
    assert "run has 123.0, now 2.5" in str(err.value)
    del nested["privacy"]["noise_multiplier"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(nested))
    with pytest.raises(ConfigError) as err:
        check_resume(ours)
    assert "privacy.noise_multiplier: run has '<absent>', now 2.5" in str(err.value)
    (run_dir / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"its run\.json is unreadable") as err:
        check_resume(ours)
    assert err.value.field == "resume"


def _ledger(rounds: int, local: tuple[tuple[str, int], ...] = ()) -> FederationLedger:
    events = tuple(
        RoundEvent(r, "poisson", 10, 0.3, 3.0, 1.0, 1.0, 1.0) for r in range(1, rounds + 1)
    )
    z = 2.0 if local else None
    return FederationLedger(1e-5, AccountantName.rdp, events, local_noise_multiplier=z, local=local)


def test_plan_resume_from_the_newest_or_a_rolled_back_checkpoint(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    cfg = _cfg(run_dir)
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        plan_resume(cfg)
    for rnd in (1, 2, 3):
        _write(run_dir, rnd)
    plan = plan_resume(cfg)
    assert plan.round == 3 and plan.abandoned == [] and not plan.rollback
    assert plan.ledger_json is None and plan.run_manifest["run_key"] == "rk"
    assert plan.audit_anchor == (31, hashlib.sha256(b"31").hexdigest())  # round 3's anchor
    assert (
        plan.run_dir == run_dir and plan.checkpoint.path == run_dir / "checkpoints" / "round-0003"
    )
    assert not plan.released_unfinished and not plan.fresh_noise
    # Round 4's files exist without a manifest: its model may have left the server.
    (run_dir / "checkpoints" / "round-0004").mkdir()
    assert plan_resume(cfg).released_unfinished and plan_resume(cfg).fresh_noise
    back = plan_resume(dataclasses.replace(cfg, rollback_to=2))
    assert back.round == 2 and back.abandoned == [3] and back.rollback and back.fresh_noise
    assert not back.released_unfinished  # round 3 is complete
    # The audit log must still contain the newest checkpoint's anchor, not round 2's.
    assert back.audit_anchor == (31, hashlib.sha256(b"31").hexdigest())
    assert back.checkpoint.audit_anchor == (21, hashlib.sha256(b"21").hexdigest())
    with pytest.raises(CheckpointError, match=r"rollback_to=9: .* \(available: \[1, 2, 3\]\)"):
        plan_resume(dataclasses.replace(cfg, rollback_to=9))


def test_plan_resume_refuses_a_completed_run_unless_rolling_back(tmp_path: Path) -> None:
    for status in ("completed", "degraded"):
        run_dir = _run_dir(tmp_path / status, status=status)
        _write(run_dir, 1)
        cfg = _cfg(run_dir)
        with pytest.raises(CheckpointError, match="already completed; nothing to resume"):
            plan_resume(cfg)
        assert plan_resume(dataclasses.replace(cfg, rollback_to=1)).round == 1
    run_dir = _run_dir(tmp_path / "failed", status="failed")
    _write(run_dir, 1)
    assert plan_resume(_cfg(run_dir)).round == 1


def test_plan_resume_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    d = _write(run_dir, 1, key="other")
    with pytest.raises(CheckpointError, match=r"its run key differs from run\.json's"):
        plan_resume(_cfg(run_dir))
    m = _manifest(d)
    m["config_hash"] = "d" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="written under another config hash"):
        plan_resume(_cfg(run_dir))


def test_plan_resume_takes_the_latest_ledger_and_refuses_a_rewound_one(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    saved = _ledger(2, local=(("a", 2),))
    _write(run_dir, 2, ledger=saved.to_json())
    cfg = _cfg(run_dir)
    with pytest.raises(CheckpointError, match=r"privacy_ledger\.json is missing"):
        plan_resume(cfg)
    latest = _ledger(3, local=(("a", 2), ("b", 1)))  # one interrupted round more
    (run_dir / "privacy_ledger.json").write_text(latest.to_json())
    assert plan_resume(cfg).ledger_json == latest.to_json()
    (run_dir / "privacy_ledger.json").write_text(saved.to_json())  # equal: fine
    assert plan_resume(cfg).ledger_json == saved.to_json()
    for rewound in (
        _ledger(1, local=(("a", 2),)),  # fewer rounds
        _ledger(3, local=(("a", 1),)),  # fewer local releases of a
        _ledger(3, local=(("b", 5),)),  # a's releases gone
        dataclasses.replace(_ledger(3, local=(("a", 2),)), delta=1e-6),
        dataclasses.replace(_ledger(3, local=(("a", 2),)), accountant=AccountantName.prv),
    ):
        (run_dir / "privacy_ledger.json").write_text(rewound.to_json())
        with pytest.raises(CheckpointError, match="does not extend the checkpoint's ledger"):
            plan_resume(cfg)
    (run_dir / "privacy_ledger.json").write_text("{")
    with pytest.raises(CheckpointError, match="privacy ledger unreadable"):
        plan_resume(cfg)


def _audit_lines(run_dir: Path, *records: Any, torn: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "audit.jsonl").write_text(text + ('{"event": "ledger.sp' if torn else ""))


def test_plan_resume_refuses_a_ledger_behind_the_audit_log(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    _write(run_dir, 1, ledger=_ledger(1).to_json())
    (run_dir / "privacy_ledger.json").write_text(_ledger(2, local=(("a", 1),)).to_json())
    cfg = _cfg(run_dir)
    spend = {"event": "ledger.spend", "data": {"round": 3, "events": 2, "local_releases": 1}}
    _audit_lines(run_dir, {"event": "run.start"}, spend, torn=True)
    assert plan_resume(cfg).round == 1  # exactly what the log recorded: fine
    more = {"event": "ledger.spend", "data": {"round": 3, "events": 3, "local_releases": 1}}
    _audit_lines(run_dir, spend, more, {"event": "stage.outcome", "data": {}})
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg)
    assert "holds 2 rounds and 1 local releases, but the audit log recorded 3 rounds and 1" in (
        str(err.value)
    )
    assert "spent before round 3's instructions went out" in str(err.value)
    releases = {"event": "ledger.spend", "data": {"round": 2, "events": 2, "local_releases": 2}}
    _audit_lines(run_dir, releases)
    with pytest.raises(CheckpointError, match="recorded 2 rounds and 2 releases"):
        plan_resume(cfg)
    # Records without counts, or with data that is not an object, ask for nothing.
    _audit_lines(run_dir, {"event": "ledger.spend", "data": {"round": 1}}, [1, 2])
    assert plan_resume(cfg).round == 1
    _audit_lines(run_dir, {"event": "ledger.spend", "data": "x"})
    assert plan_resume(cfg).round == 1


def test_resume_plan_properties() -> None:
    plan = ResumePlan(Path("/r"), None, {}, None, (0, ""), [], False)  # type: ignore[arg-type]
    assert not plan.rollback and not plan.fresh_noise
    assert ResumePlan(Path("/r"), None, {}, None, (0, ""), [4]).fresh_noise  # type: ignore[arg-type]
    assert ResumePlan(Path("/r"), None, {}, None, (0, ""), [], True).fresh_noise  # type: ignore[arg-type]


# ------------------------------------------------- edges found by mutation testing
def test_strategy_state_names_may_hold_slashes_and_shape_errors_name_the_attribute() -> None:
    target = _Strategy()
    template = {"conv/w": np.zeros(2), "conv/b": np.zeros(1)}
    restore_strategy_state(target, {"m_t/conv/b": np.ones(1), "m_t/conv/w": np.ones(2)}, template)
    assert target.m_t is not None and list(target.m_t) == ["conv/w", "conv/b"]
    with pytest.raises(CheckpointError) as err:
        restore_strategy_state(
            _Strategy(), {"m_t/w": np.zeros((3, 2)), "m_t/b": np.zeros(1)}, MODEL
        )
    assert str(err.value) == "strategy state 'm_t': 'w' has shape (3, 2), the model (2, 3)"


def test_rolled_back_checkpoints_are_skipped_and_interrupted_ones_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    set_aside_abandoned(tmp_path, [2], 1)  # a complete checkpoint under another name
    interrupted = tmp_path / "checkpoints" / "round-0003"
    interrupted.mkdir()
    with caplog.at_level("WARNING", logger="fl_app.server.checkpoint"):
        assert list_checkpoints(tmp_path) == [(1, tmp_path / "checkpoints" / "round-0001")]
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {interrupted} has no manifest (interrupted write): ignored"
    ]
    _write(tmp_path, 4)
    assert prune_checkpoints(tmp_path, 1) == [1]
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4]


def test_refusal_messages_carry_their_fix(tmp_path: Path) -> None:
    d = _write(tmp_path, 2)
    (d / "manifest.json").write_text("[]")
    with pytest.raises(CheckpointError) as err:
        read_manifest(d)
    assert str(err.value) == (
        f"{d / 'manifest.json'}: not a valid checkpoint manifest; restore the checkpoint "
        "from a backup, or roll back to an earlier one"
    )
    d = _write(tmp_path, 3)
    (d / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    assert str(err.value).endswith(
        "the checkpoint was modified; refusing to resume from it (restore it, or roll back "
        "to an earlier checkpoint)"
    )
    assert load_checkpoint(_write(tmp_path, 4)).path == tmp_path / "checkpoints" / "round-0004"


def test_config_differences_at_the_root_and_after_resume_are_named(tmp_path: Path) -> None:
    import yaml

    run_dir = _run_dir(tmp_path)
    missing = _cfg(tmp_path / "none")
    with pytest.raises(ConfigError) as err:
        check_resume(missing)
    assert err.value.found == str(tmp_path / "none")
    assert err.value.fix == (
        "is not a run directory (no run.json); give the directory of the run to continue"
    )
    theirs = config_to_dict(dataclasses.replace(_cfg(run_dir), resume=None))
    ours = dataclasses.replace(_cfg(run_dir), seed=_base_cfg().seed + 1, rollback_to=1)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(theirs))
    with pytest.raises(ConfigError) as err:
        check_resume(ours)  # resume and rollback_to sort before seed; neither is named
    assert err.value.field == "seed"
    theirs["privacy"] = 3  # a section the run had as a scalar
    (run_dir / "config.yaml").write_text(yaml.safe_dump(theirs))
    with pytest.raises(ConfigError) as err:
        check_resume(ours)
    assert err.value.field == "privacy"
    (run_dir / "config.yaml").write_text("3\n")
    with pytest.raises(ConfigError) as err:
        check_resume(ours)
    assert err.value.field == "<config>"
    assert "<config>: run has '<absent>', now '<absent>'" in str(err.value)
    (run_dir / "run.json").write_text("[]")
    with pytest.raises(ConfigError) as err:
        check_resume(ours)
    assert err.value.found == str(run_dir)


def test_audit_log_reading_survives_a_torn_utf8_tail_and_reads_past_bad_lines(
    tmp_path: Path,
) -> None:
    run_dir = _run_dir(tmp_path)
    _write(run_dir, 1, ledger=_ledger(1).to_json())
    (run_dir / "privacy_ledger.json").write_text(_ledger(2).to_json())
    cfg = _cfg(run_dir)
    spend = {"event": "ledger.spend", "data": {"round": 3, "events": 2, "local_releases": 0}}
    torn = (json.dumps(spend) + "\n").encode() + b'{"event": "ledger.spend", "note": "\xc3'
    (run_dir / "audit.jsonl").write_bytes(torn)  # a kill in the middle of a 2-byte character
    assert plan_resume(cfg).round == 1
    more = {"event": "ledger.spend", "data": {"round": 4, "events": 3, "local_releases": 0}}
    (run_dir / "audit.jsonl").write_text(
        json.dumps(spend) + "\n{not json\n" + json.dumps(more) + "\n"
    )
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg)
    disk = run_dir / "privacy_ledger.json"
    assert str(err.value) == (
        f"{disk} holds 2 rounds and 0 local releases, but the audit log recorded 3 rounds "
        "and 0 releases spent before round 4's instructions went out: the ledger lost "
        "spend; refusing to under-count epsilon (restore the ledger file the run wrote)"
    )


def test_a_spend_record_without_counts_asks_for_nothing(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    _write(run_dir, 1, ledger=_ledger(0).to_json())
    (run_dir / "privacy_ledger.json").write_text(_ledger(0).to_json())
    _audit_lines(run_dir, {"event": "ledger.spend", "data": {"round": 1}})
    assert plan_resume(_cfg(run_dir)).round == 1


def test_plan_resume_messages_and_a_vanished_local_count(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    cfg = _cfg(run_dir)
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg)
    assert str(err.value) == (
        f"run {run_dir} has no complete checkpoint (no checkpoints/round-*/manifest.json); "
        "start a new run"
    )
    saved = _ledger(1, local=(("a", 1),))
    _write(run_dir, 1, ledger=saved.to_json())
    disk = run_dir / "privacy_ledger.json"
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg)
    assert str(err.value) == (
        f"{disk} is missing: the privacy already spent is unknown; refusing to resume "
        "(restore the ledger file)"
    )
    disk.write_text(_ledger(1, local=(("b", 1),)).to_json())  # a's one release is gone
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg)
    assert str(err.value) == (
        f"{disk} does not extend the checkpoint's ledger (it was rewound or replaced); "
        "refusing to under-count epsilon"
    )
    done = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**done, "status": "completed"}))
    with pytest.raises(CheckpointError) as err:
        plan_resume(cfg)
    assert str(err.value) == (
        f"run {run_dir} already completed; nothing to resume (rollback_to=<round> redoes "
        "rounds after a checkpoint)"
    )


def test_weights_name_their_config_and_round_and_complete_checkpoints_stay(
    tmp_path: Path,
) -> None:
    from fl_app.weights import load_safetensors

    d = _write(tmp_path, 3)
    for name in ("model.safetensors", "strategy_state.safetensors"):
        assert load_safetensors(d / name)[1] == {"config_hash": "c" * 64, "round": "3"}
    with pytest.raises(CheckpointError) as err:
        write_checkpoint_files(
            tmp_path,
            rnd=3,
            arrays=MODEL,
            strategy_arrays={},
            ledger_json=None,
            server_state={},
            config_hash="h",
        )
    assert str(err.value) == (
        f"{d} already holds a complete checkpoint; checkpoints are never overwritten (a "
        "rollback renames the abandoned ones first)"
    )


def test_a_config_mismatch_says_to_pass_the_same_overrides(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_resume(_cfg(run_dir, num_rounds=99))
    assert err.value.fix == (
        "a resumed run must use the config it started with (resume and rollback_to aside); "
        "pass the same overrides, or start a new run"
    )
