"""Where a loopback deployment round's seconds go: SuperNode log lines, timestamped.

Brings up the federation ``scripts/bench_deploy.py`` uses (1 SuperLink + 3 SuperNodes,
TLS + node auth), runs one plain FedAvg run, and stamps every line the SuperNodes (and
their ClientApp launchers) write as it appears (a 20 ms tail of the log files; Flower's
log lines carry no time). Per round and SuperNode it reports:

* ``wait``: from the SuperNode's previous reply sent to this round's instruction received:
  the ServerApp's aggregation and next push, plus the SuperNode's pull cadence (it sleeps
  3 s whenever a pull finds nothing, ``flwr/supernode/start_client_internal.py``);
* ``launch``: instruction received to ClientApp process started (SuperExec's 1 s task
  poll and ``flwr-clientapp``'s own start in subprocess isolation; the launcher's 50 ms
  poll and a fork with ``--warm``);
* ``app``: ClientApp started to reply picked up (imports, the work, and the SuperNode's
  0.5 s reply polling);
* ``send``: reply pushed to the SuperLink.

    .venv/bin/python scripts/profile_deploy.py --rounds 4           # Flower's default
    .venv/bin/python scripts/profile_deploy.py --rounds 4 --warm    # warm launchers
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fl_app.deploy.federation import Federation, app_root
from fl_app.deploy.warm_clientapp import LAUNCH_LINE

COMMON = [
    "dataset.num_partitions=3",
    "strategy.min_available_nodes=3",
    "federated_eval_every=0",
    "train.local_epochs=1",
    "secagg=off",
]
MARKS = {
    "Receiving:": "received",
    "Start `flwr-clientapp` process": "started",
    LAUNCH_LINE: "started",
    "Sending:": "sending",
    "Sent successfully": "sent",
}


def _tail(logs: Path, events: list[tuple[float, str, str]], stop: threading.Event) -> None:
    offsets: dict[Path, int] = {}
    while not stop.is_set():
        now = time.monotonic()
        for path in sorted(logs.glob("supernode-*.log")):
            node = path.stem.split("-")[1]
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
            cut = data.rfind(b"\n") + 1
            offsets[path] = offsets.get(path, 0) + cut
            for line in data[:cut].decode(errors="replace").splitlines():
                for needle, mark in MARKS.items():
                    if needle in line:
                        events.append((now, node, mark))
        time.sleep(0.02)


def _phases(events: list[tuple[float, str, str]]) -> list[dict[str, float]]:
    """One row per (node, exchange): the phase lengths between the marks."""
    rows = []
    for node in sorted({e[1] for e in events}):
        seq = [(t, m) for t, n, m in events if n == node]
        last_sent = None
        cur: dict[str, float] = {}
        for t, mark in seq:
            cur[mark] = t
            if mark == "sent" and {"received", "started", "sending"} <= set(cur):
                row = {
                    "launch": cur["started"] - cur["received"],
                    "app": cur["sending"] - cur["started"],
                    "send": cur["sent"] - cur["sending"],
                }
                if last_sent is not None:
                    row["wait"] = cur["received"] - last_sent
                rows.append(row)
                last_sent, cur = t, {}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warm", action="store_true", help="warm ClientApp launchers")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--flwr-overlay", type=Path,
        help="measurement only: a folder holding a patched copy of the flwr package, put "
        "first on the Flower processes' PYTHONPATH (docs/flower-supernode-polling.patch)",
    )  # fmt: skip
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="profile-deploy-"))
    fed = Federation(workdir / "fed", num_nodes=3, warm_clientapps=args.warm)
    if args.flwr_overlay:
        fed.env["PYTHONPATH"] = str(args.flwr_overlay.resolve())
    events: list[tuple[float, str, str]] = []
    stop = threading.Event()
    with fed.running():
        tail = threading.Thread(target=_tail, args=(fed.group.log_dir, events, stop))
        tail.start()
        try:
            run_id, status = fed.submit(
                app_root(), [*COMMON, f"num_rounds={args.rounds}"], workdir / "run"
            )
        finally:
            stop.set()
            tail.join()
    if status != "finished:completed":
        raise SystemExit(f"run {run_id}: {status}")
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    secs = [float(r["round_seconds"]) for r in rows]
    phases = _phases(events)
    out: dict[str, Any] = {
        "warm": args.warm,
        "flwr_overlay": str(args.flwr_overlay or ""),
        "round_seconds": secs,
        "steady_round_seconds": statistics.median(secs[1:-1] if len(secs) > 2 else secs),
    }
    for key in ("wait", "launch", "app", "send"):
        vals = [p[key] for p in phases if key in p]
        if vals:
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**out, "phases": phases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
