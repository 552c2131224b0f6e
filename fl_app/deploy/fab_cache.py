"""The warm launcher's FAB cache: install a FAB once per hash, import its ClientApp once.

Why: Flower's ``run_clientapp`` calls ``install_from_fab`` for every message: it unzips the
FAB into a temporary folder, verifies every file's hash against the FAB's ``CONTENT``
manifest, and then, since the project folder ``~/.flwr/apps/<publisher>.<name>.<version>.
<hash[:8]>`` already exists, returns it and throws the extraction away (~0.8 s a message
under load). The installed folder is then imported anew in every message's process
(~0.5 s for ``fl_app.client.app``). Both are the same work for every message of a run.

What this does, in the launcher's own processes (nothing in Flower is edited; the
SuperNode is untouched):

* **Install memo.** :func:`memo_install` wraps Flower's ``install_from_fab`` for one
  child. A FAB whose SHA-256 equals the hash of a FAB a previous child installed with
  Flower's own function returns that folder: the same bytes (the hash covers the whole
  archive) give the same verified install, and Flower itself never re-verifies the
  installed folder (it returns it early when it exists), so nothing is checked less.
  Any other FAB goes through Flower's install, and its hash and folder are reported to
  the launcher through a pipe.
* **One zygote per FAB hash.** Once a FAB hash is known installed, the launcher forks a
  *zygote* (:func:`start_zygote`) from its pristine, third-party-imports-only state; the
  zygote imports that FAB's ClientApp module with Flower's own ``load_app`` (and runs
  the module's ``prewarm()``, which imports what its handlers import lazily) and then
  forks one child per message, which finds the modules already in ``sys.modules``. A
  message still runs in a fresh process (a fork of the zygote), so nothing one message
  leaves in module state reaches another; the zygote holds exactly the launcher's state
  plus one FAB's import, never two FABs' (a new hash gets a new zygote, the old one is
  retired), so a new FAB can never run with a previous FAB's modules.
* **The FAB's modules, not the launcher's.** The launcher runs as ``python -m
  fl_app.deploy.warm_clientapp``, so its own ``fl_app`` package is in ``sys.modules``;
  Flower's ``load_app`` imports a module only when it is not there yet, so without
  :func:`purge_shadowed` a child would run the launcher's installed ``fl_app`` instead of
  the submitted FAB. Every module whose top-level name the FAB folder provides is
  removed before the FAB is imported (in the zygote, and in a child that installs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Zygote",
    "fab_top_level_names",
    "memo_install",
    "purge_shadowed",
    "read_report",
    "start_zygote",
    "zygote_loop",
]

# One line per report/dispatch; a pipe write up to PIPE_BUF (>= 512 bytes) is atomic.
_MAX_LINE = 4096


def fab_top_level_names(project_dir: Path) -> set[str]:
    """Top-level module names the FAB folder provides: packages (folders with an
    ``__init__.py``) and ``.py`` files at its root."""
    names = {p.stem for p in project_dir.glob("*.py")}
    names.update(p.name for p in project_dir.iterdir() if (p / "__init__.py").is_file())
    return names


def purge_shadowed(project_dir: Path) -> list[str]:
    """Drop from ``sys.modules`` every module the FAB at ``project_dir`` provides (by
    top-level name), so the next import loads the FAB's copy. Returns the names removed.
    Code already running keeps its module globals; only later imports are affected."""
    tops = fab_top_level_names(project_dir)
    gone = sorted(m for m in sys.modules if m.partition(".")[0] in tops)
    for name in gone:
        del sys.modules[name]
    return gone


def read_report(fd: int) -> tuple[str, Path] | None:
    """The ``(fab hash, installed folder)`` a child wrote on ``fd`` (closed here), or None
    when it installed nothing (it failed earlier, or the FAB came from the memo)."""
    try:
        data = os.read(fd, _MAX_LINE)
    finally:
        os.close(fd)
    digest, sep, folder = data.decode().strip().partition("\t")
    if not sep or len(digest) != 64 or not folder:
        return None
    return digest, Path(folder)


def memo_install(
    flower_install: Callable[..., Path],
    memo: tuple[str, Path] | None,
    report_fd: int | None,
) -> Callable[..., Path]:
    """A drop-in for Flower's ``install_from_fab(fab_file, install_dir, skip_prompt)``.

    ``memo`` is ``(hash, folder)`` of the FAB this process's zygote installed and
    imported: the same bytes return that folder without unzipping. Anything else is
    installed by ``flower_install``, the FAB's modules are purged from ``sys.modules``
    (:func:`purge_shadowed`), and ``hash<TAB>folder`` is written to ``report_fd``."""

    def install(fab_file: Any, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        digest = hashlib.sha256(fab_file).hexdigest() if isinstance(fab_file, bytes) else ""
        if memo is not None and install_dir is None and digest == memo[0]:
            return memo[1]
        path = Path(flower_install(fab_file, install_dir=install_dir, skip_prompt=skip_prompt))
        purge_shadowed(path)
        if report_fd is not None and digest:
            os.write(report_fd, f"{digest}\t{path}\n".encode())
        return path

    return install


@dataclass
class Zygote:
    """A forked process that imported one FAB and forks a child per message it is sent."""

    fab_hash: str
    pid: int
    fd: int  # write end of the zygote's task pipe

    def send(self, task_id: int, token: str) -> bool:
        """Hand a task to the zygote; False when it is gone (the caller runs the task
        another way)."""
        try:
            os.write(self.fd, f"{task_id}\t{token}\n".encode())
        except OSError:
            return False
        return True

    def retire(self) -> None:
        """Close the task pipe: the zygote finishes its running messages and exits."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def start_zygote(
    fab_hash: str,
    fab_dir: Path,
    load: Callable[[Path], object],
    serve_task: Callable[[int, str], int],
    close_fds: Iterable[int] = (),
) -> Zygote:
    """Fork a zygote for the FAB ``fab_hash`` installed at ``fab_dir``: it closes
    ``close_fds`` (other zygotes' pipes, which it must not keep open), purges the modules
    the FAB shadows and calls ``load(fab_dir)`` (the ClientApp import; a failure, e.g. a
    broken FAB or its folder gone, is printed and the zygote still serves: its messages
    then meet the same failure in their own processes and Flower reports it, as without
    the cache; a task handed to the zygote is never dropped), then runs
    :func:`zygote_loop` with ``serve_task``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read_fd)
        return Zygote(fab_hash, pid, write_fd)
    code = 1
    try:
        os.close(write_fd)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            t0 = time.perf_counter()
            purge_shadowed(fab_dir)
            load(fab_dir)
            took = time.perf_counter() - t0
            print(f"warm ClientApp launcher: FAB {fab_hash[:8]} imported in {took:.2f}s "
                  f"by zygote {os.getpid()}", flush=True)  # fmt: skip
        except Exception as ex:  # the messages meet it again and report it through Flower
            print(f"warm ClientApp launcher: FAB {fab_hash[:8]} import failed: {ex!r}",
                  file=sys.stderr, flush=True)  # fmt: skip
        zygote_loop(read_fd, serve_task)
        code = 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def zygote_loop(read_fd: int, serve_task: Callable[[int, str], int]) -> int:
    """Read ``task_id<TAB>token`` lines until the pipe closes (a last line without its
    newline is a torn write, not a task); ``serve_task(task_id, token)`` forks the
    message's child and returns its PID. Reaps its finished children as it goes and waits
    for the rest at the end. Returns the number of tasks served."""
    live: set[int] = set()
    served = 0
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        for line in _lines(pipe):
            task_id, _, token = line.partition("\t")
            live.add(serve_task(int(task_id), token))
            served += 1
            live -= {pid for pid in live if os.waitpid(pid, os.WNOHANG)[0]}
    for pid in live:
        os.waitpid(pid, 0)
    return served


def _lines(pipe: Any) -> Iterable[str]:
    buf = b""
    while chunk := pipe.read(_MAX_LINE):
        buf += chunk
        *complete, buf = buf.split(b"\n")
        yield from (c.decode() for c in complete if c)
