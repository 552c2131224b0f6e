"""Utility of distributed DP vs central DP at the same ε, and accuracy vs ``secagg.bits``.

Each setting is one ``fl-app simulate`` run in a fresh process (in-process runtime);
the table reads each run's ``summary.json``. Central DP uses client-side clipping
(``privacy.clip_side=client``) and PLD; distributed DP adds discrete Gaussian shares
under SecAgg+ and is accounted by its RDP bound (looser than PLD, so it needs more
noise for the same ε). Both target the same ε (``privacy.target_epsilon``).

    .venv/bin/python scripts/bench_distributed_dp.py --setting digits10
    .venv/bin/python scripts/bench_distributed_dp.py --setting digits1000   # ~20 min
    .venv/bin/python scripts/bench_distributed_dp.py --setting digits10 --bits 12 16

A bit width too small for the cohort is refused before the run (the config error is
reported in the table): the sum must never wrap around the ring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FL_APP = [sys.executable, "-m", "fl_app.cli"]

SETTINGS: dict[str, dict[str, Any]] = {
    # The default experiment: digits, 10 IID clients, full participation.
    "digits10": {
        "epsilon": 10.0,
        "common": ["runtime=inprocess", "num_rounds=10", "federated_eval_every=0"],
        "central": ["privacy=central", "privacy.clip_side=client"],
        "distributed": ["privacy=distributed", "secagg=secaggplus", "secagg.dropout_tolerance=0.1"],
    },
    # The 1,000-client benchmark of the client-DP issue (50 clients a round, 200 rounds).
    "digits1000": {
        "epsilon": 4.77,
        "common": ["privacy.max_epsilon=null"],
        "central": ["experiment=digits_1000_clients_dp", "privacy.clip_side=client"],
        "distributed": ["experiment=digits_1000_clients_ddp"],
    },
}


def run(overrides: list[str]) -> dict[str, Any]:
    """One run; its summary (or the config error) and wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*FL_APP, "simulate", *overrides, f"hydra.run.dir={tmp}/run"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - t0
        summary_path = Path(tmp) / "run" / "summary.json"
        if proc.returncode != 0 or not summary_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"error": tail[0][:200], "seconds": seconds}
        summary = json.loads(summary_path.read_text())
        metrics = [
            json.loads(line)
            for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
    up = [m["secagg_bytes_up_per_client"] for m in metrics if "secagg_bytes_up_per_client" in m]
    acc = [m["server_accuracy"] for m in metrics if "server_accuracy" in m]
    return {
        "accuracy": summary.get("accuracy"),
        # DP noise makes the last round's accuracy jitter by a point or two.
        "accuracy_last10": sum(acc[-10:]) / len(acc[-10:]) if acc else None,
        "epsilon": summary["privacy"].get("epsilon"),
        "z": summary["privacy"].get("client_level", {}).get("noise_multiplier"),
        "bytes_up": sum(up) / len(up) if up else None,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits10")
    ap.add_argument("--bits", type=int, nargs="*", default=[8, 12, 16, 20])
    ap.add_argument("--seed", type=int, default=42, help="first seed (repeats use seed+1, ...)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (mean and sd)")
    ap.add_argument("--epsilon", type=float, default=None, help="override the target epsilon")
    ap.add_argument("--extra", nargs="*", default=[], help="extra overrides for every run")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    s = SETTINGS[args.setting]
    eps = args.epsilon if args.epsilon is not None else s["epsilon"]
    target = ["privacy.noise_multiplier=null", f"privacy.target_epsilon={eps}", *args.extra]
    settings = [("central DP (client-side clipping, PLD)", [*s["common"], *s["central"]])]
    settings += [
        (f"distributed DP, {bits} bits", [*s["common"], *s["distributed"], f"secagg.bits={bits}"])
        for bits in args.bits
    ]
    rows = []
    for name, overrides in settings:
        runs = []
        for i in range(args.repeats):
            result = run([*overrides, *target, f"seed={args.seed + i}"])
            print(f"{name} seed {args.seed + i}: {result}", flush=True)
            runs.append(result)
            if "error" in result and "config error" in result["error"]:
                break  # refused before the run: the same for every seed
        rows.append((name, runs))
    lines = [
        f"Setting `{args.setting}`, target epsilon {eps} (delta 1e-5), seeds {args.seed}.."
        f"{args.seed + args.repeats - 1}; accuracy: mean ± sd over the seeds",
        "",
        "| mechanism | test accuracy | mean of last 10 rounds | epsilon | z | "
        "upload bytes/client/round | run s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, all_runs in rows:
        runs = [r for r in all_runs if "error" not in r]
        if not runs:
            lines.append(f"| {name} | refused: {all_runs[0]['error']} | | | | | |")
            continue
        if len(runs) < len(all_runs):
            name += f" ({len(all_runs) - len(runs)} run(s) failed)"

        def mean_sd(key: str, runs: list[dict[str, Any]] = runs) -> str:
            vals = [r[key] for r in runs]
            mean = sum(vals) / len(vals)
            sd = (sum((a - mean) ** 2 for a in vals) / max(1, len(vals) - 1)) ** 0.5
            return f"{mean:.4f} ± {sd:.4f}" if len(vals) > 1 else f"{mean:.4f}"

        r = runs[0]
        up = f"{r['bytes_up']:,.0f}" if r["bytes_up"] else "-"
        seconds = sum(x["seconds"] for x in runs) / len(runs)
        lines.append(
            f"| {name} | {mean_sd('accuracy')} | {mean_sd('accuracy_last10')} | "
            f"{r['epsilon']:.3f} | {r['z']:.3f} | {up} | "
            f"{seconds:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
