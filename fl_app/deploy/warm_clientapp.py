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
Flower's subprocess isolation gives, minus the imports. The FAB's own code (``fl_app``)
is never preloaded: Flower loads it in the child from the installed FAB's folder, so a
new FAB version takes effect exactly as before. The launcher never uses torch itself
(no thread pools exist to be broken by fork).

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

__all__ = [
    "LAUNCH_LINE",
    "PRELOAD",
    "main",
    "preload",
    "reap",
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


def serve(
    runtime_api_address: str,
    *,
    parent_pid: int | None = None,
    poll_seconds: float = POLL_SECONDS,
    max_tasks: int | None = None,
) -> None:
    """Poll the SuperNode at ``runtime_api_address`` for ClientApp tasks and run each in
    a forked child; return after ``max_tasks`` tasks (None: run until killed)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    me = os.getpid()
    launched = 0
    try:
        while max_tasks is None or launched < max_tasks:
            reap()
            res = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)])
            )
            if res.HasField("task") and res.token:
                pid = run_task_in_child(
                    functools.partial(
                        run_clientapp,
                        runtime_api_address=runtime_api_address,
                        token=res.token,
                        insecure=True,
                        certificates=None,
                        parent_pid=me,
                        runtime_dependency_install=False,
                    )
                )
                # scripts/profile_deploy.py times the launch from this line.
                print(f"{LAUNCH_LINE} task {res.task.task_id} in child {pid}", flush=True)
                launched += 1
                continue
            time.sleep(poll_seconds)
    finally:
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
