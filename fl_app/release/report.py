"""One table and the privacy-utility plots of a sweep (``fl-app report <multirun dir>``,
:mod:`fl_app.cli.report`).

A Hydra multirun (``fl-app simulate -m privacy.noise_multiplier=0.5,1,2
privacy.clip=0.5,1``) leaves one job directory per setting, each with Hydra's
``.hydra/overrides.yaml`` (the swept parameters), ``summary.json`` and
``metrics.jsonl``. This module collects them into

* ``report.csv`` and ``report.md``: one row per job: its overrides, client-level ε
  and δ, the largest record-level ε, test accuracy and loss, rounds run and planned,
  seconds, status, and why it stopped early if it did;
* ``accuracy_vs_epsilon.png``: final accuracy against ε, one panel per kind of ε
  (client-level for the federation; record-level, the largest institution's): the two
  are different guarantees and never share an axis; one curve per clipping norm;
* ``accuracy_vs_rounds.png``: test accuracy per round from round 0 (the initial
  model), one curve per job, integer round ticks;
* a ``## Fairness`` section in ``report.md``, ``fairness.csv`` and, for a sweep with
  private and non-private jobs, ``fairness_vs_dp.png`` (DP's disparate impact on the
  worst site and the worst class; :mod:`fl_app.release.fairness_report`).

Plots name only the swept parameters (those whose value differs between jobs) in
their legends; the settings every job shares go in the title. Legends sit outside
the axes so they never cover a curve.

Jobs that did not finish (no ``summary.json``) are listed with their status, never
silently dropped; jobs that failed or were refused (``fl-app simulate -m`` refuses a job
whose budget its planned rounds would exceed) are listed after the table with the
reason their ``summary.json`` gives. Only aggregate numbers are read, and of the per-site
fairness numbers only the summary's spread and worst site, which a run reports only where
its threat model lets the server see each client's numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_app.release.fairness_report import fairness_markdown, write_fairness
from fl_app.server.layout import SUMMARY_FILE, RunLayout

__all__ = [
    "JobResult",
    "collect_jobs",
    "curves_by_clip",
    "epsilon_curves",
    "plot_figures",
    "swept_keys",
    "unsuccessful_jobs",
    "write_report",
]

_CLIP_KEYS = ("privacy.clip", "privacy.dpsgd.max_grad_norm")
# Which override is "the clipping norm" on each ε panel.
_LEVEL_CLIP_KEY = {"client": "privacy.clip", "record": "privacy.dpsgd.max_grad_norm"}
# Beyond this many jobs a per-job legend is unreadable: it is left out and the title says so.
_MAX_LEGEND_ENTRIES = 24


@dataclass
class JobResult:
    """One job of a sweep, as its run directory describes it."""

    path: Path
    overrides: dict[str, str]
    status: str
    epsilon: float | None = None
    delta: float | None = None
    record_level_epsilon: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    rounds: int | None = None
    rounds_planned: int | None = None
    seconds: float | None = None
    stopped_early: str | None = None
    # Why the job failed, was refused or lost rounds (summary.json ``status_reason``).
    status_reason: str | None = None
    accuracy_per_round: list[tuple[int, float]] = field(default_factory=list)
    # Test accuracy of the initial model (round 0), when the server evaluated it.
    initial_accuracy: float | None = None
    # summary.json's fairness block (fl_app.release.fairness_report reads it).
    fairness: dict[str, Any] | None = None

    @property
    def privacy_epsilon(self) -> float | None:
        """The ε a plot puts on its x axis: client-level, else record-level max."""
        return self.epsilon if self.epsilon is not None else self.record_level_epsilon

    @property
    def clip(self) -> str:
        for key in _CLIP_KEYS:
            if key in self.overrides:
                return self.overrides[key]
        return "default"

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.overrides.items())) or "(defaults)"


def _read_overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _job(job: Path) -> JobResult:
    overrides = _read_overrides(job)
    layout = RunLayout(job)
    summary_path = layout.summary
    if not summary_path.is_file():
        run = layout.run_manifest
        status = "no summary"
        if run.is_file():
            status = str(json.loads(run.read_text()).get("status", status))
        return JobResult(job, overrides, status)
    s = json.loads(summary_path.read_text())
    privacy = s.get("privacy", {}) or {}
    result = JobResult(
        path=job,
        overrides=overrides,
        status=str(s.get("status", "?")),
        epsilon=_float(privacy.get("epsilon")),
        delta=_float(privacy.get("delta")),
        record_level_epsilon=_float(privacy.get("record_level_epsilon_max")),
        accuracy=_float(s.get("accuracy")),
        loss=_float(s.get("loss")),
        rounds=s.get("rounds"),
        rounds_planned=s.get("rounds_planned"),
        seconds=_float(s.get("seconds")),
        stopped_early=s.get("stopped_early"),
        status_reason=s.get("status_reason"),
        initial_accuracy=_float(s.get("initial_accuracy")),
        fairness=s.get("fairness") if isinstance(s.get("fairness"), dict) else None,
    )
    metrics = layout.metrics
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            acc = _float(rec.get("server_accuracy"))
            if acc is not None:
                result.accuracy_per_round.append((int(rec["round"]), acc))
    return result


def collect_jobs(multirun_dir: Path) -> list[JobResult]:
    """Every job directory below ``multirun_dir`` (those holding ``.hydra/`` or a summary)."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (give a Hydra multirun directory)")
    jobs = sorted(
        {p.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
        | {p.parent for p in root.rglob(SUMMARY_FILE)},
        key=lambda p: (len(p.parts), [int(x) if x.isdigit() else x for x in p.parts]),
    )
    jobs = [j.parent if j.name == ".hydra" else j for j in jobs]
    return [_job(j) for j in dict.fromkeys(jobs)]


def _fmt(value: float | int | None, spec: str = ".4g") -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, float) else str(value)


_COLUMNS = (
    "epsilon",
    "delta",
    "record_level_epsilon",
    "accuracy",
    "loss",
    "rounds",
    "rounds_planned",
    "seconds",
    "status",
    "stopped_early",
    "status_reason",
)

# Jobs whose model some client trained; any other status is listed with its reason.
_SUCCEEDED = ("completed", "degraded")


def unsuccessful_jobs(jobs: Sequence[JobResult]) -> list[str]:
    """One line per job that failed, was refused or never finished, with its reason."""
    lines = []
    for j in jobs:
        if j.status not in _SUCCEEDED:
            reason = j.status_reason or "no reason recorded (see the job's directory)"
            lines.append(f"{j.path.name} ({j.label()}): {j.status}: {reason}")
    return lines


def write_report(jobs: Sequence[JobResult], out_dir: Path) -> list[Path]:
    """Write ``report.csv``, ``report.md`` and the two plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for j in jobs for k in j.overrides})
    rows = []
    for j in jobs:
        row: dict[str, Any] = {"job": j.path.name, **{k: j.overrides.get(k, "") for k in keys}}
        for col in _COLUMNS:
            row[col] = getattr(j, col)
        rows.append(row)
    csv_path = out_dir / "report.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["job", *keys, *_COLUMNS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    header = ["job", *keys, *_COLUMNS]
    md = [
        f"# Sweep report: {len(jobs)} jobs",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [
            _fmt(row[c]) if isinstance(row[c], (int, float)) else str(row[c] or "") for c in header
        ]
        md.append("| " + " | ".join(cells) + " |")
    md.extend(fairness_markdown(jobs))
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    return [csv_path, md_path, *_plots(jobs, out_dir), *write_fairness(jobs, out_dir)]


def curves_by_clip(jobs: Sequence[JobResult]) -> dict[str, list[tuple[float, float]]]:
    """The accuracy-vs-ε plot's data: one curve (sorted by ε) per clipping norm."""
    by_clip: dict[str, list[tuple[float, float]]] = {}
    for j in jobs:
        eps, acc = j.privacy_epsilon, j.accuracy
        if eps is not None and acc is not None:
            by_clip.setdefault(j.clip, []).append((eps, acc))
    return {clip: sorted(points) for clip, points in sorted(by_clip.items())}


def swept_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Overrides whose value differs between jobs (a key some jobs lack counts as swept).

    A setting passed to every job alike (``num_rounds=2``) is a constant of the sweep,
    not a parameter of it: legends that list it make every label look different
    only in its tail.
    """
    keys = sorted({k for j in jobs for k in j.overrides})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def _constants(jobs: Sequence[JobResult]) -> str:
    swept = set(swept_keys(jobs))
    shared = sorted({k for j in jobs for k in j.overrides} - swept)
    return ", ".join(f"{k}={jobs[0].overrides[k]}" for k in shared) if jobs else ""


def _label(job: JobResult, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={job.overrides.get(k, '(default)')}" for k in keys) or "(one job)"


def epsilon_curves(jobs: Sequence[JobResult], level: str) -> dict[str, list[tuple[float, float]]]:
    """Accuracy against one kind of ε: one curve (sorted by ε) per clipping norm.

    Parameters
    ----------
    jobs : sequence of JobResult
        The sweep.
    level : {"client", "record"}
        ``client``: the federation's client-level ε, curves by ``privacy.clip``;
        ``record``: the largest institution's record-level ε, curves by
        ``privacy.dpsgd.max_grad_norm``. A job with both appears on both panels.

    Returns
    -------
    dict
        Curve label (``"C = <norm>"``, or ``"all jobs"`` when the norm is not swept)
        to ``(epsilon, accuracy)`` points.
    """
    clip_key = _LEVEL_CLIP_KEY[level]
    clip_swept = clip_key in swept_keys(jobs)
    curves: dict[str, list[tuple[float, float]]] = {}
    for j in jobs:
        eps = j.epsilon if level == "client" else j.record_level_epsilon
        if eps is None or j.accuracy is None:
            continue
        name = f"C = {j.overrides.get(clip_key, '(default)')}" if clip_swept else "all jobs"
        curves.setdefault(name, []).append((eps, j.accuracy))
    return {name: sorted(points) for name, points in sorted(curves.items())}


def plot_figures(jobs: Sequence[JobResult]) -> dict[str, Any]:
    """Build the report's figures (matplotlib ``Figure`` by file name), unsaved."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")

    constants = _constants(jobs)
    subtitle = "\n".join(textwrap.wrap(f"fixed: {constants}", 90)) if constants else ""
    figures = {
        "accuracy_vs_epsilon.png": _epsilon_figure(jobs),
        "accuracy_vs_rounds.png": _rounds_figure(jobs),
    }
    if subtitle:
        for fig in figures.values():
            fig.suptitle(subtitle, fontsize=8)
    return figures


def _epsilon_figure(jobs: Sequence[JobResult]) -> Any:
    """Accuracy against ε: one panel per kind of ε that some job has (client first)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    levels = [
        (level, epsilon_curves(jobs, level), axis)
        for level, axis in (
            ("client", "client-level epsilon (federation)"),
            ("record", "record-level epsilon (largest institution)"),
        )
    ]
    panels = [p for p in levels if p[1]] or levels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    baseline = [j.accuracy for j in jobs if j.privacy_epsilon is None and j.accuracy is not None]
    for ax, (level, curves, axis) in zip(axes[0], panels, strict=True):
        for name, points in curves.items():
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
        if baseline:
            ax.axhline(max(baseline), color="grey", linestyle="--", label="no DP")
        ax.set_xlabel(axis)
        ax.set_ylabel("test accuracy")
        if curves:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plain)
            low, high = ax.get_xlim()
            # Label minor ticks only when there are too few major ones (under a decade).
            ax.xaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
        else:
            ax.text(0.5, 0.5, "no job with DP", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{level}-level DP: accuracy vs epsilon", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Below the panel: each panel's own curves, never over them.
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)
    return fig


def _rounds_figure(jobs: Sequence[JobResult]) -> Any:
    """Test accuracy per round from round 0, one curve per job."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2))
    keys = swept_keys(jobs)
    plotted = 0
    for j in jobs:
        points = list(j.accuracy_per_round)
        if j.initial_accuracy is not None and not any(r == 0 for r, _ in points):
            points.insert(0, (0, j.initial_accuracy))
        if points:
            rounds, acc = zip(*points, strict=True)
            ax.plot(rounds, acc, label=_label(j, keys), linewidth=1, marker=".")
            plotted += 1
    ax.set_xlabel("round (0 = initial model)")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(left=0)
    title = "test accuracy per round"
    if plotted > _MAX_LEGEND_ENTRIES:
        title += f" ({plotted} jobs: legend left out, see report.md)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if 0 < plotted <= _MAX_LEGEND_ENTRIES:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    return fig


def _plots(jobs: Sequence[JobResult], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in plot_figures(jobs).items():
        path = out_dir / name
        # bbox_inches="tight" grows the image to hold the legend outside the axes.
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
