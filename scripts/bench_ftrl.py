"""Utility of DP-FTRL against DP-FedAvg at the same ε on the 1,000-client digits preset.

For each seed: runs ``digits_1000_clients_dp`` (Poisson q = 0.05, 50 clients a round in
expectation, DP-FedAvg at ``--z``) and reads the ε its ledger reports (PLD, δ = 1e-5,
amplified by the secret sample). Then, for each tree length ``k`` of ``--restarts``, it
finds the node noise ``z`` at which DP-FTRL (``privacy=ftrl``, arbitrary participation,
no amplification) reaches that same ε, and runs it with the same seed and cohorts. The
ε of DP-FTRL is computed here by the analytic Gaussian mechanism (Balle & Wang 2018):
its rounds compose into one Gaussian of ``μ = √S / z``, ``S`` the run's summed node
sensitivities (:func:`fl_app.privacy.tree.tree_sensitivity_sq`); the table shows the ε
each run's own ledger reports.

Usage::

    python scripts/bench_ftrl.py                        # 200 rounds, 3 seeds, k = 1, 8
    python scripts/bench_ftrl.py --rounds 50 --seeds 1  # quicker
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def run_sensitivity_sq(rounds: int, k: int) -> int:
    """``S`` over ``rounds`` rounds with a fresh tree every ``k`` (the last one partial)."""
    full, rest = divmod(rounds, k)
    return full * tree_sensitivity_sq(k, "arbitrary") + (
        tree_sensitivity_sq(rest, "arbitrary") if rest else 0
    )


def ftrl_noise_for(epsilon: float, rounds: int, k: int, delta: float) -> float:
    """The node ``z`` at which DP-FTRL's ε over ``rounds`` equals ``epsilon``."""
    root = math.sqrt(run_sensitivity_sq(rounds, k))
    return float(
        optimize.brentq(
            lambda z: gaussian_epsilon(root / z, delta) - epsilon, root / 60.0, root * 1e3
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--z", type=float, default=1.0, help="DP-FedAvg's noise multiplier")
    parser.add_argument("--restarts", default="1,8", help="DP-FTRL tree lengths k")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in range(1, args.seeds + 1):
        base = [
            "experiment=digits_1000_clients_dp",
            f"num_rounds={args.rounds}",
            f"seed={seed}",
            "privacy.max_epsilon=null",
        ]
        fedavg = run([*base, f"privacy.noise_multiplier={args.z}"])
        rows.setdefault(f"DP-FedAvg, z={args.z:g}, Poisson q=0.05 (amplified)", []).append(fedavg)
        print(f"seed {seed} fedavg: {fedavg}", file=sys.stderr, flush=True)
        for k in [int(x) for x in args.restarts.split(",")]:
            z = ftrl_noise_for(fedavg["epsilon"], args.rounds, k, 1e-5)
            res = run(
                [
                    *base,
                    "privacy.ftrl.enabled=true",
                    f"privacy.noise_multiplier={z:.6g}",
                    f"privacy.ftrl.restart_every={k}",
                ]
            )
            res["z"] = z
            rows.setdefault(f"DP-FTRL, k={k} (no amplification)", []).append(res)
            print(f"seed {seed} ftrl k={k} z={z:.4g}: {res}", file=sys.stderr, flush=True)
    lines = [
        f"1,000 clients, {args.rounds} rounds, C=1, delta=1e-5, seeds 1..{args.seeds}",
        "",
        "| mechanism | node/round z | epsilon (ledger) | test accuracy (mean ± sd) | s/run |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in rows.items():
        acc = [r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        z = statistics.mean(r.get("z", args.z) for r in rs)
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
