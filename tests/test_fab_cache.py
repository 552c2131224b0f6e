"""The warm launcher's FAB cache (fl_app.deploy.fab_cache, issue 21): a FAB installed once
per hash, its ClientApp imported once per hash in a zygote, the FAB's modules (never the
launcher's own copy) run, a new FAB hash installed and imported afresh, and every message
still in a fresh process. Fast: fake FABs in tmp folders, forks, no SuperNode (the deploy
e2e test, tests/test_deploy.py, runs the real path).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import pytest

from fl_app.deploy import fab_cache
from fl_app.deploy import warm_clientapp as warm

# SHA-256 of b"abc" (FIPS 180-2, appendix B.1), so no test recomputes what the code does.
SHA_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


class _BufferedStreams:
    """sys.stdout and sys.stderr block-buffered into files, as in a launcher whose output
    goes to a log file without PYTHONUNBUFFERED: a line left unflushed before a fork is
    copied into the child's buffer and written twice. ``install()`` in the test body
    (pytest sets its own capture after fixtures), ``read(name)`` at the end."""

    def __init__(self, folder: Path, monkeypatch) -> None:
        self.folder = folder
        self.monkeypatch = monkeypatch
        self.files: dict[str, tuple[io.TextIOWrapper, Path]] = {}

    def install(self) -> None:
        for name in ("stdout", "stderr"):
            path = self.folder / f"{name}.txt"
            stream = io.TextIOWrapper(open(path, "wb", buffering=65536))  # noqa: SIM115
            self.monkeypatch.setattr(sys, name, stream)
            self.files[name] = (stream, path)

    def read(self, name: str) -> str:
        stream, path = self.files[name]
        stream.flush()
        return path.read_text()


@pytest.fixture
def buffered_streams(tmp_path: Path, monkeypatch) -> _BufferedStreams:
    return _BufferedStreams(tmp_path, monkeypatch)


def _write_fab(root: Path, pkg: str, origin: str) -> Path:
    """A FAB-like project folder: pyproject.toml naming ``<pkg>.app:app`` and a package
    whose import records where (which process) and from which copy it was imported."""
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text(f"ORIGIN = {origin!r}\n")
    (root / pkg / "app.py").write_text(
        "import os\n"
        "from flwr.clientapp import ClientApp\n"
        "IMPORTED_IN = os.getpid()\n"
        "STATE = {'messages': 0}\n"
        "app = ClientApp()\n"
    )
    (root / "pyproject.toml").write_text(
        '[project]\nname = "fabtest"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "t"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "x:y"\nclientapp = "{pkg}.app:app"\n'
    )
    return root


def _pkg() -> str:
    return f"fabpkg_{uuid.uuid4().hex[:10]}"


def _import_from(folder: Path, name: str) -> None:
    sys.path.insert(0, str(folder))
    try:
        __import__(name)
    finally:
        sys.path.remove(str(folder))


def _drop(prefix: str) -> None:
    for name in [m for m in sys.modules if m.partition(".")[0] == prefix]:
        del sys.modules[name]


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_top_level_names_are_the_fabs_packages_and_modules(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "data").mkdir()  # no __init__.py: not a package the FAB provides
    (tmp_path / "mod.py").write_text("")
    (tmp_path / "README.md").write_text("")
    assert fab_cache.fab_top_level_names(tmp_path) == {"pkg", "mod"}


def test_purge_drops_exactly_the_modules_the_fab_provides(tmp_path: Path) -> None:
    pkg = _pkg()
    _write_fab(tmp_path / "fab", pkg, "fab")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / f"{pkg}tail.py").write_text("")  # shares a prefix, not the name
    _import_from(tmp_path / "fab", f"{pkg}.app")
    _import_from(tmp_path / "other", f"{pkg}tail")
    try:
        assert fab_cache.purge_shadowed(tmp_path / "fab") == [pkg, f"{pkg}.app"]
        assert pkg not in sys.modules and f"{pkg}.app" not in sys.modules
        assert f"{pkg}tail" in sys.modules
    finally:
        _drop(pkg)
        _drop(f"{pkg}tail")


def _report(data: bytes) -> tuple[str, Path] | None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    got = fab_cache.read_report(read_fd)
    with pytest.raises(OSError):
        os.fstat(read_fd)  # closed by read_report
    return got


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (0, (SHA_ABC, Path("/h/apps/t.fab.1.ba7816bf"))),
        (1, None),  # nothing written: the child installed nothing
        (2, None),  # no tab
        (3, None),  # a digest that is not 64 hex characters long
        (4, None),  # no folder
        (5, (SHA_ABC, Path("/h/a\tb"))),  # the first tab splits: a folder may hold one
    ],
)
def test_read_report(case: int, expected: object) -> None:
    data = [
        f"{SHA_ABC}\t/h/apps/t.fab.1.ba7816bf\n".encode(),
        b"",
        f"{SHA_ABC} /h/apps/x\n".encode(),
        f"{SHA_ABC[:63]}\t/h/apps/x\n".encode(),
        f"{SHA_ABC}\t\n".encode(),
        f"{SHA_ABC}\t/h/a\tb\n".encode(),
    ][case]
    assert _report(data) == expected


class _FlowerInstall:
    """Stands in for Flower's install_from_fab: records its calls, returns ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[tuple[object, object, object]] = []

    def __call__(self, fab_file: object, install_dir: object = None, skip_prompt: bool = False):
        self.calls.append((fab_file, install_dir, skip_prompt))
        return self.folder


def test_memo_returns_the_installed_folder_for_the_same_fab_without_installing() -> None:
    flower = _FlowerInstall(Path("/elsewhere"))
    install = fab_cache.memo_install(flower, (SHA_ABC, Path("/h/apps/t.fab.1.ba7816bf")), None)
    assert install(b"abc", skip_prompt=True) == Path("/h/apps/t.fab.1.ba7816bf")
    assert flower.calls == []


def test_a_new_fab_hash_is_installed_purged_and_reported(tmp_path: Path) -> None:
    """The stale-FAB case: the memo holds another FAB's hash, so these bytes go through
    Flower's install, the modules they provide are dropped, and the launcher is told."""
    pkg = _pkg()
    fab = _write_fab(tmp_path / "fab", pkg, "fab")
    _import_from(fab, pkg)  # a previous copy of the FAB's package
    flower = _FlowerInstall(fab)
    read_fd, write_fd = os.pipe()
    install = fab_cache.memo_install(flower, ("0" * 64, Path("/h/apps/old")), write_fd)
    try:
        assert install(b"abc", skip_prompt=True) == fab
        assert flower.calls == [(b"abc", None, True)]
        assert pkg not in sys.modules
        os.close(write_fd)
        assert fab_cache.read_report(read_fd) == (SHA_ABC, fab)
    finally:
        _drop(pkg)


@pytest.mark.parametrize("case", [0, 1])
def test_memo_is_bypassed_for_another_install_dir_or_a_fab_file(case: int, tmp_path: Path) -> None:
    flower = _FlowerInstall(tmp_path)
    read_fd, write_fd = os.pipe()
    install = fab_cache.memo_install(flower, (SHA_ABC, Path("/memo")), write_fd)
    arg: object = [b"abc", tmp_path / "x.fab"][case]
    target = [tmp_path / "target", None][case]
    assert install(arg, install_dir=target, skip_prompt=False) == tmp_path
    assert flower.calls == [(arg, target, False)]
    os.close(write_fd)
    # Bytes are reported (a fresh install); a FAB file path has no digest here: nothing.
    raw = os.read(read_fd, 4096)
    os.close(read_fd)
    assert raw == [f"{SHA_ABC}\t{tmp_path}\n".encode(), b""][case]


def test_memo_forwards_flowers_default_prompt_setting(tmp_path: Path) -> None:
    flower = _FlowerInstall(tmp_path)
    fab_cache.memo_install(flower, None, None)(b"abc")
    assert flower.calls == [(b"abc", None, False)]  # Flower's own default: skip_prompt=False


def test_load_fab_clientapp_imports_the_fabs_clientapp(tmp_path: Path) -> None:
    from flwr.clientapp import ClientApp

    pkg = _pkg()
    fab = _write_fab(tmp_path / "fab", pkg, "fab")
    try:
        assert isinstance(warm.load_fab_clientapp(fab), ClientApp)
        assert sys.modules[f"{pkg}.app"].__file__ == str(fab / pkg / "app.py")
    finally:
        _drop(pkg)
        sys.path.remove(str(fab))


@pytest.mark.parametrize("body", ["CALLS.append(1)", "CALLS.append(1); raise OSError('x')"])
def test_load_fab_clientapp_calls_the_modules_prewarm_once(tmp_path: Path, capfd, body) -> None:
    """The zygote's import also runs the app module's prewarm() (fl-app's imports what its
    handlers import lazily); a prewarm that raises is reported and the app still loads."""
    from flwr.clientapp import ClientApp

    pkg = _pkg()
    fab = _write_fab(tmp_path / "fab", pkg, "fab")
    with open(fab / pkg / "app.py", "a") as f:
        f.write(f"CALLS = []\ndef prewarm():\n    {body}\n")
    try:
        assert isinstance(warm.load_fab_clientapp(fab), ClientApp)
        assert sys.modules[f"{pkg}.app"].CALLS == [1]
        err = capfd.readouterr().err
        assert ("prewarm failed: OSError('x')" in err) == ("raise" in body)
    finally:
        _drop(pkg)
        sys.path.remove(str(fab))


def test_load_fab_clientapp_raises_flowers_load_error(tmp_path: Path) -> None:
    from flwr.clientapp.client_app import LoadClientAppError

    pkg = _pkg()
    fab = _write_fab(tmp_path / "fab", pkg, "fab")
    (fab / pkg / "app.py").write_text("nothing = None\n")  # no `app` attribute
    try:
        with pytest.raises(LoadClientAppError, match="Unable to load attribute app"):
            warm.load_fab_clientapp(fab)
    finally:
        _drop(pkg)
        sys.path.remove(str(fab))


def _message_probe(out: Path, pkg: str, task_id: int) -> None:
    """A message in the zygote's child: what it finds of the FAB, and module state."""
    app = sys.modules.get(f"{pkg}.app")
    count = -1
    if app is not None:
        app.STATE["messages"] += 1
        count = app.STATE["messages"]
    record = {
        "preloaded_in": getattr(app, "IMPORTED_IN", None),
        "origin": getattr(sys.modules.get(pkg), "ORIGIN", None),
        "count": count,
        "pid": os.getpid(),
    }
    (out / f"{task_id}.json").write_text(json.dumps(record))


def _start_guarded(*args, **kwargs) -> fab_cache.Zygote:
    """start_zygote, where a zygote that escaped back into the caller (it must leave
    through os._exit) ends with status 99 instead of running the rest of the session."""
    me = os.getpid()
    try:
        return fab_cache.start_zygote(*args, **kwargs)
    except BaseException:
        if os.getpid() != me:
            os._exit(99)
        raise


def _wait_for(path: Path) -> bool:
    deadline = time.monotonic() + 20
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return path.exists()


def test_zygote_imports_the_fab_once_and_each_message_runs_in_a_fresh_child(
    tmp_path: Path, buffered_streams
) -> None:
    buffered_streams.install()
    pkg = _pkg()
    _write_fab(tmp_path / "launcher", pkg, "launcher")
    fab = _write_fab(tmp_path / "fab", pkg, "fab")
    _import_from(tmp_path / "launcher", f"{pkg}.app")  # the launcher's own copy
    out = tmp_path / "out"
    out.mkdir()

    def serve_task(task_id: int, token: str) -> int:
        assert token == f"token-{task_id}"
        return warm.run_task_in_child(lambda: _message_probe(out, pkg, task_id))

    not_open = 4000  # above any fd this process holds (a closed one could be reused)
    with pytest.raises(OSError):
        os.fstat(not_open)
    try:
        # An fd in close_fds that is not open must not stop the zygote.
        z = _start_guarded("a" * 64, fab, warm.load_fab_clientapp, serve_task, [not_open])
        assert z.send(1, "token-1")
        # Served as soon as it is sent, not when the pipe closes (reads never wait to fill
        # a buffer).
        assert _wait_for(out / "1.json")
        assert z.send(2, "token-2")
        z.retire()
        assert _exit_code(z.pid) == 0
        lines = buffered_streams.read("stdout").splitlines()
        (imported,) = [x for x in lines if "imported" in x]  # once: flushed before any fork
        match = re.fullmatch(
            r"warm ClientApp launcher: FAB aaaaaaaa imported in (\d+\.\d\d)s by zygote (\d+)",
            imported,
        )
        assert match and float(match[1]) < 60 and int(match[2]) == z.pid
        first, second = (json.loads((out / f"{i}.json").read_text()) for i in (1, 2))
        # Imported once, in the zygote, from the FAB's folder (not the launcher's copy).
        assert first["preloaded_in"] == second["preloaded_in"] == z.pid
        assert first["origin"] == second["origin"] == "fab"
        # Each message starts from the zygote's pristine state, in its own process.
        assert first["count"] == second["count"] == 1
        assert len({first["pid"], second["pid"], z.pid, os.getpid()}) == 4
        # The launcher (this process) is untouched.
        assert sys.modules[pkg].ORIGIN == "launcher"
        assert z.send(3, "token-3") is False  # retired: the caller runs it another way
    finally:
        _drop(pkg)
        if str(fab) in sys.path:
            sys.path.remove(str(fab))


@pytest.mark.parametrize("case", [0, 1])
def test_a_zygote_whose_import_fails_still_serves(
    case: int, tmp_path: Path, buffered_streams
) -> None:
    """A broken FAB (case 0) or its folder gone (case 1): the task handed over still runs
    (and meets the failure through Flower), it is never dropped with a dead zygote."""
    buffered_streams.install()
    out = tmp_path / "out"
    out.mkdir()

    def fail(_folder: Path) -> object:
        raise ImportError("broken FAB")

    def serve_task(task_id: int, _token: str) -> int:
        return warm.run_task_in_child(lambda: (out / f"{task_id}").write_text("ran"))

    folder = [tmp_path, tmp_path / "gone"][case]
    z = _start_guarded("b" * 64, folder, [fail, lambda _f: None][case], serve_task)
    z.send(7, "t")
    z.retire()
    assert _exit_code(z.pid) == 0
    assert (out / "7").read_text() == "ran"
    err = buffered_streams.read("stderr")
    why = ["ImportError('broken FAB')", "FileNotFoundError(2, 'No such file or directory')"]
    # Once: flushed before the message's fork.
    assert err.count(f"warm ClientApp launcher: FAB bbbbbbbb import failed: {why[case]}\n") == 1


def _break_stdout(_folder: Path) -> None:
    class Bad:
        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            raise OSError("stdout gone")

    sys.stdout = Bad()  # type: ignore[assignment]  # in the zygote only


@pytest.mark.parametrize(("case", "expected"), [(0, 1), (1, 0)])
def test_zygote_exit_status(case: int, expected: int, tmp_path: Path) -> None:
    """A zygote whose serving fails leaves with status 1 (case 0); one whose stdout fails
    still leaves through os._exit with 0 (case 1): never back into the caller."""

    def broken(_task_id: int, _token: str) -> int:
        raise RuntimeError("cannot fork")

    def fine(_task_id: int, _token: str) -> int:
        return warm.run_task_in_child(lambda: None)

    load = [lambda _f: None, _break_stdout][case]
    z = _start_guarded("c" * 64, tmp_path, load, [broken, fine][case])
    z.send(1, "t")
    z.retire()
    assert _exit_code(z.pid) == expected


def test_zygote_loop_serves_each_line_and_waits_for_its_children(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"1\ttok-a\n\n2\ttok")
    os.write(write_fd, b"-b\n3\ttok-c")  # a line split across writes; no final newline
    os.close(write_fd)
    seen: list[tuple[int, str]] = []
    pids: list[int] = []

    def serve_task(task_id: int, token: str) -> int:
        seen.append((task_id, token))
        pids.append(warm.run_task_in_child(lambda: time.sleep(0.2)))
        return pids[-1]

    assert fab_cache.zygote_loop(read_fd, serve_task) == 2
    assert seen == [(1, "tok-a"), (2, "tok-b")]
    for pid in pids:  # already waited for (reaped) by the loop
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_zygote_loop_reads_as_lines_arrive_and_reaps_finished_children() -> None:
    import threading

    read_fd, write_fd = os.pipe()

    first_served = threading.Event()
    timely: list[bool] = []

    def writer() -> None:
        os.write(write_fd, b"1\ttok\twith-tab\n2\tto")
        # Line 1 is served while the pipe is open (a read never waits to fill a buffer).
        timely.append(first_served.wait(10))
        time.sleep(0.3)  # the child of line 1 is done; it is reaped after line 2
        os.write(write_fd, b"k-b\n")
        os.close(write_fd)

    seen: list[tuple[int, str]] = []

    def serve_task(task_id: int, token: str) -> int:
        seen.append((task_id, token))
        first_served.set()
        return warm.run_task_in_child(lambda: None)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert fab_cache.zygote_loop(read_fd, serve_task) == 2
    finally:
        thread.join()
    assert seen == [(1, "tok\twith-tab"), (2, "tok-b")]
    assert timely == [True]


def test_launcher_close_closes_the_report_pipes_it_still_holds() -> None:
    launcher = warm.Launcher("a")
    r, w = os.pipe()
    gone_r, gone_w = os.pipe()
    os.close(gone_r)
    launcher.pending = {1: gone_r, 2: r}  # one already closed: the rest still closed
    launcher.close()
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)
    os.close(gone_w)


def _wait_reaped(launcher: warm.Launcher, *pids: int) -> None:
    """Collect until ``pids`` (children of this process) have been reaped by the launcher."""
    left = set(pids)
    deadline = time.monotonic() + 20
    while left and time.monotonic() < deadline:
        left -= {p for p, _ in launcher.collect()}
        time.sleep(0.01)
    assert not left, f"children {left} not reaped"


def test_launcher_routes_by_fab_hash_and_a_new_hash_reinstalls(
    tmp_path: Path, buffered_streams
) -> None:
    """First message of a FAB: a plain child installs it (memo None) and reports; then a
    zygote for that hash takes its messages (memo = that FAB); a new hash is never sent
    to the old zygote: a plain child installs it, a new zygote starts, the old retires."""
    buffered_streams.install()
    h1, h2 = "1" * 64, "2" * 64
    folders = {h1: tmp_path / "fab1", h2: tmp_path / "fab2"}
    for folder in folders.values():
        folder.mkdir()
    fab_of = {"tA": h1, "tA2": h1, "tB": h1, "tB2": h1, "tC": h2, "tD": h2}
    log = tmp_path / "log"

    def fake_run(address, token, *, parent_pid, memo, report_fd, close_fds=()) -> None:
        with open(log, "a") as f:
            memo_hash = memo[0][0] if memo else "-"
            closes = ",".join(map(str, sorted(close_fds))) or "none"
            f.write(f"{token} {address} {parent_pid} {memo_hash} {os.getppid()} {closes} "
                    f"{os.getpid()}\n")  # fmt: skip
        if memo is None:
            os.write(report_fd, f"{fab_of[token]}\t{folders[fab_of[token]]}\n".encode())

    def fake_load(folder: Path) -> None:
        (tmp_path / f"loaded-{folder.name}-{os.getpid()}").write_text("")

    launcher = warm.Launcher("127.0.0.1:9", load=fake_load, run=fake_run)
    me = os.getpid()
    first = launcher.dispatch(1, h1, "tA")
    assert first is not None and launcher.pending == {first: launcher.pending[first]}
    first_read_fd = launcher.pending[first]
    # A second message of the same FAB before any zygote: a plain child too; both report,
    # and only one zygote may start for the hash.
    second = launcher.dispatch(5, h1, "tA2")
    assert second is not None and second != first
    _wait_reaped(launcher, first, second)
    z1 = launcher.zygote
    assert z1 is not None and z1.fab_hash == h1 and launcher.pending == {}
    assert launcher.dispatch(2, h1, "tB") is None  # the zygote took it
    assert launcher.dispatch(6, h1, "tB2") is None
    third = launcher.dispatch(3, h2, "tC")  # a new FAB: installed, not the old zygote's
    assert third is not None
    _wait_reaped(launcher, third)
    z2 = launcher.zygote
    assert z2 is not None and z2.fab_hash == h2 and z2.pid != z1.pid
    _wait_reaped(launcher, z1.pid)  # retired: it exits once its messages are done
    assert launcher.dispatch(4, h2, "tD") is None
    launcher.close()
    _wait_reaped(launcher, z2.pid)
    rows = {line.split()[0]: line.split()[1:] for line in log.read_text().splitlines()}
    assert {t: r[:4] for t, r in rows.items()} == {
        "tA": ["127.0.0.1:9", str(me), "-", str(me)],
        "tA2": ["127.0.0.1:9", str(me), "-", str(me)],
        "tB": ["127.0.0.1:9", str(z1.pid), "1", str(z1.pid)],
        "tB2": ["127.0.0.1:9", str(z1.pid), "1", str(z1.pid)],
        "tC": ["127.0.0.1:9", str(me), "-", str(me)],
        "tD": ["127.0.0.1:9", str(z2.pid), "2", str(z2.pid)],
    }
    # A plain child closes its own report pipe's read end, the other children's, and the
    # live zygote's task pipe (a retired zygote must see its pipe close); zygote children
    # get nothing to close.
    closes = {t: r[4] for t, r in rows.items()}
    assert closes["tA"] == str(first_read_fd)
    assert len(closes["tA2"].split(",")) == 2 and str(first_read_fd) in closes["tA2"]
    assert str(z1.fd) in closes["tC"].split(",") and len(closes["tC"].split(",")) == 2
    assert closes["tB"] == closes["tB2"] == closes["tD"] == "none"
    out = buffered_streams.read("stdout").splitlines()
    for task_id, token in ((1, "tA"), (5, "tA2"), (2, "tB"), (6, "tB2"), (3, "tC"), (4, "tD")):
        # Exactly once: a line left unflushed would be copied into the next fork's buffer.
        assert out.count(f"{warm.LAUNCH_LINE} task {task_id} in child {rows[token][5]}") == 1
    assert sorted(p.name for p in tmp_path.glob("loaded-*")) == sorted(
        [f"loaded-fab1-{z1.pid}", f"loaded-fab2-{z2.pid}"]
    )


def test_launcher_falls_back_to_a_plain_child_when_its_zygote_is_gone(tmp_path: Path) -> None:
    def fake_run(address, token, *, parent_pid, memo, report_fd, close_fds=()) -> None:
        if memo is None:
            os.write(report_fd, f"{'3' * 64}\t{tmp_path}\n".encode())

    launcher = warm.Launcher("a", load=lambda _f: None, run=fake_run)
    _wait_reaped(launcher, launcher.dispatch(1, "3" * 64, "t") or 0)
    z = launcher.zygote
    assert z is not None
    os.kill(z.pid, 9)
    _wait_reaped(launcher, z.pid)
    assert launcher.zygote is None
    again = launcher.dispatch(2, "3" * 64, "t")  # a plain child again
    assert again is not None
    _wait_reaped(launcher, again)
    launcher.close()
    if launcher.zygote is not None:  # the plain child's report started a new zygote
        _wait_reaped(launcher, launcher.zygote.pid)
