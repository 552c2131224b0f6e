"""``fl-app deploy``: certificates, node keys, site configs, and a real TLS + node-auth federation.

The fast tests check what Flower and TLS clients will accept (certificates verify against
the CA for every subjectAltName and fail for others; keys load with the loaders Flower
uses; a site YAML round-trips through Flower's own ``--node-config`` parser). The slow
test brings up 1 SuperLink + 3 SuperNodes on loopback with TLS and SuperNode
authentication, runs 2 rounds of DP-SGD under SecAgg+, and checks that an unregistered
SuperNode and one without TLS never join.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.common.config import parse_config_args

from fl_app.audit import verify
from fl_app.cli.deploy import deploy_main
from fl_app.deploy import DeployError
from fl_app.deploy.federation import Federation, app_root
from fl_app.deploy.flwr_cli import list_nodes, register_node, run_logs, write_connection
from fl_app.deploy.pki import create_ca, create_node_key, create_server_cert, create_signing_key
from fl_app.deploy.procs import (
    INSECURE_WARNING,
    ProcessGroup,
    superlink_command,
    supernode_command,
)
from fl_app.deploy.site import format_node_config, load_site, node_config_from_site

# ---- certificates ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    create_ca(d / "ca")
    create_server_cert(d / "ca", d / "server", ["127.0.0.1", "localhost", "superlink.example.org"])
    return d


def test_server_cert_is_signed_by_the_ca_with_every_san(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki / "server" / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    # The SuperLink's --ssl-ca-certfile sits next to its certificate.
    assert (pki / "server" / "ca.crt").read_bytes() == (pki / "ca" / "ca.crt").read_bytes()


def test_private_keys_are_written_owner_only(pki: Path, tmp_path: Path) -> None:
    priv, pub = create_node_key(tmp_path, "site-a")
    for secret in (pki / "ca" / "ca.key", pki / "server" / "server.key", priv):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(pub.stat().st_mode) & 0o600 == 0o600


def _tls_handshake(pki: Path, server_hostname: str) -> None:
    """A real TLS handshake: our server certificate, a client pinning our CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server" / "server.pem", pki / "server" / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(pki / "ca" / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with (
                contextlib.suppress(ssl.SSLError, OSError),
                server_ctx.wrap_socket(conn, server_side=True) as tls,
            ):
                tls.recv(1)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            t.join(timeout=5)


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "superlink.example.org"])
def test_tls_clients_accept_every_san(pki: Path, name: str) -> None:
    _tls_handshake(pki, name)


def test_tls_clients_reject_an_address_not_in_the_sans(pki: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        _tls_handshake(pki, "other.example.org")


def test_tls_clients_reject_a_certificate_from_another_ca(pki: Path, tmp_path: Path) -> None:
    create_ca(tmp_path / "other")
    other = tmp_path / "pki"
    (other / "ca").mkdir(parents=True)
    (other / "ca" / "ca.crt").write_bytes((tmp_path / "other" / "ca.crt").read_bytes())
    (other / "server").symlink_to(pki / "server")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(other, "127.0.0.1")


def test_existing_keys_are_not_overwritten_without_force(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="--force"):
        create_ca(pki / "ca")
    create_node_key(tmp_path, "n")
    with pytest.raises(DeployError, match="--force"):
        create_node_key(tmp_path, "n")
    create_node_key(tmp_path, "n", force=True)


@pytest.mark.parametrize("bad", [[], ["bad name"], [""]])
def test_bad_sans_are_refused(pki: Path, tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(DeployError):
        create_server_cert(pki / "ca", tmp_path, bad)


def test_server_cert_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="fl-app deploy ca"):
        create_server_cert(tmp_path, tmp_path / "out")


# ---- node keys ------------------------------------------------------------------------


def test_node_key_is_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    priv, pub = create_node_key(tmp_path, "site-a")
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, an EC key.
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # flwr supernode register <key.pub>: an OpenSSH NIST-curve public key.
    assert try_load_public_key(pub)
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")


# ---- site YAML -> --node-config -------------------------------------------------------


def test_site_yaml_becomes_a_node_config_flower_parses(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    site = tmp_path / "site.yaml"
    site.write_text(
        "name: hospital-a\n"
        "data:\n  path: data/hospital a.npz\n  format: npz\n"
        "partition:\n  id: 1\n  num: 3\n"
        "dp_state_dir: state\n"
        "extra:\n  site-label: north\n"
    )
    assert deploy_main(["node-config", str(site)]) == 0
    line = capsys.readouterr().out.strip()
    parsed = parse_config_args([line])  # exactly what flower-supernode does
    assert parsed == {
        "site-name": "hospital-a",
        "partition-id": 1,
        "num-partitions": 3,
        "data-path": str(tmp_path / "data" / "hospital a.npz"),
        "data-format": "npz",
        "dp-state-dir": str(tmp_path / "state"),
        "site-label": "north",
    }


@pytest.mark.parametrize(
    ("site", "match"),
    [
        ({"partition": {"id": 3, "num": 3}}, r"\[0, num\)"),
        ({"partition": {"num": 3}}, "partition"),
        ({"data": {"path": "/x/a.csv", "format": "npz"}}, "does not end in .npz"),
        ({"data": {"path": "/x/a.parquet"}}, "data.format"),
        ({"dp-state-dir": "/x"}, "unknown site keys"),
        ({"dp_state_dir": ""}, "non-empty"),
        ({"extra": {"partition-id": 1}, "partition": {"id": 0, "num": 1}}, "clashes"),
        ({"data": {"path": "/x/it's.npz"}}, "quote"),
    ],
)
def test_bad_site_settings_name_the_field(site: dict, match: str) -> None:
    with pytest.raises(DeployError, match=match):
        format_node_config(node_config_from_site(site))


def test_every_relative_path_in_a_site_yaml_resolves_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/deployment.md: relative paths resolve against the YAML's folder, extra: too."""
    site_dir = tmp_path / "sites" / "hospital-a"
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text(
        "name: hospital-a\n"
        "data: {path: data/a.npz}\n"
        "dp_state_dir: state\n"
        "extra:\n"
        "  audit-dir: audit\n"
        "  policy-path: ../policy.yaml\n"
        "  key-file: keys/k\n"
        "  site-label: north\n"
        "  rounds-hint: 3\n"
    )
    monkeypatch.chdir(tmp_path)  # started from elsewhere: cwd must not matter
    cfg = load_site(site_dir / "site.yaml")
    assert cfg["audit-dir"] == str(site_dir / "audit")
    assert cfg["policy-path"] == str(tmp_path / "sites" / "policy.yaml")
    assert cfg["key-file"] == str(site_dir / "keys" / "k")
    assert cfg["data-path"] == str(site_dir / "data" / "a.npz")
    assert cfg["dp-state-dir"] == str(site_dir / "state")
    # Non-path values pass through untouched.
    assert (cfg["site-label"], cfg["rounds-hint"]) == ("north", 3)
    # Absolute paths stay as written.
    absolute = node_config_from_site({"extra": {"audit-dir": "/var/audit"}}, site_dir)
    assert absolute["audit-dir"] == "/var/audit"


def test_sites_sharing_an_audit_folder_never_share_a_log(tmp_path: Path) -> None:
    """Deployed sites all have partition id 0: their logs are named by site identity."""
    from fl_app.client.audit import client_audit_path
    from fl_app.client.identity import site_identity

    shared = tmp_path / "audit"
    configs = [
        node_config_from_site(
            {"name": f"hospital-{x}", "data": {"path": f"{x}.npz"}, "extra": {"audit-dir": "a"}},
            tmp_path,
        )
        for x in "abc"
    ]
    names = [site_identity(c) for c in configs]
    assert names == ["site-hospital-a", "site-hospital-b", "site-hospital-c"]
    paths = {client_audit_path(shared, "run1", n) for n in names}
    assert len(paths) == 3 and all("partition" not in p.name for p in paths)
    assert client_audit_path(shared, "run1", names[0]).name == "audit-run1-site-hospital-a.jsonl"
    # Without a name, a site on its own file is named by that file, never partition-0.
    anon = [{"data-path": str(tmp_path / f"{x}.npz")} for x in "ab"]
    ids = [site_identity(c) for c in anon]
    assert ids[0] != ids[1] and all(i.startswith("data-") for i in ids)
    # Simulated partitions keep their partition ids.
    assert site_identity({"partition-id": 4, "num-partitions": 5}) == "partition-4"
    with pytest.raises(DeployError, match="name must be"):
        node_config_from_site({"name": "../evil"})


# ---- one name per site (issue 17) -------------------------------------------------------


def _no_process_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kw: object) -> int:
        raise AssertionError("a process was started")

    monkeypatch.setattr(ProcessGroup, "start", refuse)


def test_roster_refuses_a_site_named_twice_naming_both_files(tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        create_signing_key(tmp_path, name)
    out = tmp_path / "roster.json"
    a_pub, b_pub = tmp_path / "a.sign.pub", tmp_path / "b.sign.pub"
    rc = deploy_main(["roster", "--out", str(out), f"hospital={a_pub}", f"hospital={b_pub}"])
    err = capsys.readouterr().err
    assert rc == 2 and "'hospital'" in err and str(a_pub) in err and str(b_pub) in err
    assert not out.exists()  # no roster in which one entry silently replaced the other
    # Distinct names are accepted: both keys are in the roster under their names.
    assert deploy_main(["roster", "--out", str(out), f"x={a_pub}", f"y={b_pub}"]) == 0
    roster = json.loads(out.read_text())
    assert roster == {"x": a_pub.read_text().strip(), "y": b_pub.read_text().strip()}


def test_demo_refuses_two_site_yamls_with_one_name_naming_both(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_process_may_start(monkeypatch)
    yamls = []
    for i, folder in enumerate(("north", "south")):
        (tmp_path / folder).mkdir()
        yamls.append(tmp_path / folder / "site.yaml")
        yamls[-1].write_text(f"name: hospital-a\npartition: {{id: {i}, num: 2}}\n")
    rc = deploy_main(
        ["demo", "--workdir", str(tmp_path / "w"), "--site", str(yamls[0]), "--site", str(yamls[1])]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "'hospital-a'" in err and str(yamls[0]) in err and str(yamls[1]) in err
    assert not (tmp_path / "w" / "pki").exists()  # refused before anything was created
    # Without names, two sites on one partition would share their files just the same.
    for y in yamls:
        y.write_text("partition: {id: 0, num: 2}\n")
    scratch = tmp_path / "tmp"  # where a demo without --workdir would make its folder
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rc = deploy_main(["demo", "--site", str(yamls[0]), "--site", str(yamls[1])])
    err = capsys.readouterr().err
    assert rc == 2 and "'partition-0'" in err and str(yamls[0]) in err and str(yamls[1]) in err
    assert not list(scratch.iterdir())  # no work folder left behind for a refused demo


def test_demo_runs_each_sites_start_up_checks_before_any_process(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fl-app deploy supernode` checks its site before starting; the demo did not."""
    _no_process_may_start(monkeypatch)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("name: hospital-a\npartition: {id: 0, num: 2}\n")
    bad.write_text("name: hospital-b\ndata: {path: missing.npz}\n")
    rc = deploy_main(
        ["demo", "--workdir", str(tmp_path / "w"), "--site", str(good), "--site", str(bad)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"site {bad}" in err and "FAIL data" in err and "missing.npz" in err
    assert f"site {good}" not in err  # the good site passed every check
    # The default sites (simulated partitions, keys and CA made by the demo) are checked
    # with their keys: the one whose node key others can read is stopped, the other passes.
    fed = Federation(tmp_path / "default", num_nodes=2)
    fed.prepare()
    os.chmod(fed.node_keys[1], 0o644)
    with pytest.raises(DeployError, match=r"site site-1:\n  FAIL key: .*chmod 600") as err:
        fed.check_sites([fed.site_config(i) for i in range(2)])
    assert "site-0" not in str(err.value)


# ---- CLI connection and process commands ----------------------------------------------


def test_connection_is_read_by_flower(pki: Path, tmp_path: Path, monkeypatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink.local]\naddress = ":local:"\n')
    write_connection("fed", "127.0.0.1:9093", pki / "ca" / "ca.crt")
    write_connection("fed", "superlink.example.org:9093", pki / "ca" / "ca.crt")  # replaces
    conn = read_superlink_connection("fed")
    assert conn.address == "superlink.example.org:9093"
    assert conn.root_certificates == str((pki / "ca" / "ca.crt").resolve())
    assert not conn.insecure
    assert read_superlink_connection("local").address == ":local:"


def test_superlink_runs_with_tls_node_auth_and_no_runtime_installs(pki: Path) -> None:
    cmd = superlink_command("0.0.0.0", 9093, pki / "server")
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in cmd
    assert "--insecure" not in cmd
    with pytest.raises(DeployError, match="server-cert"):
        superlink_command("0.0.0.0", 9093, pki / "missing")


def test_supernode_pins_the_ca_and_uses_its_key(tmp_path: Path) -> None:
    cmd = supernode_command(
        "sl:9093", root_certificates="ca.crt", private_key="k", node_config="a=1", port=9094
    )
    assert cmd[cmd.index("--root-certificates") + 1] == "ca.crt"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == "k"
    assert "--insecure" not in cmd


def test_insecure_only_behind_the_flag_with_a_warning(pki: Path, tmp_path: Path, capsys) -> None:
    assert deploy_main(["superlink", "--certs", str(pki / "server"), "--print"]) == 0
    out = capsys.readouterr()
    assert "--insecure" not in out.out and "WARNING" not in out.err
    assert deploy_main(["superlink", "--insecure", "--print"]) == 0
    out = capsys.readouterr()
    assert "--insecure" in out.out and INSECURE_WARNING in out.err
    # A SuperNode without TLS needs the flag too (and warns); without a key it is refused.
    assert deploy_main(["supernode", "--superlink", "sl:1", "--ca", "c", "--print"]) == 2
    assert "--key is required" in capsys.readouterr().err
    assert deploy_main(["supernode", "--superlink", "sl:1", "--insecure", "--print"]) == 0
    assert INSECURE_WARNING in capsys.readouterr().err
    # The loopback federation (demo, tests, benchmark) warns too.
    Federation(tmp_path / "tls")
    assert "WARNING" not in capsys.readouterr().err
    Federation(tmp_path / "plain", insecure=True)
    assert INSECURE_WARNING in capsys.readouterr().err


# ---- end to end: TLS + node auth on loopback ------------------------------------------


def _plaintext_request_fails(port: int) -> bool:
    """A client speaking plain HTTP to the SuperLink's port gets no HTTP answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/v1/fleet/activate-node", body=b"{}")
        resp = conn.getresponse()
        return resp.status >= 400 and b"activate" not in resp.read()
    except (OSError, http.client.HTTPException):
        return True
    finally:
        conn.close()


@pytest.mark.slow
def test_tls_node_auth_federation_runs_dpsgd_under_secagg(tmp_path: Path, capsys) -> None:
    fed = Federation(tmp_path / "fed", num_nodes=3)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    pids: list[int] = []
    try:
        fed.prepare()
        pids.append(fed.start_superlink())
        registered = set(fed.register_all())
        # Every site as docs/deployment.md sets it up: a site YAML in the site's own
        # folder, relative paths (extra: included), and one audit folder all three
        # share (their logs collided on partition-0 before logs were named by site).
        configs = []
        for i, name in enumerate(("hospital-a", "hospital-b", "hospital-c")):
            folder = tmp_path / "sites" / name
            folder.mkdir(parents=True)
            (folder / "site.yaml").write_text(
                f"name: {name}\npartition: {{id: {i}, num: 3}}\ndp_state_dir: state\n"
                "extra:\n  audit-dir: ../shared-audit\n"
            )
            assert deploy_main(["node-config", str(folder / "site.yaml")]) == 0
            configs.append(capsys.readouterr().out.strip())
        pids += fed.start_supernodes(configs)
        # Two that must never join: a valid key the SuperLink never registered, and a
        # SuperNode without TLS (no key: TLS is what it lacks).
        rogue_key, _ = create_node_key(tmp_path / "rogue", "rogue")
        pids.append(fed.start_supernode("unregistered", fed.node_config(0), private_key=rogue_key))
        pids.append(
            fed.start_supernode(
                "no-tls", fed.node_config(1), private_key=None, tls=False, max_wait_time=10
            )
        )
        nodes = fed.wait_online(3)
        assert {int(n["node-id"]) for n in nodes} == registered
        assert _plaintext_request_fails(fed.port)

        overrides = [
            "num_rounds=2",
            "dataset.num_partitions=3",
            "strategy.min_available_nodes=3",
            "federated_eval_every=0",
            "train.local_epochs=1",
            "privacy=dpsgd",
            "secagg=secaggplus",
            "secagg.clip=5",
        ]
        run_id, status = fed.submit(app_root(), overrides, run_dir, timeout=240)
        assert status == "finished:completed", run_logs(run_id, fed.connection, fed.env)[-4000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds"] == 2
        assert summary["secure_aggregation"] == "secaggplus"
        eps = summary["privacy"]["record_level_epsilon_max"]
        assert isinstance(eps, float) and 0 < eps < float("inf")
        assert len(summary["privacy"]["record_level"]["per_client"]) == 3
        # 3 of 3 updates accepted in every round.
        rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["clients_accepted"] for r in rounds] == [3, 3], rounds
        # Each site's DP-SGD ledger is in the folder its site YAML named (relative),
        # named by the site (never partition-0).
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            state = tmp_path / "sites" / name / "state"
            assert list(state.glob(f"dpsgd-*-site-{name}.json")), name
        # One intact audit log per site in the shared folder, named by the site.
        run_key = json.loads((run_dir / "run.json").read_text())["run_key"]
        logs = sorted((tmp_path / "sites" / "shared-audit").glob("audit-*.jsonl"))
        assert [p.name for p in logs] == [f"audit-{run_key}-site-hospital-{x}.jsonl" for x in "abc"]
        assert all(verify(p).ok for p in logs)

        # The intruders never joined: only the three registered nodes were ever online.
        nodes = list_nodes(fed.connection, fed.env)
        assert {int(n["node-id"]) for n in nodes} == registered
        unregistered = fed.group.procs["unregistered"]
        assert unregistered.wait(timeout=30) != 0
        assert "Failed to activate SuperNode" in fed.group.log("unregistered")
        assert "No SuperNode found with the given public key" in fed.group.log("superlink")
        assert fed.group.procs["no-tls"].wait(timeout=30) != 0
        assert "Activated node" not in fed.group.log("no-tls")
        assert fed.group.log("superlink").count("Activated node_id") == 3
        assert time.monotonic() - t0 < 240
    finally:
        fed.close()
    for pid in pids:  # torn down by PID, with their process groups
        assert _group_gone(pid), f"process group {pid} still alive"


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    # Killed grandchildren are reaped by init a moment later.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_registering_needs_a_running_superlink(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    fed.port = 1  # nothing listens there
    write_connection("fed", fed.address, None, insecure=True, home=Path(fed.env["FLWR_HOME"]))
    _, pub = create_node_key(tmp_path, "k")
    with pytest.raises(DeployError, match="registering"):
        register_node(pub, "fed", fed.env)
