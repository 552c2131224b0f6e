"""``fl-app report`` on a real Hydra multirun of 6 jobs: table, CSV and one curve per clip."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app.report import collect_jobs, curves_by_clip
from fl_app.report import main as report_main


def test_report_collects_a_six_job_privacy_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "fl_app.cli",
        "simulate",
        "-m",
        "runtime=inprocess",
        "privacy=central",
        "num_rounds=2",
        "dataset.num_partitions=4",
        "federated_eval_every=0",
        "privacy.noise_multiplier=0.5,1,2",
        "privacy.clip=0.5,1",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # Every job printed its projection before it trained.
    assert done.stdout.count("projection: 2 planned rounds") == 6

    jobs = collect_jobs(sweep)
    assert len(jobs) == 6 and all(j.status == "completed" for j in jobs)
    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.count("| central |") == 6
    with (sweep / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert {r["privacy.clip"] for r in rows} == {"0.5", "1"}
    assert all(float(r["epsilon"]) > 0 and 0 <= float(r["accuracy"]) <= 1 for r in rows)
    # Same z gives the same epsilon whatever the clip (epsilon does not depend on C).
    eps = {(r["privacy.noise_multiplier"], r["privacy.clip"]): float(r["epsilon"]) for r in rows}
    assert all(eps[(z, "0.5")] == pytest.approx(eps[(z, "1")]) for z in ("0.5", "1", "2"))
    # The plot: one curve per clipping norm, three points each, sorted by epsilon.
    curves = curves_by_clip(jobs)
    assert set(curves) == {"0.5", "1"} and all(len(c) == 3 for c in curves.values())
    assert all(c == sorted(c) for c in curves.values())
    for name in ("accuracy_vs_epsilon.png", "accuracy_vs_rounds.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_lists_unfinished_jobs_and_refuses_an_empty_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_main([str(tmp_path / "missing")]) == 2
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    (tmp_path / "0" / "run.json").write_text('{"status": "failed"}')
    jobs = collect_jobs(tmp_path)
    assert [(j.status, j.overrides) for j in jobs] == [("failed", {"seed": "3"})]
    assert report_main([str(tmp_path)]) == 0
    assert "failed" in capsys.readouterr().out
