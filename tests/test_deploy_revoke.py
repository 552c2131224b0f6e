"""``fl-app deploy revoke`` / ``rotate-key`` (fl_app.deploy.revoke) as units.

The SuperLink is a fake here (the ``flwr`` wrappers are replaced): these pin the input
checks and their messages, that nothing reaches the SuperLink when an input is wrong,
the order of a rotation (new key registered before the old node is unregistered) and
the ``flwr supernode unregister`` command line. scripts/drill.sh (tests/test_drills.py)
runs both commands against a real SuperLink.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fl_app.cli.deploy import deploy_main
from fl_app.deploy import DeployError, flwr_cli, revoke
from fl_app.deploy.pki import create_node_key


class FakeLink:
    """The SuperLink's node table, as the wrappers see it; records every call."""

    def __init__(self, nodes: dict[int, str], fail_unregister: bool = False) -> None:
        self.nodes = dict(nodes)
        self.calls: list[tuple[str, Any]] = []
        self.fail_unregister = fail_unregister
        # (connection, env) of every call: each must reach the SuperLink the caller named.
        self.seen: list[tuple[str, Any]] = []

    def list_nodes(self, connection: str, env: Any) -> list[dict[str, Any]]:
        self.calls.append(("ls", connection))
        self.seen.append((connection, env))
        return [{"node-id": str(k), "status": v} for k, v in self.nodes.items()]

    def register_node(self, key: Any, connection: str, env: Any) -> int:
        self.calls.append(("register", Path(key).name))
        self.seen.append((connection, env))
        self.nodes[777] = "registered"
        return 777

    def unregister_node(self, node_id: int, connection: str, env: Any) -> None:
        self.calls.append(("unregister", node_id))
        self.seen.append((connection, env))
        if self.fail_unregister:
            raise DeployError("connection refused")
        self.nodes[node_id] = "unregistered"


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch) -> FakeLink:
    fake = FakeLink({11: "online", 12: "online", 13: "unregistered"})
    for name in ("list_nodes", "register_node", "unregister_node"):
        monkeypatch.setattr(revoke, name, getattr(fake, name))
    return fake


# The environment the CLI hands the flwr wrappers (its FLWR_HOME names the connection file).
ENV = {"FLWR_HOME": "/nowhere/.flwr"}


@pytest.fixture(scope="module")
def new_pub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_node_key(tmp_path_factory.mktemp("k"), "site-1")[1]


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "1.5", "", str(2**64), " 7", "+7", "7_0"])
def test_node_id_must_be_a_positive_uint64(bad: str) -> None:
    with pytest.raises(DeployError, match=r"node id .* `fl-app deploy register` printed"):
        revoke.check_node_id(bad)


def test_node_id_edges_accepted() -> None:
    assert revoke.check_node_id("1") == 1
    assert revoke.check_node_id(str(2**64 - 1)) == 2**64 - 1
    assert revoke.check_node_id(42) == 42


def test_public_key_checks(tmp_path: Path, new_pub: Path) -> None:
    assert revoke.check_public_key(new_pub) == new_pub
    missing = tmp_path / "missing.pub"
    with pytest.raises(DeployError) as err:
        revoke.check_public_key(missing)
    assert str(err.value) == (
        f"public key {str(missing)!r} does not exist; the site creates it with "
        "`fl-app deploy node-key --out DIR --name SITE` and sends DIR/SITE.pub"
    )
    priv = new_pub.with_suffix("")  # the private key next to it
    with pytest.raises(DeployError) as err:
        revoke.check_public_key(priv)
    assert str(err.value) == (
        f"{str(priv)!r} is a private key: send only the .pub file (the private key never "
        "leaves the site)"
    )
    junk = tmp_path / "junk.pub"
    junk.write_text("hello\n")
    with pytest.raises(DeployError, match="is not an OpenSSH public key") as err:
        revoke.check_public_key(junk)
    assert str(err.value).startswith(f"{str(junk)!r} is not an OpenSSH public key (")
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(DeployError) as err:
        revoke.check_public_key(ed)
    assert str(err.value) == (
        f"{str(ed)!r} is not an ECDSA key; Flower's SuperNode authentication needs one "
        "from `fl-app deploy node-key`"
    )


def test_revoke_unregisters_a_known_node(link: FakeLink) -> None:
    assert revoke.revoke_node("12", "fed", ENV) == 12
    assert link.calls == [("ls", "fed"), ("unregister", 12)]
    assert link.seen == [("fed", ENV)] * 2


def test_revoke_refuses_unknown_or_revoked_nodes_without_unregistering(link: FakeLink) -> None:
    with pytest.raises(DeployError, match=r"no node 99 at connection 'fed' \(registered: 11, 12\)"):
        revoke.revoke_node(99, "fed", {})
    with pytest.raises(DeployError, match="node 13 is already unregistered at 'fed'"):
        revoke.revoke_node(13, "fed", {})
    with pytest.raises(DeployError, match="node id 'x'"):
        revoke.revoke_node("x", "fed", {})
    assert [c for c in link.calls if c[0] != "ls"] == []


def test_revoke_with_no_live_node_says_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLink({13: "unregistered"})
    monkeypatch.setattr(revoke, "list_nodes", fake.list_nodes)
    with pytest.raises(DeployError) as err:
        revoke.revoke_node(5, "fed", ENV)
    assert str(err.value) == "no node 5 at connection 'fed' (registered: none)"


def test_rotation_registers_the_new_key_before_unregistering_the_old(
    link: FakeLink, new_pub: Path
) -> None:
    done = revoke.rotate_node_key(new_pub, 11, "fed", ENV)
    assert done == revoke.Rotation(new_node_id=777, old_node_id=11)
    assert link.calls == [("ls", "fed"), ("register", "site-1.pub"), ("unregister", 11)]
    assert link.seen == [("fed", ENV)] * 3
    assert link.nodes[11] == "unregistered" and link.nodes[777] == "registered"


def test_rotation_with_a_bad_input_changes_nothing(
    link: FakeLink, new_pub: Path, tmp_path: Path
) -> None:
    with pytest.raises(DeployError, match="does not exist"):
        revoke.rotate_node_key(tmp_path / "nope.pub", 11, "fed", {})
    with pytest.raises(DeployError, match="no node 98"):
        revoke.rotate_node_key(new_pub, 98, "fed", {})
    with pytest.raises(DeployError, match="already unregistered"):
        revoke.rotate_node_key(new_pub, 13, "fed", {})
    assert [c for c in link.calls if c[0] != "ls"] == []


def test_rotation_half_done_names_the_new_id_and_the_command_that_finishes_it(
    monkeypatch: pytest.MonkeyPatch, new_pub: Path
) -> None:
    fake = FakeLink({11: "online"}, fail_unregister=True)
    for name in ("list_nodes", "register_node", "unregister_node"):
        monkeypatch.setattr(revoke, name, getattr(fake, name))
    with pytest.raises(DeployError) as err:
        revoke.rotate_node_key(new_pub, 11, "fed", {})
    assert str(err.value) == (
        "new key registered as node 777, but the old node 11 is still registered "
        "(connection refused); finish with `fl-app deploy revoke 11 --connection fed`"
    )


def test_cli_revoke_and_rotate(
    link: FakeLink, new_pub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert deploy_main(["revoke", "12", "--connection", "fed"]) == 0
    assert capsys.readouterr().out == (
        "unregistered node 12: the SuperLink refuses its key from now on\n"
    )
    assert (
        deploy_main(["rotate-key", str(new_pub), "--old-node-id", "11", "--connection", "fed"]) == 0
    )
    assert capsys.readouterr().out == "registered node 777\nunregistered node 11\n"
    assert deploy_main(["revoke", "abc", "--connection", "fed"]) == 2
    assert capsys.readouterr().err.startswith("fl-app deploy revoke: node id 'abc' must be")
    with pytest.raises(SystemExit) as exit_:
        deploy_main(["rotate-key", str(new_pub), "--connection", "fed"])
    assert exit_.value.code == 2
    assert "--old-node-id" in capsys.readouterr().err


def test_unregister_command_line_and_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_flwr(args: list[str], env: Any, *_rest: Any, **_kw: Any) -> Any:
        seen.append(list(args))
        ok = args[2] == "42"
        out = '{"success": true, "node-id": 42}\n' if ok else ""
        return subprocess.CompletedProcess(args, 0 if ok else 1, out, "" if ok else "boom")

    monkeypatch.setattr(flwr_cli, "_flwr", fake_flwr)
    flwr_cli.unregister_node(42, "fed", {})
    assert seen == [["supernode", "unregister", "42", "fed", "--format", "json"]]
    with pytest.raises(DeployError, match=r"unregistering node 43 failed \(rc=1\): boom"):
        flwr_cli.unregister_node(43, "fed", {})
