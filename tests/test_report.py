"""``fl-app report`` on a real Hydra multirun of 6 jobs: table, CSV and one curve per clip."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app.cli.report import report_main
from fl_app.release.report import JobResult, collect_jobs, curves_by_clip


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


def _job(n: int, overrides: dict[str, str], **values: object) -> JobResult:
    return JobResult(path=Path(str(n)), overrides=overrides, status="completed", **values)  # type: ignore[arg-type]


def test_plots_are_readable() -> None:
    """Legends outside the axes, only swept parameters named, integer rounds from 0,
    client- and record-level epsilon on separate panels."""
    from fl_app.release.report import epsilon_curves, plot_figures, swept_keys

    common = {"num_rounds": "3", "runtime": "inprocess"}
    jobs = [
        _job(
            0,
            {**common, "privacy": "none"},
            accuracy=0.9,
            initial_accuracy=0.1,
            accuracy_per_round=[(1, 0.5), (2, 0.8), (3, 0.9)],
        ),
        _job(
            1,
            {**common, "privacy": "central", "privacy.clip": "0.5"},
            epsilon=2.0,
            accuracy=0.6,
            initial_accuracy=0.1,
            accuracy_per_round=[(1, 0.3), (2, 0.5), (3, 0.6)],
        ),
        _job(
            2,
            {**common, "privacy": "central", "privacy.clip": "1"},
            epsilon=2.0,
            accuracy=0.7,
            initial_accuracy=0.1,
            accuracy_per_round=[(1, 0.4), (2, 0.6), (3, 0.7)],
        ),
        _job(
            3,
            {**common, "privacy": "dpsgd"},
            record_level_epsilon=5.0,
            accuracy=0.8,
            initial_accuracy=0.1,
            accuracy_per_round=[(1, 0.6), (2, 0.7), (3, 0.8)],
        ),
    ]
    assert swept_keys(jobs) == ["privacy", "privacy.clip"]
    assert epsilon_curves(jobs, "client") == {"C = 0.5": [(2.0, 0.6)], "C = 1": [(2.0, 0.7)]}
    assert epsilon_curves(jobs, "record") == {"all jobs": [(5.0, 0.8)]}

    figures = plot_figures(jobs)
    try:
        eps_fig = figures["accuracy_vs_epsilon.png"]
        assert len(eps_fig.axes) == 2  # client- and record-level never share an axis
        assert [ax.get_xlabel().split()[0] for ax in eps_fig.axes] == [
            "client-level",
            "record-level",
        ]
        rounds_fig = figures["accuracy_vs_rounds.png"]
        ax = rounds_fig.axes[0]
        legend = ax.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels[0] == "privacy=none, privacy.clip=(default)"
        assert all("num_rounds" not in label and "runtime" not in label for label in labels)
        assert "num_rounds=3" in rounds_fig._suptitle.get_text()
        # Round 0 is the initial model; ticks are whole rounds starting at 0.
        first = ax.get_lines()[0]
        assert (first.get_xdata()[0], first.get_ydata()[0]) == (0, 0.1)
        assert ax.get_xlim()[0] == 0
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        # Legends sit outside every axes: no curve can be covered.
        for fig in (eps_fig, rounds_fig):
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
            boxes = [a.get_legend().get_window_extent(renderer) for a in fig.axes]
            for box in boxes:
                assert not any(box.overlaps(a.get_window_extent(renderer)) for a in fig.axes)
    finally:
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)
