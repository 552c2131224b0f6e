#!/usr/bin/env python
"""Seconds per round for 10, 100 and 1,000 clients: in-process Grid vs Ray simulation.

A benchmark, not a test. Every setting is the default experiment (embedded ``digits``,
default MLP, FedAvg, 3 local SGD epochs of batch 16, all clients every round) composed
with ``compose_config("config", [...])`` and run through
:func:`fl_app.runtime.simulation.run_simulation_experiment` into a temporary run directory.
Per-round ``round_seconds`` come from that directory's ``metrics.jsonl``; the accuracy
from its ``summary.json``.

Each setting runs in a fresh subprocess (this script again, with the hidden
``--one BACKEND N`` flag, in its own session) so that memory and Ray state never leak
between settings and the peak RSS of every setting is its own. The child sends all
other output (progress lines, Ray's worker logs) to /dev/null and prints one JSON
result on a final line marked ``BENCH_RESULT``. A setting that fails or runs past
``--timeout`` (its whole session is killed) is reported as an error row; the others go
on, and the exit status is 1.

Usage::

    python scripts/bench_rounds.py                       # 10, 100, 1000 clients, 3 rounds
    python scripts/bench_rounds.py --quick               # 10 and 100 clients only
    python scripts/bench_rounds.py --backends inprocess --clients 1000 --rounds 5
    python scripts/bench_rounds.py --out docs/bench.md   # also write the table

Columns: *start-up s* is the wall time of ``run_simulation_experiment`` minus the sum
of the per-round seconds (run directory, model build, initial centralised evaluation,
for Ray also ``ray.init`` and actor creation, model saving); *median s/round* is the
median over rounds 2..R (round 1 is reported separately: it pays for first-call costs
such as Ray actor warm-up and data partitioning in each worker); *peak RSS MB* is the
child process's ``ru_maxrss`` via ``resource.getrusage`` (for Ray: the driver only);
*all processes peak PSS MB* is the largest sum, sampled every 0.5 s from ``/proc``, of
the proportional set size of every process in the child's session (Ray's GCS, raylet,
dashboard agent and ClientApp actors included), with the most processes seen;
*other CPU %* is the share of the machine's CPU used by processes outside the setting
while it ran (about 2 % in-process and 5 % with Ray on an idle machine: sampling, and
processes too short-lived to be seen). Below the table: CPU seconds per process of
the setting (driver = the process that runs the ServerApp), which shows what bounds
a round, and the Ray/in-process ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARKER = "BENCH_RESULT "
BACKENDS = {"inprocess": "inprocess", "ray": "simulation"}  # --backends name -> runtime=


def overrides_for(
    backend: str, num_clients: int, rounds: int, max_in_flight: int | None = None
) -> list[str]:
    """Hydra overrides of one setting (identical for every N, so rows compare)."""
    extra = [] if max_in_flight is None else [f"runtime.max_in_flight={max_in_flight}"]
    return [
        f"runtime={BACKENDS[backend]}",
        "runtime.client_num_cpus=1",
        f"dataset.num_partitions={num_clients}",
        # Partitions of 1-2 examples at N=1000 leave nothing to validate on: no
        # federated evaluation anywhere (centralised test evaluation stays on).
        "dataset.val_fraction=0",
        "federated_eval_every=0",
        "strategy.min_available_nodes=2",
        f"num_rounds={rounds}",
        f"experiment_name=bench_{backend}_{num_clients}",
        *extra,
    ]


# ---------------------------------------------------------------- child process
def run_one(
    backend: str, num_clients: int, rounds: int, max_in_flight: int | None = None
) -> dict[str, Any]:
    """Run one setting in this process and return its measurements."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    t_import = time.perf_counter()
    from fl_app.config.compose import compose_config
    from fl_app.runtime.simulation import run_simulation_experiment

    import_s = time.perf_counter() - t_import
    cfg = compose_config("config", overrides_for(backend, num_clients, rounds, max_in_flight))
    with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-{num_clients}-") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        summary = run_simulation_experiment(cfg, run_dir)
        wall = time.perf_counter() - t0
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    round_s = [float(r["round_seconds"]) for r in records]
    train_s = [float(r["train_seconds"]) for r in records]
    accepted = [int(r["clients_accepted"]) for r in records]
    sampled = [int(r["clients_sampled"]) for r in records]
    return {
        "backend": backend,
        "clients": num_clients,
        "rounds": len(round_s),
        "wall_s": wall,
        "import_s": import_s,
        "startup_s": wall - sum(round_s),
        "round_s": round_s,
        "train_s": train_s,
        "clients_sampled": sampled,
        "clients_accepted": accepted,
        "accuracy": summary.get("accuracy"),
        "code_version": summary.get("code_version"),
        "local_epochs": cfg.train.local_epochs,
        "batch_size": cfg.train.batch_size,
        "fraction_train": cfg.strategy.fraction_train,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_main(backend: str, num_clients: int, rounds: int, max_in_flight: int | None) -> int:
    """``--one``: silence fd 1 (progress, Ray's forwarded logs), print JSON on the real one."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        result: dict[str, Any] = run_one(backend, num_clients, rounds, max_in_flight)
        rc = 0
    except BaseException as ex:  # reported in the table, not hidden
        result = {"backend": backend, "clients": num_clients, "error": f"{type(ex).__name__}: {ex}"}
        rc = 1
        import traceback

        traceback.print_exc(file=sys.stderr)
    sys.stdout.flush()
    os.write(real_stdout, (MARKER + json.dumps(result) + "\n").encode())
    os.close(real_stdout)
    return rc


# --------------------------------------------------------------- parent process
def _session_sample(
    sid: int, per_pid: dict[int, tuple[str, int]] | None = None
) -> tuple[int, int, int, int]:
    """(PSS kB, RSS kB, processes, CPU ticks) summed over the processes of session ``sid``.

    The child runs in its own session, and Ray's GCS, raylet and worker actors stay in
    it, so this is the whole setting's footprint. PSS shares each shared page (torch's
    libraries, mapped in every Ray worker) among the processes that map it, so its sum
    is the honest total; RSS counts shared pages once per process. CPU ticks are
    utime+stime; ``per_pid`` (if given) receives each process's name and ticks. Linux
    only: zeros elsewhere; processes that vanish while being read are skipped.
    """
    pss = rss = count = ticks = 0
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return 0, 0, 0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            # After the parenthesised command: state ppid pgrp session ... (proc(5))
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == "Z":  # zombies hold no memory
                continue
            proc_ticks = int(fields[11]) + int(fields[12])  # utime + stime
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
            ticks += proc_ticks
            count += 1
            if per_pid is not None:
                per_pid[pid] = (stat.split("(", 1)[1].rsplit(")", 1)[0], proc_ticks)
        except (OSError, ValueError, IndexError):
            continue
    return pss, rss, count, ticks


def busy_ticks() -> int | None:
    """CPU ticks the whole machine spent busy (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            cpu = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = cpu
    return user + nice + system + irq + softirq + steal


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a timed-out child and everything it started in its own session (Ray)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_setting(
    backend: str,
    num_clients: int,
    rounds: int,
    timeout: float,
    sample_s: float = 0.5,
    *,
    max_in_flight: int | None = None,
    flwr_overlay: Path | None = None,
) -> dict[str, Any]:
    """Run one setting in a fresh subprocess, sampling its session's memory; never raises.

    ``flwr_overlay`` (measurement only) is put first on the child's ``PYTHONPATH`` (Ray's
    workers inherit it): a folder holding a patched copy of the ``flwr`` package, e.g.
    with docs/flower-linkstate-index.patch applied.
    """
    env = dict(os.environ)
    if flwr_overlay is not None:
        paths = [str(flwr_overlay.resolve()), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        backend,
        str(num_clients),
        "--rounds",
        str(rounds),
    ] + ([] if max_in_flight is None else ["--max-in-flight", str(max_in_flight)])
    peak_pss = peak_rss = peak_procs = 0
    # CPU used by processes outside the setting while it ran ("other CPU"): a busy
    # machine makes every number here suspect, so the table says how busy it was.
    foreign_ticks = 0
    per_pid: dict[int, tuple[str, int]] = {}  # last seen (name, CPU ticks) of each process
    last_busy = busy_ticks()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(
            cmd,
            stdout=out_f,
            stderr=err_f,
            env=env,
            start_new_session=True,  # its own session: memory sampling, and a timeout kills Ray
        )
        timed_out = False
        while True:
            try:
                proc.wait(timeout=sample_s)
                break
            except subprocess.TimeoutExpired:
                now: dict[int, tuple[str, int]] = {}
                pss, rss, procs, _ = _session_sample(proc.pid, now)
                busy = busy_ticks()
                # The setting's CPU in this interval, process by process: a process
                # that ended since the last sample must not subtract its history.
                ours = sum(t - per_pid.get(pid, ("", 0))[1] for pid, (_, t) in now.items())
                if busy is not None and last_busy is not None:
                    foreign_ticks += max(0, (busy - last_busy) - ours)
                last_busy = busy
                per_pid.update(now)
                peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
                peak_procs = max(peak_procs, procs)
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    _kill_group(proc)
                    break
        sampled_s = time.perf_counter() - t0
        # Whatever the child left behind in its session (it should be nothing), and
        # wait for it to be gone so that the next setting runs on a quiet machine.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.perf_counter() + 20
        while _session_sample(proc.pid)[2] and time.perf_counter() < deadline:
            time.sleep(0.2)
        out_f.seek(0)
        err_f.seek(0)
        out = out_f.read().decode(errors="replace")
        err = err_f.read().decode(errors="replace")
    process_s = time.perf_counter() - t0
    tck = os.sysconf("SC_CLK_TCK")
    capacity = sampled_s * tck * (os.cpu_count() or 1)
    # Where the CPU went: the driver (ServerApp, Grid or Ray's simulation runtime)
    # versus Ray's own processes and ClientApp actors (up to the last sample).
    cpu_by_process: dict[str, float] = {}
    for pid, (name, ticks) in per_pid.items():
        key = "driver" if pid == proc.pid else name
        cpu_by_process[key] = cpu_by_process.get(key, 0.0) + ticks / tck
    memory = {
        "session_peak_pss_mb": peak_pss / 1024,
        "session_peak_rss_mb": peak_rss / 1024,
        "session_peak_processes": peak_procs,
        "cpu_s_by_process": dict(sorted(cpu_by_process.items(), key=lambda kv: -kv[1])),
        "process_s": process_s,
        # Share of the machine's CPU capacity used by other processes during the
        # setting; more than a few percent means the timings are suspect.
        "other_cpu_pct": 100 * foreign_ticks / capacity if last_busy is not None else None,
    }
    if timed_out:
        return {
            "backend": backend,
            "clients": num_clients,
            "error": f"timed out after {timeout:.0f}s (dropped)",
            **memory,
        }
    result: dict[str, Any] | None = None
    for line in reversed(out.splitlines()):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
            break
    if result is None:
        tail = " | ".join(err.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
        result = {"backend": backend, "clients": num_clients, "error": f"no result: {tail}"}
    elif "error" in result and err.strip():
        result["stderr_tail"] = err.strip().splitlines()[-5:]
    result.update(memory)
    return result


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _steady(result: dict[str, Any]) -> list[float]:
    rounds: list[float] = result["round_s"]
    return rounds[1:] if len(rounds) > 1 else rounds


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, then the Ray/in-process ratios per N."""
    head = (
        "| backend | clients | rounds | start-up s | round 1 s | median s/round (2..R) "
        "| min-max s | s/client-round | accuracy | peak RSS MB | all processes peak PSS MB "
        "| process s | other CPU % |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append(
                f"| {r['backend']} | {r['clients']} | - | error: {r['error']} "
                f"| | | | | | | | {_fmt(r.get('process_s'), 0)} "
                f"| {_fmt(r.get('other_cpu_pct'), 0)} |"
            )
            continue
        steady = _steady(r)
        med = statistics.median(steady)
        rows.append(
            f"| {r['backend']} | {r['clients']} | {r['rounds']} | {_fmt(r['startup_s'])} "
            f"| {_fmt(r['round_s'][0])} | {_fmt(med)} "
            f"| {_fmt(min(steady))}-{_fmt(max(steady))} "
            f"| {_fmt(1000 * med / r['clients'], 1)} ms | {_fmt(r['accuracy'], 4)} "
            f"| {_fmt(r['peak_rss_mb'], 0)} "
            f"| {_fmt(r['session_peak_pss_mb'], 0)} ({r['session_peak_processes']} procs) "
            f"| {_fmt(r['process_s'], 0)} | {_fmt(r.get('other_cpu_pct'), 0)} |"
        )
    ok = {(r["backend"], r["clients"]): r for r in results if "error" not in r}
    ratios = []
    for n in sorted({r["clients"] for r in results}):
        ray, inp = ok.get(("ray", n)), ok.get(("inprocess", n))
        if ray and inp:
            med = statistics.median(_steady(ray)) / statistics.median(_steady(inp))
            total = ray["wall_s"] / inp["wall_s"]
            ratios.append(
                f"| {n} | {med:.1f}x | {_fmt(ray['startup_s'] - inp['startup_s'], 1)} "
                f"| {total:.1f}x |"
            )
    cpu_lines = []
    for r in results:
        by_proc = r.get("cpu_s_by_process") or {}
        if "error" not in r and by_proc:
            top = ", ".join(f"{k} {v:.0f}" for k, v in list(by_proc.items())[:4])
            cpu_lines.append(f"- {r['backend']} {r['clients']}: {top}")
    if cpu_lines:
        rows += ["", "CPU seconds by process (sampled; Ray actors summed by name):", *cpu_lines]
    if ratios:
        rows += [
            "",
            "| clients | Ray / in-process, median s/round | Ray - in-process, start-up s "
            "| Ray / in-process, total wall |",
            "|---:|---:|---:|---:|",
            *ratios,
        ]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--clients", default="10,100,1000", help="comma-separated N (default %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    p.add_argument(
        "--backends", default="inprocess,ray", help="inprocess and/or ray (default %(default)s)"
    )
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--quick", action="store_true", help="10 and 100 clients only")
    p.add_argument(
        "--timeout",
        type=float,
        default=480.0,
        help="seconds before a setting is killed and reported as dropped (default 480)",
    )
    p.add_argument("--json", type=Path, help="also write the raw results as JSON")
    p.add_argument(
        "--max-in-flight",
        type=int,
        help="runtime.max_in_flight for every setting (default: the config's, null)",
    )
    p.add_argument(
        "--flwr-overlay",
        type=Path,
        help="measurement only: a folder holding a patched copy of the flwr package, put "
        "first on the settings' PYTHONPATH (docs/flower-linkstate-index.patch)",
    )
    p.add_argument("--one", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.one:
        return child_main(args.one[0], int(args.one[1]), args.rounds, args.max_in_flight)
    clients = [10, 100] if args.quick else [int(c) for c in args.clients.split(",") if c]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {sorted(BACKENDS)}")
    print(
        f"# bench_rounds: digits, MLP, FedAvg, all clients every round, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}",
        flush=True,
    )
    results = []
    for n in clients:
        for backend in backends:
            print(f"... {backend} with {n} clients", file=sys.stderr, flush=True)
            r = run_setting(
                backend,
                n,
                args.rounds,
                args.timeout,
                max_in_flight=args.max_in_flight,
                flwr_overlay=args.flwr_overlay,
            )
            results.append(r)
            if "error" in r:
                print(f"    failed: {r['error']}", file=sys.stderr, flush=True)
            else:
                print(
                    f"    {r['process_s']:.0f}s; rounds {[round(s, 2) for s in r['round_s']]}",
                    file=sys.stderr,
                    flush=True,
                )
    ok = next((r for r in results if "error" not in r), None)
    table = markdown_table(results)
    if ok is not None:
        table += (
            f"\n\nClient training: {ok['local_epochs']} local epochs, batch "
            f"{ok['batch_size']}, fraction_train {ok['fraction_train']} (clients per round = N)."
        )
    print(table, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
