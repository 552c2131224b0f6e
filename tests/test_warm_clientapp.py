"""The warm ClientApp launcher (fl_app.deploy.warm_clientapp) and its command lines.

The launcher's whole end-to-end path (a SuperNode with --isolation process, the
launcher polling its Runtime API, DP-SGD under SecAgg+ over TLS) is run by
tests/test_deploy.py::test_tls_node_auth_federation_runs_dpsgd_under_secagg, whose
Federation starts warm launchers by default. These are the fast unit guarantees.
"""

from __future__ import annotations

import os
import sys
import time

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
    [(0, 0), (1, 0), (2, 0), (3, 7), (4, 1), (5, 1)],
)
def test_child_exit_code_is_the_tasks(case: int, expected: int) -> None:
    # Parametrized by index (mutmut): return, SystemExit(None), SystemExit(0),
    # SystemExit(7) as flwr_exit leaves, SystemExit("text"), an exception.
    runs = [
        lambda: None,
        lambda: _exit_with(None),
        lambda: _exit_with(0),
        lambda: _exit_with(7),
        lambda: _exit_with("text"),
        _boom,
    ]
    pid = warm.run_task_in_child(runs[case])
    assert pid != os.getpid()
    assert _wait(pid) == expected


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


def test_supervise_stops_a_supernode_whose_launcher_died() -> None:
    t0 = time.monotonic()
    code = warm.supervise(
        _py("import time; time.sleep(60)"), lambda pid: _py("raise SystemExit(5)"), os.environ
    )
    assert code == 1
    assert time.monotonic() - t0 < 30
