"""A warm ClientApp launcher for a SuperNode started with ``--isolation process``.

Why: with the default ``--isolation subprocess`` the SuperNode starts Flower's SuperExec,
which starts a fresh ``flwr-clientapp`` process for every message; each one imports
torch and Opacus again (5-12 s of a round on a loaded 2-core machine, see
docs/performance.md "Deployment rounds"). Flower 1.42's ``flwr-clientapp`` serves exactly
one task token and exits, so a ClientApp process cannot itself live across messages.
This launcher takes SuperExec's place instead: it imports the heavy third-party modules
once, polls the SuperNode's Runtime API for ClientApp tasks (Flower's ``AcquireTask``, as
``flower-superexec`` does) and forks one child per task that runs Flower's own
``run_clientapp`` with the task's token.

Why fork rather than one long-lived process serving every message: each message still
runs in a fresh process whose memory is the launcher's pristine, import-only state, so
nothing a ClientApp leaves in module state (fl_app.client.state's per-site state, RNGs,
Opacus hooks) can leak into the next message or run; the process model is the one
Flower's subprocess isolation gives, minus the imports. The launcher itself never
preloads the FAB's code (``fl_app``): the first message of a FAB installs and imports it
in its own child, purging the launcher's own ``fl_app`` modules first so the submitted
FAB's copy runs; after that a zygote per FAB hash imports it once and forks that FAB's
messages (:mod:`fl_app.deploy.fab_cache`: Flower's per-message FAB unzip and re-import
skipped, a new FAB hash always installed and imported afresh). The launcher never uses
torch itself (no thread pools exist to be broken by fork).

Trust: the Runtime API listens on the SuperNode's loopback port without TLS or SuperExec
auth, exactly as for the SuperExec that ``--isolation subprocess`` starts; nothing new is
exposed. The launcher exits with its SuperNode (``--parent-pid``), and ``fl-app deploy``
starts it in the SuperNode's supervision (:class:`fl_app.deploy.procs.ProcessGroup`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fl_app.deploy.fab_cache import Zygote, memo_install, read_report, start_zygote

__all__ = [
    "LAUNCH_LINE",
    "OBJECT_PULL_BACKOFF_CAP_S",
    "OBJECT_PULL_BACKOFF_S",
    "PRELOAD",
    "Launcher",
    "load_fab_clientapp",
    "main",
    "preload",
    "reap",
    "run_message",
    "run_task_in_child",
    "serve",
    "supervise",
]

# Third-party modules a ClientApp message imports (found by listing a forked child's
# new sys.modules after a train message), loaded once in the launcher. Never fl_app: the
# child must import the FAB's copy (see the module docstring).
PRELOAD = (
    "numpy",
    "scipy.stats",
    "torch",
    "torch.nn",
    "torch.optim",
    "torch._dynamo",  # torch.optim.Optimizer.__init__ imports it lazily: ~6 s a message
    "torch.utils.data",
    "opacus",
    "dp_accounting",
    "sklearn.datasets",
    "pandas",
    "pyarrow",
    "datasets",  # Hugging Face datasets, under flwr_datasets (with matplotlib)
    "flwr_datasets",
    "flwr_datasets.partitioner",
    "cryptography.hazmat.primitives.ciphers",
    "omegaconf",
    "yaml",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)

POLL_SECONDS = 0.05
LAUNCH_LINE = "warm ClientApp launcher: started"
# A child's retry schedule for the message objects it pulls from its own SuperNode.
# The launcher acquires a task as soon as the SuperNode registers the message, which is
# before the SuperNode has pulled the message's objects from the SuperLink (~0.4 s on
# loopback); Flower's first retry then waits PULL_INITIAL_BACKOFF = 1 s (0.8-1.2 s with
# jitter), doubling to 10 s, a schedule meant for a remote server. Measured: the child
# got its objects 0.87 s (median) after the SuperNode had them, every exchange
# (docs/performance.md, "Deployment rounds"). On loopback a retry costs a local RPC, so
# the child retries after 50 ms, doubling to at most 0.25 s; Flower's 2 h pull limit
# (PULL_MAX_TIME) still bounds the wait, not a count of tries (500 tries of 0.25 s would
# cut off a large model the SuperNode is still downloading after ~2 min).
OBJECT_PULL_BACKOFF_S = 0.05
OBJECT_PULL_BACKOFF_CAP_S = 0.25


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import ``modules``; return the ones that failed (a missing optional one only costs
    the child its import, as before)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def reap() -> list[tuple[int, int]]:
    """Collect finished children without blocking: [(pid, exit status)]."""
    done: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, os.waitstatus_to_exitcode(status)))


def run_task_in_child(run: Callable[[], None]) -> int:
    """Fork; the child calls ``run`` and leaves with its exit code (``os._exit``: the
    parent's exit handlers and buffered state are not the child's to run). Returns the
    child's PID in the parent."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        run()
        code = 0
    except SystemExit as ex:  # flwr_exit ends every run_clientapp with sys.exit
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except BaseException:  # the child must never return into the loop
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def load_fab_clientapp(fab_dir: Path) -> object:
    """Import the ClientApp the FAB at ``fab_dir`` names, as Flower's loader does (its
    ``load_app``: the folder put first on ``sys.path``, the module kept in
    ``sys.modules``, where a later ``load_app`` in a forked child finds it), then call
    the module's ``prewarm()`` when it has one (fl-app's imports what its handlers import
    lazily, :func:`fl_app.client.app.prewarm`). A failing ``prewarm`` is printed and the
    app still served: it only costs each message the work it would have saved."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.config import get_project_config
    from flwr.supercore.object_ref import load_app

    ref = get_project_config(fab_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
    app = load_app(ref, LoadClientAppError, fab_dir)
    hook = getattr(sys.modules.get(ref.partition(":")[0]), "prewarm", None)
    if callable(hook):
        try:
            hook()
        except Exception as ex:  # an optimisation must not stop the FAB
            print(f"warm ClientApp launcher: {ref} prewarm failed: {ex!r}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return app


def run_message(
    runtime_api_address: str,
    token: str,
    *,
    parent_pid: int,
    memo: tuple[str, Path] | None,
    report_fd: int | None,
    close_fds: Sequence[int] = (),
) -> None:
    """One message, in its forked child: Flower's ``run_clientapp`` with its
    ``install_from_fab`` wrapped by :func:`fl_app.deploy.fab_cache.memo_install` and its
    message pull retrying after :data:`OBJECT_PULL_BACKOFF_S` (in this child's copy of Flower's
    module only; the launcher's is never changed)."""
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    from flwr.supernode.runtime import run_clientapp as rc

    rc.install_from_fab = memo_install(rc.install_from_fab, memo, report_fd)
    rc.pull_and_inflate_object_from_tree = functools.partial(
        rc.pull_and_inflate_object_from_tree,
        initial_backoff=OBJECT_PULL_BACKOFF_S,
        backoff_cap=OBJECT_PULL_BACKOFF_CAP_S,
        max_tries_per_object=None,
    )
    rc.run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=True,
        certificates=None,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


class Launcher:
    """Routes each task: to the zygote of its FAB hash when there is one, else to a
    plain forked child that installs the FAB (Flower's install) and reports it, after
    which a zygote for that hash is started (:mod:`fl_app.deploy.fab_cache`). One zygote
    at a time: a new FAB hash retires the previous one."""

    def __init__(
        self,
        runtime_api_address: str,
        load: Callable[[Path], object] = load_fab_clientapp,
        run: Callable[..., None] = run_message,
    ) -> None:
        self.address = runtime_api_address
        self.load = load
        self.run = run  # run_message; tests pass a stand-in without a SuperNode
        self.zygote: Zygote | None = None
        self.pending: dict[int, int] = {}  # plain child PID -> read end of its report pipe

    def dispatch(self, task_id: int, fab_hash: str, token: str) -> int | None:
        """Start the task; the plain child's PID, or None when a zygote took it."""
        z = self.zygote
        if z is not None and z.fab_hash == fab_hash and z.send(task_id, token):
            return None
        read_fd, write_fd = os.pipe()
        others = [read_fd, *self.pending.values(), *([z.fd] if z is not None else [])]
        run = functools.partial(
            self.run, self.address, token, parent_pid=os.getpid(), memo=None,
            report_fd=write_fd, close_fds=others,
        )  # fmt: skip
        pid = run_task_in_child(run)
        os.close(write_fd)
        self.pending[pid] = read_fd
        # scripts/profile_deploy.py times the launch from this line.
        print(f"{LAUNCH_LINE} task {task_id} in child {pid}", flush=True)
        return pid

    def collect(self) -> list[tuple[int, int]]:
        """Reap finished children; start a zygote for a FAB a child installed."""
        done = reap()
        for pid, _code in done:
            if self.zygote is not None and pid == self.zygote.pid:
                self.zygote.retire()
                self.zygote = None
            fd = self.pending.pop(pid, None)
            report = read_report(fd) if fd is not None else None
            if report is not None and (self.zygote is None or self.zygote.fab_hash != report[0]):
                self.start_zygote(*report)
        return done

    def start_zygote(self, fab_hash: str, fab_dir: Path) -> None:
        old = self.zygote
        others = [*self.pending.values(), *([old.fd] if old is not None else [])]

        def serve_task(task_id: int, token: str) -> int:  # runs in the zygote
            run = functools.partial(
                self.run, self.address, token, parent_pid=os.getpid(),
                memo=(fab_hash, fab_dir), report_fd=None,
            )  # fmt: skip
            pid = run_task_in_child(run)
            print(f"{LAUNCH_LINE} task {task_id} in child {pid}", flush=True)
            return pid

        self.zygote = start_zygote(fab_hash, fab_dir, self.load, serve_task, others)
        if old is not None:
            old.retire()

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.retire()
        for fd in self.pending.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def serve(
    runtime_api_address: str,
    *,
    parent_pid: int | None = None,
    poll_seconds: float = POLL_SECONDS,
    max_tasks: int | None = None,
) -> None:
    """Poll the SuperNode at ``runtime_api_address`` for ClientApp tasks and start each
    (:class:`Launcher`); return after ``max_tasks`` tasks (None: run until killed)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    launcher = Launcher(runtime_api_address)
    launched = 0
    try:
        while max_tasks is None or launched < max_tasks:
            launcher.collect()
            res = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)])
            )
            if res.HasField("task") and res.token:
                launcher.dispatch(res.task.task_id, res.task.fab_hash, res.token)
                launched += 1
                continue
            time.sleep(poll_seconds)
    finally:
        launcher.close()
        client.close()


def supervise(
    node_cmd: Sequence[str],
    launcher_cmd: Callable[[int], Sequence[str]],
    env: Mapping[str, str],
) -> int:
    """``fl-app deploy supernode --warm-clientapps``: run the SuperNode in the foreground
    and its launcher (``launcher_cmd(supernode_pid)``) beside it; SIGTERM/SIGINT reach
    both, the launcher is stopped when the SuperNode exits, and the SuperNode's exit
    status is returned. A launcher that dies while its SuperNode lives stops the SuperNode
    (status 1): a SuperNode that can run no ClientApp must not stay online."""
    import signal
    import subprocess

    node = subprocess.Popen(list(node_cmd), env=dict(env))
    launcher = subprocess.Popen(list(launcher_cmd(node.pid)), env=dict(env))

    def forward(signum: int, _frame: object) -> None:
        for proc in (launcher, node):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (code := node.poll()) is None:
            if launcher.poll() is not None:
                print(
                    f"warm ClientApp launcher exited ({launcher.returncode}); stopping the "
                    "SuperNode",
                    file=sys.stderr,
                    flush=True,
                )
                node.terminate()
                node.wait(timeout=30)
                return 1
            time.sleep(0.2)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if launcher.poll() is None:
            launcher.terminate()
            try:
                launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fl_app.deploy.warm_clientapp",
        description="Warm ClientApp launcher for a SuperNode with --isolation process",
    )
    ap.add_argument("--runtime-api-address", required=True)
    ap.add_argument("--parent-pid", type=int)
    ap.add_argument("--poll-seconds", type=float, default=POLL_SECONDS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    missing = preload()
    print(
        f"warm ClientApp launcher: preloaded in {time.perf_counter() - t0:.1f}s"
        + (f" (not installed: {missing})" if missing else ""),
        flush=True,
    )
    serve(args.runtime_api_address, parent_pid=args.parent_pid, poll_seconds=args.poll_seconds)


if __name__ == "__main__":
    main()
