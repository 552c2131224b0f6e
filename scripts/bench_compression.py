"""Accuracy against upload bytes for each ``share.compression`` at two ratios (docs/performance.md).

Digits, 10 sites, FedAvg, the in-process runtime: for every seed, one run without
compression and one per (method, ratio) of :data:`METHODS` x ``--ratios``. Each run is
composed with ``compose_plan("config", [...])`` (the config check ``fl-app simulate``
runs) and run by :func:`fl_app.runtime.simulation.run_simulation_experiment` into a
temporary directory. From its ``summary.json``: ``accuracy`` (the server's test accuracy
after the last round) and the ``bandwidth`` block (payload bytes up and down per client
per round, measured on the messages; docs/compression.md). The run total per client is
the per-round mean times the rounds it measured.

A method this version refuses (a :class:`~fl_app.config.errors.ConfigError` on
``share.compression``, e.g. ``sketch`` before it lands) becomes a row saying so instead
of failing the sweep. ``--dp Z`` adds central DP (``privacy=central``, noise multiplier
``Z``, clip 1) rows for every method: compression leaves the ledger unchanged, so those
rows share one ε (the table shows it).

Accuracies and byte counts do not depend on the machine's load. The seed fixes the data,
the partition and the initial model, not every draw: random-k's mask derives from the
run's random key (``run.json``), and central DP's noise comes from the OS
(``privacy.secure_mode``), so a rerun of those rows moves within their spread.

Usage::

    python scripts/bench_compression.py                          # 10 rounds, seeds 0 1 2
    python scripts/bench_compression.py --seeds 0 --rounds 3     # quicker
    python scripts/bench_compression.py --dp 1 --out /tmp/compression  # + DP rows, table, plot
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The compressions of the curve, one entry each: a new one (e.g. a count sketch) is a
# name here, the same overrides, and a line in NOTES if it has a restriction.
METHODS: tuple[str, ...] = ("randk", "topk", "sketch")
NOTES: dict[str, str] = {
    "randk": "public per-round mask, no d/k rescaling; works under every threat model",
    "topk": "error feedback kept at the site; only where the server sees each update "
    "(privacy none, or central without secure aggregation)",
    "sketch": "count sketch of share.sketch_rows rows on public per-round hashes, the server "
    "keeps the k largest estimates; works under every threat model; the clip C acts on the "
    "sketch (about C/sqrt(rows) on the update)",
}
RATIOS: tuple[float, ...] = (0.25, 0.1)
PLOT_FILE = "compression-curve.png"
TABLE_FILE = "compression-curve.md"


@dataclass(frozen=True)
class Setting:
    """One point of the curve: a compression at a ratio, with or without central DP."""

    method: str  # "none" or a name of METHODS
    ratio: float  # 1.0 for "none"
    dp_z: float | None = None  # central DP noise multiplier, None without DP

    def overrides(self, rounds: int, seed: int) -> list[str]:
        """Hydra overrides of this setting's run (the default digits, 10 sites)."""
        out = ["runtime=inprocess", f"num_rounds={rounds}", f"seed={seed}"]
        if self.method != "none":
            out += [
                "share.artifact=compressed",
                f"share.compression={self.method}",
                f"share.ratio={self.ratio:g}",
            ]
        if self.dp_z is not None:
            out += ["privacy=central", f"privacy.noise_multiplier={self.dp_z:g}"]
        return out

    def label(self) -> str:
        name = "none" if self.method == "none" else f"{self.method}, ratio {self.ratio:g}"
        return name if self.dp_z is None else f"{name}, central DP z={self.dp_z:g}"


@dataclass
class Row:
    """A setting's runs over the seeds, or the reason the config check refused it."""

    setting: Setting
    accuracies: list[float] = field(default_factory=list)
    up_round: list[float] = field(default_factory=list)
    up_total: list[float] = field(default_factory=list)
    down_round: list[float] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)
    refused: str | None = None


def settings(ratios: Sequence[float], dp_z: float | None) -> list[Setting]:
    """Every setting of the sweep, in table order: none, then METHODS x ratios."""
    zs: list[float | None] = [None] if dp_z is None else [None, dp_z]
    return [
        s
        for z in zs
        for s in [Setting("none", 1.0, z)] + [Setting(m, r, z) for m in METHODS for r in ratios]
    ]


def add_result(row: Row, summary: Mapping[str, Any]) -> None:
    """Fold one run's ``summary.json`` into its row.

    Raises ValueError for a run that did not complete or has no bandwidth block: its
    accuracy would not be after the planned rounds, or its bytes unknown.
    """
    if summary.get("status") != "completed":
        raise ValueError(f"{row.setting.label()}: run status {summary.get('status')!r}")
    band = summary.get("bandwidth")
    if not band:
        raise ValueError(f"{row.setting.label()}: summary.json has no bandwidth block")
    up = float(band["upload_bytes_per_client_round"])
    row.accuracies.append(float(summary["accuracy"]))
    row.up_round.append(up)
    row.up_total.append(up * int(band["rounds_measured"]))
    row.down_round.append(float(band["download_bytes_per_client_round"]))
    eps = (summary.get("privacy") or {}).get("epsilon")
    if eps is not None:
        row.epsilons.append(float(eps))


def _mean_sd(xs: Sequence[float]) -> str:
    """``mean ± sample sd`` (n - 1), or the value alone for one seed."""
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _bytes(xs: Sequence[float]) -> str:
    return f"{statistics.mean(xs):,.0f}"


def markdown_table(rows: Iterable[Row], rounds: int) -> str:
    """The curve as a Markdown table; a refused setting's row says so in every column."""
    rows = list(rows)
    base = {r.setting.dp_z: statistics.mean(r.up_round) for r in rows if r.setting.method == "none"}
    dp = any(r.setting.dp_z is not None for r in rows)
    head = [
        "compression",
        f"accuracy after {rounds} rounds",
        "upload B / client / round",
        f"upload B / client, {rounds} rounds",
        "upload vs none",
        "download B / client / round",
    ] + (["ε (δ=1e-5)"] if dp else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        s = row.setting
        name = s.label()
        if row.refused is not None:
            cells = [name, "refused in this version"] + ["—"] * (len(head) - 2)
        else:
            ref = base.get(s.dp_z)
            share = statistics.mean(row.up_round) / ref if ref else float("nan")
            cells = [
                name,
                _mean_sd(row.accuracies),
                _bytes(row.up_round),
                _bytes(row.up_total),
                f"{share:.3f}",
                _bytes(row.down_round),
            ]
            if dp:
                cells.append(f"{statistics.mean(row.epsilons):.3g}" if row.epsilons else "—")
        lines.append("| " + " | ".join(cells) + " |")
    methods = dict.fromkeys(r.setting.method for r in rows)
    lines.append("")
    lines += [f"- {m}: {NOTES[m]}" for m in methods if m in NOTES]
    refusals = dict.fromkeys(r.refused for r in rows if r.refused is not None)
    lines += [f"- refused in this version: {why}" for why in refusals]
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, rounds: int) -> None:
    """Accuracy (mean, sample-sd bars) against upload bytes per client over the run, log x.

    Each method's points are joined from its largest ratio to its smallest, starting at
    the uncompressed point of the same privacy setting; refused settings are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r.refused is None and r.accuracies]
    for z in sorted({r.setting.dp_z for r in done}, key=lambda v: -1.0 if v is None else v):
        group = [r for r in done if r.setting.dp_z == z]
        none = [r for r in group if r.setting.method == "none"]
        style = "-" if z is None else "--"
        suffix = "" if z is None else f", central DP z={z:g}"
        for i, method in enumerate(METHODS):
            pts = none + sorted(
                (r for r in group if r.setting.method == method), key=lambda r: -r.setting.ratio
            )
            if len(pts) == len(none):
                continue
            ax.errorbar(
                [statistics.mean(r.up_total) for r in pts],
                [statistics.mean(r.accuracies) for r in pts],
                yerr=[statistics.stdev(r.accuracies) if len(r.accuracies) > 1 else 0 for r in pts],
                fmt="o" + style,
                capsize=3,
                color=f"C{i}",  # one colour per method, with and without DP
                label=method + suffix,
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"upload bytes per client over {rounds} rounds (log)")
    ax.set_ylabel("server test accuracy")
    ax.set_title("Digits, 10 sites: accuracy vs upload bytes (none = ratio 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_setting(setting: Setting, rounds: int, seeds: Sequence[int]) -> Row:
    """Run one setting for every seed (or record why the config check refused it)."""
    from fl_app.config.compose import compose_plan
    from fl_app.config.errors import ConfigError
    from fl_app.runtime.simulation import run_simulation_experiment

    row = Row(setting)
    for seed in seeds:
        try:
            plan = compose_plan("config", setting.overrides(rounds, seed))
        except ConfigError as err:
            if err.field != "share.compression":
                raise
            row.refused = str(err)
            print(f"{setting.method}: refused in this version ({err})", file=sys.stderr)
            return row
        with tempfile.TemporaryDirectory() as tmp:
            add_result(row, run_simulation_experiment(plan, Path(tmp)))
        print(f"{setting.label()} seed {seed}: {row.accuracies[-1]:.4f}", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--dp", type=float, default=None, metavar="Z", help="central DP rows")
    parser.add_argument("--out", type=Path, default=None, help=f"write {TABLE_FILE}, {PLOT_FILE}")
    args = parser.parse_args(argv)
    rows = [run_setting(s, args.rounds, args.seeds) for s in settings(args.ratios, args.dp)]
    table = markdown_table(rows, args.rounds)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / TABLE_FILE).write_text(table + "\n", encoding="utf-8")
        plot(rows, args.out / PLOT_FILE, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
