"""Server checkpoints, resume after SIGKILL, rollback (fl_app.server.checkpoint).

Guarantees checked:

* a run killed with SIGKILL in the middle of a round and resumed ends with the same
  final weights as an uninterrupted run under the same seed (FedAdam state restored,
  noise keyed by the server round) and an ε that is never smaller (the interrupted
  round stays in the ledger);
* a rollback keeps every release in the ledger (ε only grows) and restores the model;
  rounds redone after a rollback, or after a stop once the round's model may have left
  the server (checkpoint files without a manifest), draw fresh noise;
* a checkpoint whose files do not match its manifest is refused; one without a
  manifest is ignored; a config that differs from the run's is refused naming the
  field; a ledger rewound behind the checkpoint is refused;
* the audit log verifies against every checkpoint manifest's (seq, head) after a
  resume, including after a torn last line was repaired.

The kill happens at a known point without any production hook: the child process
patches ``RoundDriver._exchange`` (test code only) to write a marker file and sleep
when round 3's instructions are about to be sent, i.e. after the round was recorded
in the ledger and before any reply.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fl_app.audit import verify
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.privacy.ledger import FederationLedger
from fl_app.runtime.simulation import run_simulation_experiment
from fl_app.server.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
)
from fl_app.server.resume import check_resume, plan_resume
from fl_app.weights import load_safetensors, weights_digest

OVERRIDES = [
    "runtime=inprocess",
    "privacy=central",
    # Seeded noise (opt-in, not for release): the resumed run is compared bit for bit
    # with an uninterrupted one, which CSPRNG noise (the default) would never match.
    "privacy.secure_mode=false",
    "strategy=fedadam",
    "num_rounds=4",
    "dataset.num_partitions=4",
    "federated_eval_every=0",
]
KILL_ROUND = 3

_CHILD = r"""
import sys, time
from pathlib import Path
from strategies import driver

run_dir, marker, kill_round, *overrides = sys.argv[1:]
original = driver.RoundDriver._exchange

def exchange(self, grid, messages, rnd, timeout):
    if rnd == int(kill_round):
        Path(marker).write_text("sending round")
        time.sleep(600)
    return original(self, grid, messages, rnd, timeout)

driver.RoundDriver._exchange = exchange
from fl_app.config.compose import compose_config
from fl_app.runtime.simulation import run_simulation_experiment
run_simulation_experiment(compose_config("config", overrides), run_dir)
"""


def _cfg(*extra: str):
    return compose_config("config", [*OVERRIDES, *extra])


def _ledger(run_dir: Path) -> FederationLedger:
    return FederationLedger.from_json((run_dir / "privacy_ledger.json").read_text())


def _audit_ok_against_every_checkpoint(run_dir: Path) -> None:
    log = run_dir / "audit.jsonl"
    assert verify(log).ok
    for _, path in list_checkpoints(run_dir):
        anchor = json.loads((path / "manifest.json").read_text())["audit"]
        result = verify(log, expected_head=anchor["head"], expected_seq=anchor["seq"])
        assert result.ok, (path, result.reason)


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]


def _interrupted_copy(reference: Path, dest: Path) -> Path:
    """The reference run as if killed: status running, no summary."""
    shutil.copytree(reference, dest)
    manifest = json.loads((dest / "run.json").read_text())
    manifest["status"] = "running"
    (dest / "run.json").write_text(json.dumps(manifest))
    (dest / "summary.json").unlink()
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted run of the same config and seed."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, run_simulation_experiment(_cfg(), run_dir)


def test_every_round_writes_a_verified_checkpoint(reference: tuple[Path, dict[str, Any]]) -> None:
    run_dir, summary = reference
    assert [r for r, _ in list_checkpoints(run_dir)] == [1, 2, 3, 4]
    last = load_checkpoint(run_dir / "checkpoints" / "round-0004")
    assert weights_digest(last.arrays) == summary["weights_sha256"]
    # FedAdam's moments travel with the checkpoint.
    assert {k.split("/")[0] for k in last.strategy_arrays} == {"m_t", "v_t", "current_arrays"}
    state = last.server_state
    assert state["config_hash"] == summary["config_hash"] and state["round"] == 4
    assert state["aggregator"]["kind"] == "central"
    saved = [e for e in _events(run_dir) if e["event"] == "checkpoint.saved"]
    assert [e["data"]["round"] for e in saved] == [1, 2, 3, 4]
    assert saved[-1]["data"]["files"] == last.manifest["files"]
    _audit_ok_against_every_checkpoint(run_dir)


def test_sigkill_mid_round_then_resume_matches_uninterrupted_run(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    ref = reference[1]
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(run_dir), str(marker), str(KILL_ROUND), *OVERRIDES],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited early: {child.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "child never reached the kill round"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stderr.close()

    # Killed mid-round 3: round 3 is in the ledger on disk, its checkpoint is not.
    assert [r for r, _ in list_checkpoints(run_dir)] == [1, 2]
    assert [e.round for e in _ledger(run_dir).events] == [1, 2, 3]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    summary = run_simulation_experiment(_cfg(f"resume={run_dir}"), tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    assert summary["status"] == "completed" and summary["rounds"] == 4
    assert summary["weights_sha256"] == ref["weights_sha256"]
    # The interrupted round stays spent: 5 releases against the reference's 4.
    assert summary["privacy"]["epsilon"] >= ref["privacy"]["epsilon"]
    assert summary["privacy"]["epsilon"] > ref["privacy"]["epsilon"]
    assert [e.round for e in _ledger(run_dir).events] == [1, 2, 3, 4, 5]
    assert summary["initial_accuracy"] == ref["initial_accuracy"]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["resumed"]) == 1
    assert (
        manifest["run_key"]
        == load_checkpoint(run_dir / "checkpoints" / "round-0004").server_state["run_key"]
    )
    resume = [e for e in _events(run_dir) if e["event"] == "run.resume"]
    assert len(resume) == 1 and resume[0]["data"]["from_round"] == 2
    _audit_ok_against_every_checkpoint(run_dir)
    _, meta = load_safetensors(run_dir / "model.safetensors")
    assert meta["rounds"] == "4"


def test_rollback_keeps_the_ledger_and_restores_the_model(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    ref_dir, ref = reference
    run_dir = shutil.copytree(ref_dir, tmp_path / "run")
    # Rolling back to the last round redoes nothing: the final model is round 4's.
    same = run_simulation_experiment(_cfg(f"resume={run_dir}", "rollback_to=4"), run_dir)
    assert same["weights_sha256"] == ref["weights_sha256"]
    assert same["privacy"]["epsilon"] == pytest.approx(ref["privacy"]["epsilon"])

    summary = run_simulation_experiment(_cfg(f"resume={run_dir}", "rollback_to=2"), run_dir)
    assert summary["status"] == "completed" and summary["rounds"] == 4
    ledger = _ledger(run_dir)
    # Rounds 3 and 4 were released twice: 6 releases, ε never rewound.
    assert [e.round for e in ledger.events] == [1, 2, 3, 4, 5, 6]
    assert summary["privacy"]["epsilon"] > ref["privacy"]["epsilon"]
    # Redone rounds draw fresh noise (a new generation): a different model.
    assert summary["weights_sha256"] != ref["weights_sha256"]
    ck = load_checkpoint(run_dir / "checkpoints" / "round-0003")
    assert ck.server_state["aggregator"]["noise_generation"] == 1
    assert ck.server_state["aggregator"]["release_offset"] == 2
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [
        "round-0001",
        "round-0002",
        "round-0003",
        "round-0003.rolledback-1",
        "round-0004",
        "round-0004.rolledback-1",
    ]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    abandoned = (run_dir / "metrics.abandoned.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in abandoned] == [3, 4]
    _audit_ok_against_every_checkpoint(run_dir)


def test_incomplete_checkpoint_is_ignored_and_torn_audit_tail_repaired(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    ref_dir, ref = reference
    run_dir = _interrupted_copy(ref_dir, tmp_path / "run")
    (run_dir / "checkpoints" / "round-0004" / "manifest.json").unlink()
    with (run_dir / "audit.jsonl").open("ab") as fh:
        fh.write(b'{"data":{"round":5},"event":"round.st')
    assert [r for r, _ in list_checkpoints(run_dir)] == [1, 2, 3]
    assert plan_resume(_cfg(f"resume={run_dir}")).round == 3

    summary = run_simulation_experiment(_cfg(f"resume={run_dir}"), run_dir)
    # Round 4's files were written, so its model may have left the server: the redo
    # draws fresh noise (a new generation) rather than repeating it on another sum.
    assert summary["weights_sha256"] != ref["weights_sha256"]
    ck = load_checkpoint(run_dir / "checkpoints" / "round-0004")
    assert ck.server_state["aggregator"]["noise_generation"] == 1
    assert summary["privacy"]["epsilon"] > ref["privacy"]["epsilon"]
    events = [e["event"] for e in _events(run_dir)]
    assert "audit.repair" in events and events.index("audit.repair") < events.index("run.resume")
    _audit_ok_against_every_checkpoint(run_dir)


def test_tampered_checkpoint_is_refused(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    run_dir = _interrupted_copy(reference[0], tmp_path / "run")
    model = run_dir / "checkpoints" / "round-0004" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="was modified"):
        plan_resume(_cfg(f"resume={run_dir}"))
    # An earlier, intact checkpoint can still be rolled back to.
    assert plan_resume(_cfg(f"resume={run_dir}", "rollback_to=3")).round == 3


def test_rewound_ledger_is_refused(tmp_path: Path, reference: tuple[Path, dict[str, Any]]) -> None:
    run_dir = _interrupted_copy(reference[0], tmp_path / "run")
    older = run_dir / "checkpoints" / "round-0002" / "privacy_ledger.json"
    shutil.copy(older, run_dir / "privacy_ledger.json")
    with pytest.raises(CheckpointError, match="under-count"):
        plan_resume(_cfg(f"resume={run_dir}"))


def test_deleting_the_interrupted_rounds_ledger_event_is_detected_on_resume(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    """Killed mid-round 4: round 4 is in the ledger and the audit log (ledger.spend,
    written before its instructions went out), in no checkpoint. Deleting its event
    makes the ledger match checkpoint 3 exactly; only the audit log can tell."""
    run_dir = _interrupted_copy(reference[0], tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "round-0004")
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    intact = json.dumps(ledger)
    assert [e["round"] for e in ledger["events"]] == [1, 2, 3, 4]
    ledger["events"] = ledger["events"][:3]
    (run_dir / "privacy_ledger.json").write_text(json.dumps(ledger))
    with pytest.raises(CheckpointError, match="audit log recorded 4 rounds") as err:
        plan_resume(_cfg(f"resume={run_dir}"))
    assert "under-count" in str(err.value)
    # With the ledger the run wrote, the same resume is accepted.
    (run_dir / "privacy_ledger.json").write_text(intact)
    assert plan_resume(_cfg(f"resume={run_dir}")).round == 3


def test_resume_projection_is_the_epsilon_the_run_ends_at(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed mid-round 4 (its release in the ledger, no checkpoint): the resumed run
    redoes round 4 with fresh noise, so it ends with 5 releases, above the plan's 4."""
    run_dir = _interrupted_copy(reference[0], tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "round-0004")
    capsys.readouterr()
    summary = run_simulation_experiment(_cfg(f"resume={run_dir}"), run_dir)
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("resume projection:")]
    assert "the ledger holds 4 releases" in line and "after the 1 rounds left" in line
    projected = float(line.rsplit("epsilon ", 1)[1])
    assert projected == pytest.approx(summary["privacy"]["epsilon"], abs=1e-4)
    assert summary["privacy"]["epsilon"] > reference[1]["privacy"]["epsilon"]


def test_config_mismatch_and_bad_resume_settings_are_refused(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    run_dir = reference[0]
    with pytest.raises(ConfigError) as err:
        check_resume(_cfg(f"resume={run_dir}", "privacy.noise_multiplier=2.0"))
    assert err.value.field == "privacy.noise_multiplier"
    with pytest.raises(ConfigError, match="not a run directory"):
        check_resume(_cfg(f"resume={tmp_path}"))
    with pytest.raises(ConfigError, match="rollback_to"):
        _cfg("rollback_to=2")
    with pytest.raises(ConfigError, match="rollback_to"):
        _cfg(f"resume={run_dir}", "rollback_to=9")
    with pytest.raises(CheckpointError, match="already completed"):
        plan_resume(_cfg(f"resume={run_dir}"))


def test_prune_keeps_the_newest(tmp_path: Path, reference: tuple[Path, dict[str, Any]]) -> None:
    run_dir = shutil.copytree(reference[0], tmp_path / "run")
    assert prune_checkpoints(run_dir, 0) == []
    assert prune_checkpoints(run_dir, 2) == [1, 2]
    assert [r for r, _ in list_checkpoints(run_dir)] == [3, 4]
    with pytest.raises(CheckpointError, match=r"available: \[3, 4\]"):
        plan_resume(_cfg(f"resume={run_dir}", "rollback_to=1"))
