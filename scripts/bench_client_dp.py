"""Utility of client-level central DP at cross-device scale: accuracy versus ε.

Runs the ``digits_1000_clients_dp`` experiment (1,000 clients over scikit-learn's
digits with a Dirichlet(α=1) label split, Poisson sampling of q = 0.05, i.e. 50
clients a round in expectation, fixed clipping, in-process runtime) for several noise
multipliers z, plus the same run without DP, and writes a Markdown table of the final
test accuracy against the ε the ledger reports (PLD, δ = 1e-5).

Every run uses the same seed, so the rows differ only in z. ε is the federation's
client-level ε (one client's whole data in or out); it is computed by the run itself
from its ledger, not by this script.

Usage::

    python scripts/bench_client_dp.py                       # 200 rounds, ~5 minutes
    python scripts/bench_client_dp.py --rounds 50 --z 1,2   # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fl_app.config.compose import compose_config
from fl_app.runtime.simulation import run_simulation_experiment


def run(overrides: list[str]) -> dict[str, float | None]:
    cfg = compose_config("config", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_simulation_experiment(cfg, Path(tmp))
        seconds = time.perf_counter() - t0
    return {
        "accuracy": summary["accuracy"],
        "epsilon": summary["privacy"]["epsilon"],
        "rounds": summary["rounds"],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--z", default="0.5,0.7,1.0,1.5,2.0,3.0", help="noise multipliers")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5, help="client learning rate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    base = [
        "experiment=digits_1000_clients_dp",
        f"num_rounds={args.rounds}",
        f"seed={args.seed}",
        f"train.lr={args.lr}",
        "privacy.max_epsilon=null",
    ]
    rows = []
    for z in [float(x) for x in args.z.split(",")]:
        res = run([*base, f"privacy.noise_multiplier={z}", f"privacy.clip={args.clip}"])
        rows.append((f"{z:g}", res))
        print(f"z={z:g}: {res}", file=sys.stderr, flush=True)
    # The experiment file sets client-level fields; the baseline clears them all.
    res = run(
        [
            *base,
            "privacy.mode=none",
            "privacy.threat_model=none",
            "privacy.noise_multiplier=null",
            "privacy.clip=null",
            "privacy.delta=null",
        ]
    )
    rows.append(("no DP", res))
    print(f"no DP: {res}", file=sys.stderr, flush=True)

    lines = [
        f"Client-level central DP, 1,000 clients, Poisson q=0.05 (50/round expected), "
        f"{args.rounds} rounds, C={args.clip:g}, client lr {args.lr:g}, seed {args.seed}, "
        "delta=1e-5 (PLD)",
        "",
        "| z | client-level epsilon | test accuracy | seconds |",
        "|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "inf"
        lines.append(f"| {name} | {eps} | {r['accuracy']:.4f} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
