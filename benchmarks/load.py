"""How much CPU other processes used while a benchmark ran ("other CPU %").

The machine is shared: a number measured while another job used half the CPU is not
comparable with one from a quiet machine. :class:`LoadMonitor` samples ``/proc``
in a background thread: the machine's busy ticks (``/proc/stat``) minus the ticks of
the benchmark's own process tree (the given root and all its descendants, whatever
session they run in: Ray's processes and ``bench_rounds``' children included).
A process of ours that starts and ends between two samples is counted as "other",
so the figure is an upper bound; about 2-5 % is the floor on an idle machine.
Linux only; elsewhere it reports ``None``.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

from benchmarks.reuse import load_script

__all__ = ["LoadMonitor", "busy_ticks", "load_average"]


#: CPU ticks the whole machine spent busy (``/proc/stat``), or None off Linux; the
#: same reading ``scripts/bench_rounds.py`` takes for its "other CPU %" column.
busy_ticks = load_script("bench_rounds").busy_ticks


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _tree_ticks(root: int) -> dict[int, int]:
    """utime+stime of ``root`` and every live descendant, by pid."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parent[pid] = int(fields[1])
            ticks[pid] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in ticks and pid not in out:
            out[pid] = ticks[pid]
            stack.extend(children.get(pid, []))
    return out


class LoadMonitor:
    """Context manager measuring other processes' share of the machine's CPU.

    Parameters
    ----------
    root_pid
        The benchmark's process; it and its descendants are "ours". Default: this
        process.
    interval_s
        Sampling period.
    """

    def __init__(self, root_pid: int | None = None, interval_s: float = 0.5) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: expected > 0, found {interval_s!r}")
        self._root = os.getpid() if root_pid is None else root_pid
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_busy: int | None = None
        self._seen: dict[int, int] = {}
        self._foreign = 0
        self._t0 = 0.0
        self._elapsed = 0.0

    def _sample(self) -> None:
        busy = busy_ticks()
        now = _tree_ticks(self._root)
        # A process first seen now started after the last sample: all its ticks are new.
        ours = sum(t - self._seen.get(pid, 0) for pid, t in now.items())
        if busy is not None and self._last_busy is not None:
            delta = busy - self._last_busy
            self._foreign += max(0, delta - ours)
        self._last_busy = busy
        self._seen.update(now)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> LoadMonitor:
        self._seen = _tree_ticks(self._root)
        self._last_busy = busy_ticks()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="load-monitor")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._elapsed = time.monotonic() - self._t0

    @property
    def other_cpu_pct(self) -> float | None:
        """Other processes' share of the machine's CPU capacity over the window."""
        # Below a few samples a process of ours that came and went unseen dominates.
        if self._last_busy is None or self._elapsed < 4 * self._interval:
            return None
        capacity = self._elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return 100.0 * self._foreign / capacity if capacity else None
