"""Deployment round latency: a SecAgg+ round vs a plain round, 3 SuperNodes on loopback.

One federation (1 SuperLink + 3 SuperNodes, TLS and SuperNode authentication, as
``fl-app deploy demo`` brings up) serves three runs, one after the other:

* plain: FedAvg, ``privacy=none secagg=off``;
* secaggplus: the same with ``secagg=secaggplus secagg.clip=5``: round 1 runs all four
  message exchanges (key advertisement for ``secagg.key_rounds`` rounds, share keys,
  masked input, unmasking); later rounds two (masked input; unmasking with the next
  round's share-keys riding along);
* secaggplus-4-stages: the same with ``secagg.key_rounds=1``, the classic protocol
  (fresh keys, four exchanges in every round).

Numbers are ``round_seconds`` from each run's ``metrics.jsonl`` (the ServerApp's round
driver: from sending instructions to aggregating), so FAB install and ServerApp start
are excluded; "steady" is the median of rounds 2..R-1, what a long run pays per round.
Flower's deployment runtime starts a fresh ClientApp process for every message, so a
round costs at least one process start per client per exchange: the secagg/plain ratio
is dominated by that, not by the cryptography (see ``scripts/bench_secagg.py`` for
protocol cost without process starts).

    .venv/bin/python scripts/bench_deploy.py               # 4 rounds each
    .venv/bin/python scripts/bench_deploy.py --rounds 3 --json out.json
    .venv/bin/python scripts/bench_deploy.py --extra model=cnn train.local_epochs=40
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fl_app.deploy.federation import Federation, app_root
from fl_app.deploy.flwr_cli import run_logs

COMMON = [
    "dataset.num_partitions=3",
    "strategy.min_available_nodes=3",
    "federated_eval_every=0",
    "train.local_epochs=1",
]
VARIANTS = {
    "plain": ["secagg=off"],
    # Keys advertised ahead and share-ahead (the default): 2 exchanges a mid-run round.
    "secaggplus": ["secagg=secaggplus", "secagg.clip=5"],
    # The classic protocol: fresh keys and all four stages in every round.
    "secaggplus-4-stages": ["secagg=secaggplus", "secagg.clip=5", "secagg.key_rounds=1"],
}


def _run(
    fed: Federation, name: str, rounds: int, workdir: Path, extra: list[str]
) -> dict[str, Any]:
    run_dir = workdir / f"run-{name}"
    t0 = time.perf_counter()
    run_id, status = fed.submit(
        app_root(),
        [*COMMON, f"num_rounds={rounds}", *VARIANTS[name], *extra],
        run_dir,
        timeout=1800,
    )
    wall = time.perf_counter() - t0
    if status != "finished:completed":
        raise SystemExit(
            f"{name}: run {run_id} {status}\n{run_logs(run_id, fed.connection, fed.env)}"
        )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    secs = [float(r["round_seconds"]) for r in rows]
    stages = {
        k: statistics.median(float(r[k]) for r in rows)
        for k in rows[0]
        if k.startswith("secagg_stage") and k.endswith("_seconds")
    }
    mid = secs[1:-1] if len(secs) > 2 else secs
    return {
        "rounds": len(rows),
        "round_seconds": secs,
        "median_round_seconds": statistics.median(secs),
        # Mid-run rounds (2..R-1): what a long run pays per round.
        "steady_round_seconds": statistics.median(mid),
        "run_wall_seconds": wall,
        "stage_seconds": stages,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 3 for steady)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="which runs (plain and secaggplus are needed for the ratio)",
    )  # fmt: skip
    ap.add_argument(
        "--cold", action="store_true",
        help="Flower's default process model: a fresh flwr-clientapp process per message "
        "(default: warm ClientApp launchers, fl_app.deploy.warm_clientapp)",
    )  # fmt: skip
    ap.add_argument(
        "--flwr-overlay", type=Path,
        help="measurement only: a folder holding a patched copy of the flwr package, put "
        "first on the Flower processes' PYTHONPATH (docs/flower-supernode-polling.patch)",
    )  # fmt: skip
    ap.add_argument(
        "--extra", nargs="+", default=[], metavar="OVERRIDE",
        help="Hydra overrides for every run, e.g. more work per site: "
        "--extra model=cnn train.local_epochs=40",
    )  # fmt: skip
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    fed = Federation(workdir / "fed", num_nodes=3, warm_clientapps=not args.cold)
    if args.flwr_overlay:
        fed.env["PYTHONPATH"] = str(args.flwr_overlay.resolve())
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    with fed.running():
        results["startup_seconds"] = time.perf_counter() - t0
        for name in args.variants:
            results[name] = _run(fed, name, args.rounds, workdir, args.extra)
    plain, sec = results.get("plain"), results.get("secaggplus", {})
    if plain and sec:
        results["ratio"] = sec["steady_round_seconds"] / plain["steady_round_seconds"]
    print(f"federation up (TLS + node auth, 3 SuperNodes): {results['startup_seconds']:.1f}s")
    print("| run | steady s (rounds 2..R-1) | ratio to plain | rounds (s) | run wall s |")
    print("|---|---|---|---|---|")
    for name in args.variants:
        r = results[name]
        shown = ", ".join(f"{s:.1f}" for s in r["round_seconds"])
        ratio = r["steady_round_seconds"] / plain["steady_round_seconds"] if plain else 1.0
        print(
            f"| {name} | {r['steady_round_seconds']:.1f} | {ratio:.2f}x | {shown} | "
            f"{r['run_wall_seconds']:.1f} |"
        )
    if "ratio" in results:
        print(f"secaggplus / plain (steady): {results['ratio']:.2f}x")
    if sec.get("stage_seconds"):
        print("secagg stages (median s): " + ", ".join(
            f"{k.removeprefix('secagg_').removesuffix('_seconds')} {v:.1f}"
            for k, v in sorted(sec["stage_seconds"].items())
        ))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
