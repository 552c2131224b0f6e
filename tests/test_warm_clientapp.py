"""The warm ClientApp launcher (fl_app.deploy.warm_clientapp) and its command lines.

The launcher's whole end-to-end path (a SuperNode with --isolation process, the
launcher polling its Runtime API, DP-SGD under SecAgg+ over TLS) is run by
tests/test_deploy.py::test_tls_node_auth_federation_runs_dpsgd_under_secagg, whose
Federation starts warm launchers by default. These are the fast unit guarantees.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import ClassVar

import pytest

from fl_app.deploy import DeployError
from fl_app.deploy import warm_clientapp as warm
from fl_app.deploy.procs import supernode_command, warm_clientapp_command

# Module state a ClientApp might leave behind; the child mutates it, the parent must not
# see it, and the next child must start from the parent's value.
_STATE: dict[str, int] = {"messages": 0}


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _exit_with(code: object) -> None:
    raise SystemExit(code)


def _boom() -> None:
    raise RuntimeError("ClientApp bug")


@pytest.mark.parametrize(
    ("case", "expected"),
    [(0, 0), (1, 0), (2, 0), (3, 7), (4, 1), (5, 1), (6, 0)],
)
def test_child_exit_code_is_the_tasks(case: int, expected: int) -> None:
    # Parametrized by index (mutmut): return, SystemExit(None), SystemExit(0),
    # SystemExit(7) as flwr_exit leaves, SystemExit("text"), an exception, a stdout whose
    # flush fails (the child still leaves with its own code).
    runs = [
        lambda: None,
        lambda: _exit_with(None),
        lambda: _exit_with(0),
        lambda: _exit_with(7),
        lambda: _exit_with("text"),
        _boom,
        _break_stdout,
    ]
    pid = _fork_guarded(runs[case])
    assert pid != os.getpid()
    assert _wait(pid) == expected


class _BadStream:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        raise OSError("stdout gone")


def _break_stdout() -> None:
    sys.stdout = _BadStream()  # type: ignore[assignment]  # in the child only


def _fork_guarded(run) -> int:
    """run_task_in_child, where a child that escaped back into the caller (it must leave
    through os._exit) ends with status 99 instead of running the rest of the session."""
    me = os.getpid()
    try:
        return warm.run_task_in_child(run)
    except BaseException:
        if os.getpid() != me:
            os._exit(99)
        raise


def test_a_message_never_sees_the_previous_ones_module_state() -> None:
    """Per-message processes, as Flower's subprocess isolation: what one ClientApp run
    leaves in module state is gone for the next and never reaches the launcher."""

    def message() -> None:
        _STATE["messages"] += 1
        # Exit code = the count this message saw: 1 iff it started from pristine state.
        raise SystemExit(_STATE["messages"])

    first = _wait(warm.run_task_in_child(message))
    second = _wait(warm.run_task_in_child(message))
    assert (first, second) == (1, 1)
    assert _STATE["messages"] == 0


def test_reap_collects_finished_children_with_their_codes() -> None:
    warm.reap()  # children other tests in this process may have left
    pid = warm.run_task_in_child(lambda: _exit_with(3))
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # finished, not yet collected
    assert warm.reap() == [(pid, 3)]
    assert warm.reap() == []


def test_the_fab_code_is_never_preloaded() -> None:
    """Flower imports the ClientApp from the installed FAB's folder only if fl_app is not
    already in sys.modules (flwr.supercore.object_ref.load_app); a preloaded fl_app would
    run the launcher's copy instead of the submitted FAB."""
    assert warm.PRELOAD
    assert not [m for m in warm.PRELOAD if m.split(".")[0] == "fl_app"]
    assert "torch" in warm.PRELOAD


def test_preload_reports_what_is_not_installed() -> None:
    assert warm.preload(["json", "no_such_module_fl_app_test"]) == ["no_such_module_fl_app_test"]


def test_supernode_process_isolation_and_its_launcher() -> None:
    common = {"root_certificates": "ca.crt", "private_key": "k", "node_config": "", "port": 9111}
    default = supernode_command("sl:9093", **common)
    assert "--isolation" not in default  # Flower's default, unchanged
    cmd = supernode_command("sl:9093", **common, isolation="process")
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--port") + 1] == "9111"
    with pytest.raises(DeployError, match="isolation must be 'subprocess' or 'process'"):
        supernode_command("sl:9093", **common, isolation="thread")
    launcher = warm_clientapp_command(9111, 4242)
    assert launcher[:3] == [sys.executable, "-m", "fl_app.deploy.warm_clientapp"]
    assert launcher[launcher.index("--runtime-api-address") + 1] == "127.0.0.1:9111"
    assert launcher[launcher.index("--parent-pid") + 1] == "4242"


def test_deploy_supernode_warm_clientapps_prints_both_commands(capsys) -> None:
    from fl_app.cli.deploy import deploy_main

    argv = ["supernode", "--superlink", "sl:1", "--insecure", "--port", "9123", "--print"]
    assert deploy_main(argv) == 0
    assert "--isolation" not in capsys.readouterr().out  # opt-in
    assert deploy_main([*argv, "--warm-clientapps"]) == 0
    node, launcher = capsys.readouterr().out.strip().splitlines()
    assert "--isolation process" in node and "--port 9123" in node
    assert "-m fl_app.deploy.warm_clientapp --runtime-api-address 127.0.0.1:9123" in launcher
    assert launcher.endswith("--parent-pid '<supernode-pid>'")


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_supervise_returns_the_supernodes_status_and_stops_the_launcher() -> None:
    launched: list[int] = []

    def launcher(pid: int) -> list[str]:
        launched.append(pid)
        return _py("import time; time.sleep(60)")

    t0 = time.monotonic()
    code = warm.supervise(
        _py("import time, sys; time.sleep(0.5); sys.exit(3)"), launcher, os.environ
    )
    assert code == 3
    assert len(launched) == 1 and launched[0] > 0  # given the SuperNode's PID
    assert time.monotonic() - t0 < 30  # the 60 s launcher was stopped, not waited for


def test_supervise_stops_a_supernode_whose_launcher_died(capfd) -> None:
    t0 = time.monotonic()
    code = warm.supervise(
        _py("import time; time.sleep(60)"), lambda pid: _py("raise SystemExit(5)"), os.environ
    )
    assert code == 1
    assert time.monotonic() - t0 < 30
    assert "warm ClientApp launcher exited (5); stopping the SuperNode\n" in capfd.readouterr().err


def test_supervise_gives_both_processes_its_environment() -> None:
    env = {**os.environ, "FL_APP_TEST_SUPERVISE": "3"}
    # The launcher exits at once only if it got env (else it would sleep 60 s) ...
    launcher = _py(
        "import os, time; time.sleep(0 if os.environ.get('FL_APP_TEST_SUPERVISE') else 60)"
    )
    t0 = time.monotonic()
    assert warm.supervise(_py("import time; time.sleep(60)"), lambda pid: launcher, env) == 1
    assert time.monotonic() - t0 < 30
    # ... and the SuperNode's status is the variable's value only if it got env.
    node = _py("import os, sys; sys.exit(int(os.environ.get('FL_APP_TEST_SUPERVISE', '9')))")
    sleeper = _py("import time; time.sleep(60)")
    assert warm.supervise(node, lambda pid: sleeper, env) == 3


def test_supervise_terminates_a_launcher_still_running_at_the_end(tmp_path) -> None:
    pid_file = tmp_path / "launcher.pid"
    launcher = _py(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                   "time.sleep(60)")  # fmt: skip
    node = _py(f"import os, time, sys\nwhile not os.path.exists({str(pid_file)!r}): "
               "time.sleep(0.05)\ntime.sleep(0.2)\nsys.exit(0)")  # fmt: skip
    assert warm.supervise(node, lambda pid: launcher, os.environ) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # stopped and reaped


def test_supervise_forwards_sigterm_to_the_supernode() -> None:
    """A SIGTERM to ``fl-app deploy supernode`` (here sent by the SuperNode stand-in to its
    parent, once supervise is running) reaches the SuperNode, whose status is returned."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    node = _py(
        "import os, signal, time\ntime.sleep(0.3)\nos.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(60)"
    )
    code = warm.supervise(node, lambda pid: _py("import time; time.sleep(60)"), os.environ)
    assert code == -signal.SIGTERM  # the SuperNode got the signal and ended by it
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler restored


class _FakeRuntime:
    """Stands in for Flower's RuntimeHttpClient: AcquireTask answers from a script."""

    def __init__(self, answers: list[object]) -> None:
        self.answers = answers
        self.requests: list[object] = []
        self.closed = False

    def AcquireTask(self, request: object) -> object:  # noqa: N802 (Flower's name)
        self.requests.append(request)
        return self.answers.pop(0)

    def close(self) -> None:
        self.closed = True


class _FakeLauncher:
    made: ClassVar[list[_FakeLauncher]] = []

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[object] = []
        _FakeLauncher.made.append(self)

    def collect(self) -> list[tuple[int, int]]:
        self.calls.append("collect")
        return []

    def dispatch(self, task_id: int, fab_hash: str, token: str) -> None:
        self.calls.append((task_id, fab_hash, token))

    def close(self) -> None:
        self.calls.append("close")


def test_serve_polls_acquires_and_hands_each_task_to_the_launcher(monkeypatch) -> None:
    """Only answers with a task and a token are dispatched (with the task's FAB hash);
    an empty answer waits ``poll_seconds``; the launcher and client are closed at the end."""
    import flwr.supercore.runtime as runtime
    from flwr.proto.runtime_pb2 import AcquireTaskResponse
    from flwr.proto.task_pb2 import Task

    answers: list[object] = [
        AcquireTaskResponse(),
        AcquireTaskResponse(task=Task(task_id=4, fab_hash="h4"), token=""),
        AcquireTaskResponse(task=Task(task_id=5, fab_hash="h5"), token="tok5"),
        AcquireTaskResponse(task=Task(task_id=6, fab_hash="h6"), token="tok6"),
    ]
    fake = _FakeRuntime(answers)
    made: list[dict[str, object]] = []

    def from_server_address(**kwargs: object) -> _FakeRuntime:
        made.append(kwargs)
        return fake

    monkeypatch.setattr(runtime.RuntimeHttpClient, "from_server_address", from_server_address)
    monkeypatch.setattr(warm, "Launcher", _FakeLauncher)
    import flwr.supercore.app_utils as app_utils

    monitored: list[int] = []
    monkeypatch.setattr(app_utils, "start_parent_process_monitor", monitored.append)
    _FakeLauncher.made.clear()
    sleeps: list[float] = []
    monkeypatch.setattr(warm.time, "sleep", sleeps.append)
    warm.serve("127.0.0.1:9111", parent_pid=4321, poll_seconds=0.25, max_tasks=2)
    assert monitored == [4321]  # the launcher exits with its SuperNode
    (launcher,) = _FakeLauncher.made
    assert launcher.address == "127.0.0.1:9111"
    assert launcher.calls == [
        "collect", "collect", "collect", (5, "h5", "tok5"), "collect", (6, "h6", "tok6"), "close"
    ]  # fmt: skip
    assert sleeps == [0.25, 0.25]  # after the empty answer and the token-less one
    assert fake.closed and answers == []
    assert [list(r.supported_task_types) for r in fake.requests] == [["flwr-clientapp"]] * 4
    (kwargs,) = made
    assert kwargs["server_address"] == "127.0.0.1:9111"
    assert kwargs["insecure"] is True and kwargs["root_certificates"] is None
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import RetryInvoker

    (interceptor,) = kwargs["interceptors"]  # type: ignore[misc]
    assert isinstance(interceptor, RuntimeVersionHttpInterceptor)
    assert interceptor._metadata.component_name == "SuperExec"  # as flower-superexec says
    assert isinstance(kwargs["retry_invoker"], RetryInvoker)


def test_main_preloads_then_serves_with_its_arguments(monkeypatch, capsys) -> None:
    got: list[tuple[object, ...]] = []
    monkeypatch.setattr(warm, "preload", lambda: ["missing_mod"])
    monkeypatch.setattr(warm, "serve", lambda *a, **k: got.append((a, k)))
    warm.main(["--runtime-api-address", "127.0.0.1:9", "--parent-pid", "77",
               "--poll-seconds", "0.5"])  # fmt: skip
    assert got == [(("127.0.0.1:9",), {"parent_pid": 77, "poll_seconds": 0.5})]
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"warm ClientApp launcher: preloaded in (\d+\.\d)s \(not installed: \['missing_mod'\]\)\n",
        out,
    )
    assert float(out.split(" in ")[1].split("s")[0]) < 60  # seconds taken, not a clock
    monkeypatch.setattr(warm, "preload", lambda: [])
    warm.main(["--runtime-api-address", "b:2"])
    assert re.fullmatch(
        r"warm ClientApp launcher: preloaded in \d+\.\ds\n", capsys.readouterr().out
    )
    warm.main(["--runtime-api-address", "a:1"])
    assert got[2] == (("a:1",), {"parent_pid": None, "poll_seconds": warm.POLL_SECONDS})
    with pytest.raises(SystemExit) as ex:
        warm.main([])
    assert ex.value.code == 2
    assert "the following arguments are required: --runtime-api-address" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        warm.main(["--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m fl_app.deploy.warm_clientapp ")
    assert "\nWarm ClientApp launcher for a SuperNode with --isolation process\n" in usage


def test_main_flushes_its_line_before_serving_forks(monkeypatch, tmp_path) -> None:
    """With a block-buffered stdout (a log file, no PYTHONUNBUFFERED) the preload line is
    written once: left in the buffer, every forked message would write it again."""
    import io

    path = tmp_path / "out.txt"
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(open(path, "wb", buffering=65536)))  # noqa: SIM115
    monkeypatch.setattr(warm, "preload", lambda: [])
    monkeypatch.setattr(warm, "serve", lambda *a, **k: _wait(warm.run_task_in_child(lambda: None)))
    warm.main(["--runtime-api-address", "a:1"])
    sys.stdout.flush()
    assert path.read_text().count("warm ClientApp launcher: preloaded in ") == 1
    assert warm.POLL_SECONDS == 0.05


def test_run_message_runs_flowers_clientapp_with_the_memo_install(monkeypatch, tmp_path) -> None:
    """The child calls Flower's run_clientapp for its token (no TLS on the loopback
    Runtime API, no runtime dependency installs) with install_from_fab wrapped: the
    memo's FAB returns its folder, any other goes to Flower's install."""
    from flwr.supernode.runtime import run_clientapp as rc

    flower_calls: list[object] = []
    monkeypatch.setattr(rc, "install_from_fab", lambda f, **k: flower_calls.append(f) or tmp_path)
    runs: list[dict[str, object]] = []
    monkeypatch.setattr(rc, "run_clientapp", lambda **k: runs.append(k))
    monkeypatch.setattr(
        rc, "pull_and_inflate_object_from_tree", rc.pull_and_inflate_object_from_tree
    )
    r, w = os.pipe()
    report_r, report_w = os.pipe()
    closed_r, closed_w = os.pipe()
    os.close(closed_r)
    os.close(closed_w)  # an fd already closed must not stop the message
    sha_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    sha_empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    warm.run_message("127.0.0.1:9", "tok", parent_pid=42, memo=(sha_abc, tmp_path / "m"),
                     report_fd=report_w, close_fds=[closed_r, r, w])  # fmt: skip
    assert runs == [
        {"runtime_api_address": "127.0.0.1:9", "token": "tok", "insecure": True,
         "certificates": None, "parent_pid": 42, "runtime_dependency_install": False}
    ]  # fmt: skip
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert rc.pull_and_inflate_object_from_tree.keywords == {
        "initial_backoff": 0.05, "backoff_cap": 0.25, "max_tries_per_object": None
    }  # fmt: skip
    assert rc.install_from_fab(b"abc", skip_prompt=True) == tmp_path / "m"
    assert flower_calls == []
    assert rc.install_from_fab(b"", skip_prompt=True) == tmp_path
    assert flower_calls == [b""]
    os.close(report_w)
    assert os.read(report_r, 4096) == f"{sha_empty}\t{tmp_path}\n".encode()
    os.close(report_r)


def test_a_childs_message_pull_retries_its_supernode_after_50_ms(monkeypatch) -> None:
    """The child's pull of the message objects (Flower's pull_and_inflate_object_from_tree,
    as run_clientapp calls it) retries an object the SuperNode does not hold yet after
    50 ms, doubling to 0.25 s, with no cap on tries (Flower's: 1 s, 10 s, 500 tries), and
    still inflates the message it was sent."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp as rc

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # a Message needs a task identity
    monkeypatch.setattr(rc, "run_clientapp", lambda **k: None)
    monkeypatch.setattr(rc, "install_from_fab", rc.install_from_fab)
    monkeypatch.setattr(
        rc, "pull_and_inflate_object_from_tree", rc.pull_and_inflate_object_from_tree
    )
    warm.run_message("127.0.0.1:9", "tok", parent_pid=1, memo=None, report_fd=None)

    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
        "config": ConfigRecord({"server-round": 3}),
    })  # fmt: skip
    msg = Message(content, dst_node_id=7, message_type="train")
    stored = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    asked: dict[str, int] = {}

    def pull(object_id: str) -> bytes:  # the SuperNode: each object missing at first ask
        asked[object_id] = asked.get(object_id, 0) + 1
        if asked[object_id] == 1:
            raise iu.ObjectUnavailableError(object_id)
        return stored[object_id]

    confirmed: list[str] = []
    got = rc.pull_and_inflate_object_from_tree(
        get_object_tree(msg), pull, confirmed.append, return_type=Message
    )
    assert asked == {oid: 2 for oid in stored}
    assert confirmed == [msg.object_id]
    np.testing.assert_array_equal(
        got.content["arrays"]["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3)
    )
    assert got.content["config"]["server-round"] == 3

    seen: dict[str, object] = {}
    monkeypatch.setattr(iu, "pull_objects", lambda ids, fn, **k: seen.update(k) or dict(stored))
    rc.pull_and_inflate_object_from_tree(get_object_tree(msg), pull, confirmed.append)
    assert {k: seen[k] for k in ("initial_backoff", "backoff_cap", "max_tries_per_object")} == {
        "initial_backoff": 0.05, "backoff_cap": 0.25, "max_tries_per_object": None
    }  # fmt: skip


# A train message in a process that imported only the ClientApp module and ran its
# prewarm(), as a zygote's child does: which fl_app modules did the message still import?
_PREWARM_PROBE = r"""
import json, sys
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

import fl_app.client.app as client

client.prewarm()
before = set(sys.modules)
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
loaded = load_file(sys.argv[1])
arrays = {k: Array(loaded[k]) for k in json.loads(sys.argv[3])}  # the model's order
config = ConfigRecord({"fl-app.spec": open(sys.argv[2]).read(), "server-round": 1})
msg = Message(RecordDict({"arrays": ArrayRecord(arrays), "config": config}),
              dst_node_id=1, message_type="train")
msg.metadata.__dict__["_message_id"] = "m-1"
ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
              state=RecordDict(), run_config={})
reply = client.app(msg, ctx)
print(json.dumps({
    "error": reply.error.reason if reply.has_error() else None,
    "new": sorted(m for m in set(sys.modules) - before if m.split(".")[0] == "fl_app"),
}))
"""


def test_prewarm_leaves_a_plain_train_message_nothing_of_fl_app_to_import(tmp_path) -> None:
    """fl_app.client.app.prewarm() (run once by each zygote) imports every fl_app module a
    default train message imports lazily, so no forked message pays for one: a name
    missing from WARM_MODULES fails here, naming the module."""
    import json
    import subprocess

    from fl_app.client_spec import encode_spec, spec_from_config
    from fl_app.config.compose import compose_config
    from fl_app.server.app import initial_arrays
    from fl_app.weights import save_safetensors

    cfg = compose_config("config", ["dataset.num_partitions=3"])
    weights = initial_arrays(cfg)
    save_safetensors(tmp_path / "w.safetensors", weights, {})
    (tmp_path / "spec.json").write_text(encode_spec(spec_from_config(cfg)))
    out = subprocess.run(
        [sys.executable, "-c", _PREWARM_PROBE, str(tmp_path / "w.safetensors"),
         str(tmp_path / "spec.json"), json.dumps(list(weights))],
        capture_output=True, text=True, timeout=240, check=True, cwd=tmp_path,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"error": None, "new": []}
