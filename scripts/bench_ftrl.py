"""Utility of DP-FTRL against DP-FedAvg at the same ε on the 1,000-client digits preset.

For each seed: runs ``digits_1000_clients_dp`` (Poisson q = 0.05, 50 clients a round in
expectation, DP-FedAvg at ``--z`` over ``--rounds``) and reads the ε its ledger reports
(PLD, δ = 1e-5, amplified by the secret sample). Then, for each DP-FTRL setting of
``--variants`` (``rounds:fraction:k[:once]``: rounds, fixed-size cohort fraction, tree
length ``k``, and ``once`` for ``privacy.ftrl.participation=once_per_tree``), it finds
the node noise ``z`` at which DP-FTRL (no amplification) reaches that same ε and runs
it with the same seed. DP-FTRL's ε does not depend on the cohort, so a setting may
trade rounds for clients a round (``rounds × cohort`` = DP-FedAvg's 200 × 50 keeps the
client work equal). The ε is computed here by the analytic Gaussian mechanism (Balle &
Wang 2018): the rounds compose into one Gaussian of ``μ = √S / z``, ``S`` the run's
summed node sensitivities (:func:`fl_app.privacy.tree.tree_sensitivity_sq`:
``Σ 4^level`` per tree, or ``⌈log2(k+1)⌉`` per tree under the cap); the table shows the
ε each run's own ledger reports.

Usage::

    python scripts/bench_ftrl.py                       # 3 seeds, DP-FedAvg + 2 settings
    python scripts/bench_ftrl.py --seeds 3 --variants 50:0.2:5:once,50:0.2:1
    python scripts/bench_ftrl.py --seeds 1 --epsilon 4.766 --variants 20:0.5:1  # sweep
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from scipy import optimize, stats

from fl_app.config.compose import compose_config
from fl_app.privacy.tree import tree_sensitivity_sq
from fl_app.runtime.simulation import run_simulation_experiment


def run(overrides: list[str]) -> dict[str, float]:
    cfg = compose_config("config", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_simulation_experiment(cfg, Path(tmp))
        seconds = time.perf_counter() - t0
    return {
        "accuracy": float(summary["accuracy"]),
        "epsilon": float(summary["privacy"]["epsilon"]),
        "seconds": seconds,
    }


def gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of the Gaussian mechanism with ``μ = Δ/σ`` at ``δ`` (Balle & Wang 2018, Thm 8)."""

    def gap(eps: float) -> float:
        a, b = -eps / mu + mu / 2, -eps / mu - mu / 2
        return float(math.exp(stats.norm.logcdf(a)) - math.exp(eps + stats.norm.logcdf(b)) - delta)

    if gap(0.0) <= 0:
        return 0.0
    return float(optimize.brentq(gap, 0.0, 5000.0))


def run_sensitivity_sq(rounds: int, k: int, participation: str = "arbitrary") -> int:
    """``S`` over ``rounds`` rounds with a fresh tree every ``k`` (the last one partial)."""
    full, rest = divmod(rounds, k)
    return full * tree_sensitivity_sq(k, participation) + (
        tree_sensitivity_sq(rest, participation) if rest else 0
    )


def ftrl_noise_for(
    epsilon: float, rounds: int, k: int, delta: float, participation: str = "arbitrary"
) -> float:
    """The node ``z`` at which DP-FTRL's ε over ``rounds`` equals ``epsilon``."""
    root = math.sqrt(run_sensitivity_sq(rounds, k, participation))
    return float(
        optimize.brentq(
            lambda z: gaussian_epsilon(root / z, delta) - epsilon, root / 60.0, root * 1e3
        )
    )


class Variant(NamedTuple):
    """One DP-FTRL setting: rounds, cohort fraction (fixed-size), tree length, cap."""

    rounds: int
    fraction: float
    k: int
    participation: str  # "arbitrary" or "once" (privacy.ftrl.participation=once_per_tree)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``rounds:fraction:k[:once]``, e.g. ``50:0.2:5:once``."""
        parts = text.split(":")
        once = len(parts) == 4 and parts[3] == "once"
        return cls(int(parts[0]), float(parts[1]), int(parts[2]), "once" if once else "arbitrary")

    def overrides(self, z: float) -> list[str]:
        cap = "once_per_tree" if self.participation == "once" else "arbitrary"
        return [
            f"num_rounds={self.rounds}",
            "strategy.sampling=fixed",
            f"strategy.fraction_train={self.fraction:g}",
            "privacy.ftrl.enabled=true",
            f"privacy.noise_multiplier={z:.6g}",
            f"privacy.ftrl.restart_every={self.k}",
            *([f"privacy.ftrl.participation={cap}"] if self.participation == "once" else []),
        ]

    def label(self) -> str:
        cap = ", once per tree" if self.participation == "once" else ""
        return (
            f"DP-FTRL, {self.rounds} rounds, {round(self.fraction * 1000)} clients/round, "
            f"k={self.k}{cap} (no amplification)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="DP-FedAvg's rounds")
    parser.add_argument("--z", type=float, default=1.0, help="DP-FedAvg's noise multiplier")
    parser.add_argument(
        "--variants",
        default="50:0.2:5:once,50:0.2:1",
        help="DP-FTRL settings rounds:fraction:k[:once], comma-separated",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="skip DP-FedAvg and match this epsilon (a tuning sweep)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    variants = [Variant.parse(v) for v in args.variants.split(",") if v]
    rows: dict[str, list[dict[str, float]]] = {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        base = ["experiment=digits_1000_clients_dp", f"seed={seed}", "privacy.max_epsilon=null"]
        target = args.epsilon
        if target is None:
            fedavg = run([*base, f"num_rounds={args.rounds}", f"privacy.noise_multiplier={args.z}"])
            fedavg["z"] = args.z
            name = f"DP-FedAvg, {args.rounds} rounds, Poisson q=0.05, z={args.z:g} (amplified)"
            rows.setdefault(name, []).append(fedavg)
            print(f"seed {seed} fedavg: {fedavg}", file=sys.stderr, flush=True)
            target = fedavg["epsilon"]
        for v in variants:
            z = ftrl_noise_for(target, v.rounds, v.k, 1e-5, v.participation)
            res = run([*base, *v.overrides(z)])
            res["z"] = z
            rows.setdefault(v.label(), []).append(res)
            print(f"seed {seed} {v.label()} z={z:.4g}: {res}", file=sys.stderr, flush=True)
    lines = [
        f"1,000 clients, C=1, delta=1e-5, seeds {seeds.start}..{seeds.stop - 1}",
        "",
        "| mechanism | node/round z | epsilon (ledger) | test accuracy (mean ± sd) | s/run |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in rows.items():
        acc = [r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        z = statistics.mean(r["z"] for r in rs)
        eps = statistics.mean(r["epsilon"] for r in rs)
        secs = statistics.mean(r["seconds"] for r in rs)
        lines.append(
            f"| {name} | {z:.3g} | {eps:.3g} | {statistics.mean(acc):.3f} ± {sd:.3f} | {secs:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
