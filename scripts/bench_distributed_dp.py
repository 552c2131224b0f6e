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
    return {
        "accuracy": summary.get("accuracy"),
        "epsilon": summary["privacy"].get("epsilon"),
        "z": summary["privacy"].get("client_level", {}).get("noise_multiplier"),
        "bytes_up": sum(up) / len(up) if up else None,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="digits10")
    ap.add_argument("--bits", type=int, nargs="*", default=[8, 12, 16, 20])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    s = SETTINGS[args.setting]
    eps = s["epsilon"]
    target = ["privacy.noise_multiplier=null", f"privacy.target_epsilon={eps}", f"seed={args.seed}"]
    rows = [("central DP (client-side clipping, PLD)", run([*s["common"], *s["central"], *target]))]
    print(f"central: {rows[-1][1]}", flush=True)
    for bits in args.bits:
        result = run([*s["common"], *s["distributed"], *target, f"secagg.bits={bits}"])
        rows.append((f"distributed DP, {bits} bits", result))
        print(f"{bits} bits: {result}", flush=True)
    lines = [
        f"Setting `{args.setting}`, target epsilon {eps} (delta 1e-5), seed {args.seed}",
        "",
        "| mechanism | test accuracy | epsilon | z | upload bytes/client/round | run s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | refused: {r['error']} | | | | {r['seconds']:.0f} |")
            continue
        up = f"{r['bytes_up']:,.0f}" if r["bytes_up"] else "-"
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | {r['epsilon']:.3f} | {r['z']:.3f} | {up} | "
            f"{r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
