"""The sweep report's fairness section (``fl-app report``, :mod:`fl_app.release.report`).

Per job, from ``summary.json``'s ``fairness`` block (:mod:`fl_app.server.fairness`): the
mean accuracy over sites, its spread (std, max − min), the worst site's accuracy, and the
worst class on the server's test set, or why the per-site numbers are withheld. For a
sweep with private and non-private jobs, DP's disparate impact (Bagdasaryan, Poursaeed &
Shmatikov, NeurIPS 2019): how much each DP job loses against the non-private job of the
same sweep, overall, on its worst class and on its worst site, as a table and as
``fairness_vs_dp.png``. A worst group that loses more than the mean is the disparate
impact the paper describes.

The baseline of a DP job is the non-private job whose other overrides (those not under
``privacy.`` or ``secagg.``) agree with it on the most keys; ties go to the first job.
Only summaries are read; per-site numbers appear only where the run reported them (its
threat model let the server see each client's numbers) and stay with the operator: they
are covered by no ε.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "FAIRNESS_FIGURE",
    "Impact",
    "JobFairness",
    "disparate_impact",
    "fairness_markdown",
    "job_fairness",
    "write_fairness",
]


class JobResult(Protocol):
    """What this section reads of a job (:class:`fl_app.release.report.JobResult`;
    structural, so the two modules do not import each other)."""

    @property
    def path(self) -> Path: ...
    @property
    def overrides(self) -> Mapping[str, str]: ...
    @property
    def status(self) -> str: ...
    @property
    def accuracy(self) -> float | None: ...
    @property
    def privacy_epsilon(self) -> float | None: ...
    @property
    def fairness(self) -> Mapping[str, Any] | None: ...


FAIRNESS_FIGURE = "fairness_vs_dp.png"
_PRIVACY_PREFIXES = ("privacy", "secagg")


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class JobFairness:
    """One job's fairness numbers (``None`` where not reported)."""

    site_mean: float | None = None
    site_std: float | None = None
    site_range: float | None = None
    worst_site_accuracy: float | None = None
    worst_class: int | None = None
    worst_class_accuracy: float | None = None
    # Why there are no per-site numbers ("withheld: ..." / "not measured: ..."), if so.
    per_site_status: str | None = None

    def cells(self) -> dict[str, float | int | str | None]:
        """The report's columns for this job, in order."""
        return {
            "site_mean": self.site_mean,
            "site_std": self.site_std,
            "site_range": self.site_range,
            "worst_site_accuracy": self.worst_site_accuracy,
            "worst_class": self.worst_class,
            "worst_class_accuracy": self.worst_class_accuracy,
            "per_site_status": self.per_site_status,
        }


def job_fairness(block: Mapping[str, Any] | None) -> JobFairness:
    """Read ``summary.json``'s ``fairness`` block (absent in runs before it existed)."""
    if not isinstance(block, Mapping):
        return JobFairness(per_site_status="not reported (no fairness block in summary.json)")
    site, cls = block.get("per_site"), block.get("per_class")
    site_nums: dict[str, float | None] = {}
    status = None
    if isinstance(site, Mapping):
        site_nums = {k: _num(site.get(k)) for k in ("mean", "std", "range", "worst_accuracy")}
    else:
        status = str(site)
    worst_class = None
    worst_class_acc = None
    if isinstance(cls, Mapping):
        wc = cls.get("worst_class")
        worst_class = wc if isinstance(wc, int) and not isinstance(wc, bool) else None
        worst_class_acc = _num(cls.get("worst_accuracy"))
    return JobFairness(
        site_mean=site_nums.get("mean"),
        site_std=site_nums.get("std"),
        site_range=site_nums.get("range"),
        worst_site_accuracy=site_nums.get("worst_accuracy"),
        worst_class=worst_class,
        worst_class_accuracy=worst_class_acc,
        per_site_status=status,
    )


@dataclass(frozen=True)
class Impact:
    """One DP job against its non-private baseline: accuracy lost (baseline − job)."""

    job: str
    baseline: str
    epsilon: float
    accuracy_drop: float | None
    worst_class_drop: float | None
    worst_site_drop: float | None


def _drop(base: float | None, job: float | None) -> float | None:
    return None if base is None or job is None else base - job


def _shared_overrides(a: JobResult, b: JobResult) -> int:
    keys = {k for k in (*a.overrides, *b.overrides) if not k.startswith(_PRIVACY_PREFIXES)}
    return sum(a.overrides.get(k) == b.overrides.get(k) for k in keys)


def disparate_impact(jobs: Sequence[JobResult]) -> list[Impact]:
    """Each finished DP job against the closest finished non-private job (sorted by ε)."""
    done = [j for j in jobs if j.status in ("completed", "degraded") and j.accuracy is not None]
    plain = [j for j in done if j.privacy_epsilon is None]
    out = []
    for j in done:
        eps = j.privacy_epsilon
        if eps is None or not plain:
            continue
        base = max(plain, key=lambda b: _shared_overrides(j, b))
        fj, fb = job_fairness(j.fairness), job_fairness(base.fairness)
        out.append(
            Impact(
                job=j.path.name,
                baseline=base.path.name,
                epsilon=eps,
                accuracy_drop=_drop(base.accuracy, j.accuracy),
                worst_class_drop=_drop(fb.worst_class_accuracy, fj.worst_class_accuracy),
                worst_site_drop=_drop(fb.worst_site_accuracy, fj.worst_site_accuracy),
            )
        )
    return sorted(out, key=lambda i: (i.epsilon, i.job))


def _fmt(value: float | int | str | None) -> str:
    if value is None:
        return ""
    return format(value, ".4g") if isinstance(value, float) else str(value)


_JOB_COLUMNS = tuple(JobFairness().cells())


def fairness_markdown(jobs: Sequence[JobResult]) -> list[str]:
    """The report's ``## Fairness`` section: per job, then DP's disparate impact."""
    lines = [
        "",
        "## Fairness",
        "",
        "Per-site accuracy (federated evaluation, each site counted once) and the worst class "
        "on the server's test set. Per-site numbers are withheld where the threat model keeps "
        "each client's numbers from the server.",
        "",
        "| job | " + " | ".join(_JOB_COLUMNS) + " |",
        "|" + "---|" * (len(_JOB_COLUMNS) + 1),
    ]
    for j in jobs:
        cells = [
            v if isinstance(v, str) else _fmt(v) for v in job_fairness(j.fairness).cells().values()
        ]
        lines.append(f"| {j.path.name} | " + " | ".join(cells) + " |")
    impact = disparate_impact(jobs)
    if impact:
        lines += [
            "",
            "### DP's disparate impact (accuracy lost against the non-private job)",
            "",
            "| job | baseline | epsilon | accuracy_drop | worst_class_drop | worst_site_drop |",
            "|---|---|---|---|---|---|",
        ]
        for i in impact:
            nums = (i.epsilon, i.accuracy_drop, i.worst_class_drop, i.worst_site_drop)
            lines.append(f"| {i.job} | {i.baseline} | " + " | ".join(_fmt(v) for v in nums) + " |")
    return lines


def write_fairness(jobs: Sequence[JobResult], out_dir: Path) -> list[Path]:
    """Write ``fairness.csv`` and, for a sweep with DP and non-DP jobs, the plot."""
    path = out_dir / "fairness.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job", *_JOB_COLUMNS])
        for j in jobs:
            cells = job_fairness(j.fairness).cells().values()
            writer.writerow([j.path.name, *("" if v is None else v for v in cells)])
    paths = [path]
    impact = disparate_impact(jobs)
    if impact:
        import matplotlib.pyplot as plt

        fig = fairness_figure(impact)
        paths.append(out_dir / FAIRNESS_FIGURE)
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def fairness_figure(impact: Sequence[Impact]) -> Any:
    """Accuracy lost against the non-private job, by ε: overall, worst class, worst site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    series = (
        ("overall (test accuracy)", "accuracy_drop", "o"),
        ("worst class", "worst_class_drop", "s"),
        ("worst site", "worst_site_drop", "^"),
    )
    for label, attr, marker in series:
        points = [(i.epsilon, getattr(i, attr)) for i in impact if getattr(i, attr) is not None]
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker=marker, label=label)
        else:
            ax.plot([], [], marker=marker, label=f"{label}: not reported")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    if all(i.epsilon > 0 for i in impact):
        ax.set_xscale("log")
    ax.set_xlabel("epsilon (client-level, else record-level max)")
    ax.set_ylabel("accuracy lost vs the non-private job")
    ax.set_title("DP's disparate impact: the worst group vs the mean", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=8)
    return fig
