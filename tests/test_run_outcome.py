"""A run's status says what happened (issue 17): a run in which no round updated the
model fails (non-zero exit, reason named, export refused); a run that lost rounds is
``degraded``; a sweep job refused for budget is reported with its reason and fails the
multirun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl_app.audit import verify
from fl_app.cli import main as cli_main
from fl_app.cli.report import report_main
from fl_app.release import ExportRefused, export_run
from fl_app.release.report import collect_jobs
from fl_app.server.rundir import run_outcome


def _round(rnd: int, updated: bool, sampled: int = 2, **extra: Any) -> dict[str, Any]:
    return {"round": rnd, "model_updated": updated, "clients_sampled": sampled, **extra}


def test_outcome_of_rounds_that_all_updated_is_completed() -> None:
    out = run_outcome([_round(1, True), _round(2, True)], None)
    assert out == {
        "status": "completed",
        "status_reason": None,
        "rounds_run": 2,
        "rounds_model_updated": 2,
        "rounds_lost": 0,
    }


def test_outcome_with_lost_rounds_is_degraded_with_counts() -> None:
    records = [_round(1, True), _round(2, False, note="only 0 valid"), _round(3, True)]
    out = run_outcome(records, None)
    assert (out["status"], out["rounds_model_updated"], out["rounds_lost"]) == ("degraded", 2, 1)
    assert "1 of 3 rounds left the model unchanged (rounds 2)" in out["status_reason"]


def test_empty_poisson_cohort_or_budget_stop_is_not_a_lost_round() -> None:
    out = run_outcome([_round(1, True), _round(2, False, sampled=0)], None)
    assert out["status"] == "completed" and out["rounds_lost"] == 0
    out = run_outcome([_round(1, True), _round(2, False, clients_budget_exhausted=2)], None)
    assert out["status"] == "completed" and out["rounds_lost"] == 0
    # One client out of budget, the other failing: the round is lost.
    out = run_outcome([_round(1, True), _round(2, False, clients_budget_exhausted=1)], None)
    assert out["status"] == "degraded" and out["rounds_lost"] == 1


def test_no_round_updated_is_failed_naming_the_clients_reasons() -> None:
    refusal = "privacy budget exhausted: epsilon 4.42 would exceed max_epsilon 3"
    records = [
        _round(r, False, failures=[{"node": n, "reason": refusal} for n in (1, 2)]) for r in (1, 2)
    ]
    out = run_outcome(records, "before round 3: only 0 clients have privacy budget left")
    assert out["status"] == "failed" and out["rounds_model_updated"] == 0
    reason = out["status_reason"]
    assert reason.startswith("no round updated the model (2 rounds run)")
    assert "only 0 clients have privacy budget left" in reason
    # Four identical refusals grouped into one entry with their count.
    assert f"{refusal!r} x4" in reason
    # No round at all (stopped before round 1) also fails.
    assert run_outcome([], "before round 1: budget")["status"] == "failed"


def _simulate(monkeypatch: pytest.MonkeyPatch, cwd: Path, *args: str) -> int:
    monkeypatch.chdir(cwd)
    try:
        cli_main(["simulate", *args])
    except SystemExit as done:
        return int(done.code or 0)
    return 0


_FAST = ("runtime=inprocess", "dataset.num_partitions=2", "federated_eval_every=0")


def test_run_no_client_trained_exits_non_zero_and_cannot_be_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    # The server rejects every reply (each update's norm is far above the bound).
    rc = _simulate(
        monkeypatch,
        tmp_path,
        *_FAST,
        "num_rounds=2",
        "runtime.validation.max_update_norm=1e-6",
        f"hydra.run.dir={run}",
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "run FAILED" in err and "exceeds max_update_norm=1e-06" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_model_updated"] == 0
    assert "max_update_norm" in summary["status_reason"]
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    # The audit log's run.end says the same.
    assert verify(run / "audit.jsonl").ok
    last = json.loads((run / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["event"], last["data"]["status"]) == ("run.end", "failed")
    with pytest.raises(ExportRefused, match="status is 'failed'") as refused:
        export_run(run, "public", tmp_path / "out")
    assert "max_update_norm" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_model_no_round_updated_whatever_the_status_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    _simulate(
        monkeypatch,
        tmp_path,
        *_FAST,
        "num_rounds=1",
        "runtime.validation.max_update_norm=1e-6",
        f"hydra.run.dir={run}",
    )
    for name in ("summary.json", "run.json"):
        doc = json.loads((run / name).read_text())
        doc["status"] = "completed"
        (run / name).write_text(json.dumps(doc))
    with pytest.raises(ExportRefused, match="no round that updated the model"):
        export_run(run, "public", tmp_path / "out")


def test_sweep_job_refused_for_budget_is_reported_and_fails_the_multirun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    rc = _simulate(
        monkeypatch,
        tmp_path,
        "-m",
        *_FAST,
        "num_rounds=1",
        "privacy=central",
        "privacy.max_epsilon=5",
        "privacy.noise_multiplier=0.3,4",
        f"hydra.sweep.dir={sweep}",
    )
    assert rc != 0
    capsys.readouterr()
    jobs = {j.overrides["privacy.noise_multiplier"]: j for j in collect_jobs(sweep)}
    assert jobs["4"].status == "completed"
    refused = jobs["0.3"]
    assert refused.status == "refused"
    assert "round 1 alone exceeds privacy.max_epsilon=5" in (refused.status_reason or "")
    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 jobs did not succeed" in out
    (line,) = [x for x in out.splitlines() if ": refused: round 1 alone exceeds" in x]
    assert line.strip().startswith(f"{refused.path.name} (") and "noise_multiplier=0.3" in line
    assert "privacy.max_epsilon=5" in (sweep / "report.md").read_text()


def test_deployed_serverapp_fails_the_flower_run_when_no_round_updated(tmp_path: Path) -> None:
    """Under `flwr run` the ServerApp raises, so the SuperLink records finished:failed
    (what `fl-app deploy submit` reports and exits 1 on) instead of a success."""
    from flwr.app import Context, RecordDict

    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import main as deployed_main

    overrides = " ".join(
        [*_FAST, "num_rounds=1", "runtime.validation.max_update_norm=1e-6", "seed=3"]
    )
    context = Context(
        run_id=7,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={
            "hydra-config-name": "config",
            "hydra-overrides": overrides,
            "run-dir": str(tmp_path / "run"),
        },
    )
    grid = InProcessGrid(client_app, 2, seed=3)
    try:
        with pytest.raises(RuntimeError, match="fl-app run failed: no round updated"):
            deployed_main(grid, context)
    finally:
        grid.close()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_deploy_streams_progress_lines_and_states_a_verdict(tmp_path: Path) -> None:
    import io
    import sys
    import time

    from fl_app.deploy.flwr_cli import _follow_log, run_verdict

    script = (
        "print('INFO : starting'); "
        "print('INFO : [round 1/2] | clients 3/3 ok | record-level eps max 1.2 | 4.1s'); "
        "print('INFO : run FAILED: no round updated the model (2 rounds run)')"
    )
    sink, lines = io.BytesIO(), []
    _follow_log([sys.executable, "-c", script], {}, sink, time.monotonic() + 60, lines.append)
    assert lines == [
        "[round 1/2] | clients 3/3 ok | record-level eps max 1.2 | 4.1s",
        "run FAILED: no round updated the model (2 rounds run)",
    ]
    assert sink.getvalue().count(b"\n") == 3  # the whole log is kept
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "status_reason": "no round updated the model",
                "rounds_model_updated": 0,
                "rounds_planned": 2,
            }
        )
    )
    verdict = run_verdict("finished:failed", run)
    assert verdict.startswith("verdict: FAILED (finished:failed; 0 of 2 rounds updated")
    assert verdict.endswith(": no round updated the model")
    assert run_verdict("finished:completed", None) == "verdict: COMPLETED (finished:completed)"


def test_a_degraded_run_exports_and_its_card_states_the_lost_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    rc = _simulate(monkeypatch, tmp_path, *_FAST, "num_rounds=1", f"hydra.run.dir={run}")
    assert rc == 0
    # As a run that lost a round would have written it (run_outcome's fields).
    reason = "1 of 2 rounds left the model unchanged (rounds 1); see metrics.jsonl"
    for name in ("summary.json", "run.json"):
        doc = json.loads((run / name).read_text())
        doc["status"] = "degraded"
        if name == "summary.json":
            doc.update(rounds_lost=1, rounds_model_updated=1, status_reason=reason)
        (run / name).write_text(json.dumps(doc))
    card = export_run(run, "restricted", tmp_path / "out").card
    training = card["training"]
    assert training["run_status"] == "degraded" and training["rounds_lost"] == 1
    assert training["status_reason"] == reason
    assert "rounds_lost" in (tmp_path / "out" / "model_card.md").read_text()
