"""The server's audit trail of a real run: complete, verifiable, anchored by the summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fl_app.audit import verify
from fl_app.cli import main as cli_main
from fl_app.config.compose import compose_config
from fl_app.runtime.simulation import run_simulation_experiment


def test_a_run_leaves_a_verifiable_audit_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = compose_config(
        "config",
        ["runtime=inprocess", "privacy=central", "num_rounds=2", "dataset.num_partitions=4"],
    )
    summary = run_simulation_experiment(cfg, tmp_path)
    log = tmp_path / "audit.jsonl"
    anchor = summary["audit"]
    result = verify(log, expected_head=anchor["head"], expected_seq=anchor["seq"])
    assert result.ok, result.reason
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "run.start" and events[-1] == "run.end"
    assert records[0]["data"]["config_hash"] == summary["config_hash"]
    # ledger.spend: the round's spend, recorded before its instructions go out.
    per_round = ["ledger.spend", "round.start", "stage.outcome", "stage.outcome"]
    per_round += ["aggregation.done", "privacy.epsilon", "checkpoint.saved"]
    assert events[1:-1] == per_round * 2
    spends = [r["data"] for r in records if r["event"] == "ledger.spend"]
    assert [(d["round"], d["events"]) for d in spends] == [(1, 1), (2, 2)]
    eps = [r["data"]["epsilon"] for r in records if r["event"] == "privacy.epsilon"]
    assert eps[-1] == pytest.approx(summary["privacy"]["epsilon"])
    files = records[-1]["data"]["files"]
    for name in ("model.safetensors", "privacy_ledger.json"):
        assert files[name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    # Counts and reasons only: nothing keyed by a client.
    assert "node" not in log.read_text()

    # The CLI agrees, and catches an edit.
    with pytest.raises(SystemExit) as ok:
        cli_main(
            ["audit", "verify", str(log), "--head", anchor["head"], "--seq", str(anchor["seq"])]
        )
    assert ok.value.code == 0
    text = log.read_text().replace('"stage":"train"', '"stage":"trian"', 1)
    log.write_text(text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        cli_main(["audit", "verify", str(log)])
    assert bad.value.code == 1 and "line" in capsys.readouterr().out.lower()
