"""``python -m benchmarks``: run every benchmark section, write one Markdown document.

Each section (``benchmarks/<name>.py``, ``run(quick) -> Section``) runs in a fresh
child process (``python -m benchmarks --section-child NAME``) in its own session, so
its memory figures are its own, a crash or a hang cannot take the others down, and a
section past the time budget is killed with everything it started. Sections run one
after another (the machine has 2 cores: concurrent sections would time each other).
The runner enforces one total budget: a section gets whatever is left of it, learns
its deadline through :data:`~benchmarks.section.DEADLINE_ENV`, and a section that has
no time left is reported as skipped. Every section row appears in the document either
way, with its wall time and the CPU share other processes used meanwhile.

Usage::

    .venv/bin/python -m benchmarks                         # full run, ~10-13 min on 2 cores
    .venv/bin/python -m benchmarks --quick                 # smoke run, ~2 min
    .venv/bin/python -m benchmarks --only accounting,secagg
    .venv/bin/python -m benchmarks --out docs/performance.md   # replace the marked block

``--out FILE`` writes the document to FILE, or, when FILE already holds the markers
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``, replaces only what lies
between them (so ``docs/performance.md`` keeps its hand-written parts).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import LoadMonitor, load_average
from benchmarks.reuse import REPO_ROOT
from benchmarks.section import DEADLINE_ENV, Section, markdown_table, render_section

__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "ESTIMATE_S",
    "SECTIONS",
    "Outcome",
    "environment",
    "main",
    "render_document",
    "run_sections",
    "splice",
]

#: Section modules, in the order they run and appear.
SECTIONS: dict[str, str] = {
    "dpsgd": "DP-SGD step vs non-private step",
    "secagg": "Secure aggregation round vs plain, and vs Flower's legacy SecAgg+",
    "distributed_dp": "Distributed DP overhead",
    "accounting": "Privacy accounting: time and ε vs dp-accounting PLD",
    "simulation": "Simulation seconds per round at 10, 100 and 1,000 clients",
    "gpu": "GPU: DP-SGD step, peak device memory, noise cost, clients per second",
}
#: Typical seconds (quick, full) of each section on this 2-core machine: what the
#: sections still to come need, so an earlier section's soft deadline leaves it to them.
ESTIMATE_S: dict[str, tuple[float, float]] = {
    "dpsgd": (15.0, 170.0),
    "secagg": (40.0, 330.0),
    "distributed_dp": (10.0, 45.0),
    "accounting": (10.0, 25.0),
    "simulation": (45.0, 230.0),
    # Without a GPU: one "skipped" row (importing torch). With one: scripts/gpu_check.sh
    # runs it alone (--only gpu), so its minutes never squeeze the CPU sections.
    "gpu": (5.0, 5.0),
}
DEFAULT_BUDGET_S = 840.0  # the whole run must finish in < 15 min on this 2-core machine
QUICK_BUDGET_S = 300.0
BEGIN_MARKER = "<!-- benchmarks:begin -->"
END_MARKER = "<!-- benchmarks:end -->"
_RESULT_MARKER = "BENCH_SECTION "
# Time kept back for killing a late section and writing the document.
_MARGIN_S = 10.0
# Below this many seconds a section is not started at all.
_MIN_START_S = 5.0

#: ``execute(name, quick, soft_s, hard_s) -> Section``: the section should finish within
#: ``soft_s`` (it reads that deadline) and is killed after ``hard_s``.
Executor = Callable[[str, bool, float, float], Section]


@dataclass
class Outcome:
    """Every section's result and the run's wall time."""

    sections: list[Section]
    total_s: float
    budget_s: float


# ------------------------------------------------------------------ child process
def child_main(name: str, quick: bool) -> int:
    """Run one section here; print its JSON on the real stdout after a marker line.

    Everything else the section (Flower, Ray, Opacus) prints to fd 1 goes to stderr,
    so the parent finds the result without parsing logs.
    """
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        section: Section = module.run(quick)
        rc = 0
    except BaseException as ex:  # reported in the document, never hidden
        import traceback

        traceback.print_exc(file=sys.stderr)
        section = Section.failed(name, SECTIONS.get(name, name), f"{type(ex).__name__}: {ex}")
        rc = 1
    section.name = name
    sys.stdout.flush()
    os.write(real_stdout, (_RESULT_MARKER + section.to_json() + "\n").encode())
    os.close(real_stdout)
    return rc


# ----------------------------------------------------------------- parent process
def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def execute_in_child(name: str, quick: bool, soft_s: float, timeout_s: float) -> Section:
    """Run section ``name`` in a child process, killing its session after ``timeout_s``.

    The child learns its soft deadline (``soft_s`` from now) through
    :data:`~benchmarks.section.DEADLINE_ENV` and sizes its work to it.
    """
    cmd = [sys.executable, "-m", "benchmarks", "--section-child", name]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env[DEADLINE_ENV] = str(time.time() + min(soft_s, timeout_s))
    env.setdefault("RAY_DEDUP_LOGS", "1")
    env.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    title = SECTIONS.get(name, name)
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out_f, stderr=err_f, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            return Section.failed(name, title, f"timed out after {timeout_s:.0f} s (killed)")
        finally:
            # Anything the section left running in its session (it should be nothing).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out_f.seek(0)
        err_f.seek(0)
        out = out_f.read().decode(errors="replace")
        err = err_f.read().decode(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith(_RESULT_MARKER):
            section = Section.from_json(line[len(_RESULT_MARKER) :])
            if section.error:
                tail = " | ".join(err.strip().splitlines()[-3:])
                print(f"    {name} failed; stderr tail: {tail}", file=sys.stderr, flush=True)
            return section
    tail = " | ".join(err.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
    return Section.failed(name, title, f"no result: {tail}")


def run_sections(
    names: Sequence[str],
    *,
    quick: bool,
    budget_s: float,
    execute: Executor = execute_in_child,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Outcome:
    """Run ``names`` in order within ``budget_s`` seconds in all; never raises for a section.

    A section's soft deadline leaves the typical time of the sections after it
    (:data:`ESTIMATE_S`); its hard limit is all the time left (minus a margin for
    clean-up). One that overruns that is killed by ``execute`` and reported as timed
    out, and the sections after it run in what remains or are reported as skipped.
    """
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"names: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not budget_s > 0:
        raise ValueError(f"budget_s: expected > 0, found {budget_s!r}")
    t0 = clock()
    sections: list[Section] = []
    for i, name in enumerate(names):
        left = budget_s - (clock() - t0) - _MARGIN_S
        if left < _MIN_START_S:
            section = Section.failed(
                name,
                SECTIONS[name],
                f"skipped: the total budget of {budget_s:.0f} s was spent before it could start",
            )
            section.wall_s = 0.0
            sections.append(section)
            log(f"... {name}: skipped (budget spent)")
            continue
        later = sum(ESTIMATE_S[n][0 if quick else 1] for n in names[i + 1 :])
        soft = max(min(left, ESTIMATE_S[name][0 if quick else 1]), left - later)
        log(f"... {name} (aim {soft:.0f} s, killed after {left:.0f} s)")
        start = clock()
        with LoadMonitor() as load:
            section = execute(name, quick, soft, left)
        section.name = name
        section.wall_s = clock() - start
        if section.other_cpu_pct is None:
            section.other_cpu_pct = load.other_cpu_pct
        status = f"error: {section.error}" if section.error else "ok"
        log(f"    {name}: {section.wall_s:.0f} s, {status}")
        sections.append(section)
    return Outcome(sections, clock() - t0, budget_s)


# ------------------------------------------------------------------------ document
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> str:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def environment() -> dict[str, str]:
    """Where the numbers come from: commit, machine, versions, load at the start."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (+ uncommitted changes)"
    load = load_average()
    return {
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "CPU": f"{os.cpu_count()} cores, {_cpu_model()}",
        "memory": _mem_total_gib(),
        "python": platform.python_version(),
        "versions": ", ".join(
            f"{d} {_version(d)}"
            for d in ("torch", "flwr", "opacus", "dp-accounting", "ray", "numpy")
        ),
        "load average at start (1/5/15 min)": (
            "unknown" if load is None else " / ".join(f"{v:.2f}" for v in load)
        ),
    }


def render_document(outcome: Outcome, env: dict[str, str], *, quick: bool, command: str) -> str:
    """The Markdown document: header, environment, one summary table, one table a section."""
    lines = [
        "## Benchmark results",
        "",
        f"Generated by `{command}`{' (quick smoke run: not for comparison)' if quick else ''} "
        f"in {outcome.total_s:.0f} s (budget {outcome.budget_s:.0f} s).",
        "",
        *(f"- **{k}**: {v}" for k, v in env.items()),
        "",
        "Ratios come from paired runs in one process; `a [b-c]` is the median and the "
        "min-max over repeats. *Other CPU %* is the share of the machine's CPU used by "
        "processes outside the benchmark while the section ran (2-5 % on an idle machine); "
        "above ~10 % absolute times are inflated, ratios less so.",
        "",
        markdown_table(
            ["section", "wall s", "other CPU %", "status"],
            [
                [
                    s.name,
                    "-" if s.wall_s is None else f"{s.wall_s:.0f}",
                    "n/a" if s.other_cpu_pct is None else f"{s.other_cpu_pct:.0f}",
                    s.error or "ok",
                ]
                for s in outcome.sections
            ],
        ),
    ]
    for section in outcome.sections:
        lines += ["", render_section(section, level=3)]
    return "\n".join(lines) + "\n"


def splice(existing: str, block: str) -> str | None:
    """``existing`` with the text between the markers replaced by ``block``; None without them."""
    begin = existing.find(BEGIN_MARKER)
    end = existing.find(END_MARKER)
    if begin < 0 or end < begin:
        return None
    head = existing[: begin + len(BEGIN_MARKER)]
    return f"{head}\n{block.rstrip()}\n{existing[end:]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~2 min)")
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the document here (only between the benchmark markers if the file has them)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"total seconds for all sections (default {DEFAULT_BUDGET_S:.0f}, "
        f"quick {QUICK_BUDGET_S:.0f})",
    )
    p.add_argument("--section-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section_child:
        return child_main(args.section_child, args.quick)
    names = list(SECTIONS) if args.only is None else [n.strip() for n in args.only.split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
        return 2
    budget = args.budget_s or (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    env = environment()
    outcome = run_sections(names, quick=args.quick, budget_s=budget)
    command = "python -m benchmarks" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:]) if a]
    )
    doc = render_document(outcome, env, quick=args.quick, command=command.strip())
    print(doc, flush=True)
    if args.out:
        target = args.out
        old = target.read_text() if target.is_file() else ""
        spliced = splice(old, doc)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(doc if spliced is None else spliced)
        print(f"# wrote {target}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "total_s": outcome.total_s,
                    "sections": [json.loads(s.to_json()) for s in outcome.sections],
                },
                indent=2,
            )
            + "\n"
        )
    print(f"# total {outcome.total_s:.0f} s", file=sys.stderr)
    return 0 if all(s.error is None for s in outcome.sections) else 1
