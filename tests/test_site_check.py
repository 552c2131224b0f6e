"""``fl-app site check`` / the SuperNode start-up checks (issue 17): a site's bad data,
policy, folders or key are reported before the SuperNode joins, each naming the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_app.cli.deploy import deploy_main
from fl_app.cli.site import site_main
from fl_app.deploy.pki import create_ca, create_node_key, create_signing_key, write_roster
from fl_app.deploy.site_check import check_site


def _site_file(path: Path, n: int = 40) -> None:
    """A small site file in the digits layout (8x8 images scaled to [0, 1], 10 classes)."""
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((n, 64)).astype(np.float32), y=np.arange(n) % 10)


def _by_name(checks: list) -> dict[str, object]:
    return {c.name: c for c in checks}


def test_a_good_site_passes_every_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _site_file(tmp_path / "a.npz")
    (tmp_path / "policy.yaml").write_text("require_record_level_dp: true\n")
    priv, _pub = create_node_key(tmp_path / "keys", "hospital-a")
    (tmp_path / "site.yaml").write_text(
        "name: hospital-a\n"
        "data: {path: a.npz}\n"
        "dp_state_dir: state\n"
        "extra: {audit-dir: audit, policy-path: policy.yaml}\n"
    )
    rc = site_main(["check", "--site", str(tmp_path / "site.yaml"), "--key", str(priv)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ok   site: site-hospital-a" in out and "all 6 checks passed" in out


def test_each_site_mistake_fails_its_check_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "policy.yaml").write_text("max_epsilonn: 3\n")
    priv, _pub = create_node_key(tmp_path / "keys", "site")
    os.chmod(priv, 0o644)
    (tmp_path / "audit").mkdir()
    broken = tmp_path / "audit" / "audit-run1-site-x.jsonl"
    broken.write_text('{"not": "a chained record"}\n')
    checks = _by_name(
        check_site(
            {
                "site-name": "x",
                "data-path": str(tmp_path / "bad.npz"),
                "policy-path": str(tmp_path / "policy.yaml"),
                "audit-dir": str(tmp_path / "audit"),
            },
            key=str(priv),
        )
    )
    assert checks["site"].ok
    assert not checks["data"].ok and "bad.npz" in checks["data"].detail
    assert not checks["policy"].ok and "max_epsilonn" in checks["policy"].detail
    assert not checks["audit logs"].ok and broken.name in checks["audit logs"].detail
    assert not checks["key"].ok and "chmod 600" in checks["key"].detail
    # No data at all, and an unsafe site name.
    checks = _by_name(check_site({"site-name": "../x"}))
    assert not checks["site"].ok and not checks["data"].ok


def test_supernode_does_not_start_when_a_check_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, _pub = create_node_key(tmp_path / "keys", "site")
    create_ca(tmp_path / "ca")
    rc = deploy_main(
        [
            "supernode",
            "--superlink",
            "127.0.0.1:1",
            "--ca",
            str(tmp_path / "ca" / "ca.crt"),
            "--key",
            str(priv),
            "--node-config",
            f"data-path='{tmp_path / 'missing.npz'}' site-name='a'",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAIL data" in err and "missing.npz" in err and "SuperNode was not started" in err


def test_a_site_name_taken_in_the_roster_by_another_key_is_refused(tmp_path: Path) -> None:
    """Two sites named alike: the second's own key is not the roster's entry for its name."""
    create_signing_key(tmp_path / "keys", "first")
    create_signing_key(tmp_path / "keys", "second")
    _site_file(tmp_path / "a.npz")
    roster = write_roster(
        tmp_path / "roster.json", {"hospital-a": tmp_path / "keys/first.sign.pub"}
    )

    def roster_check(signing_key: str, name: str = "hospital-a") -> Any:
        return _by_name(
            check_site(
                {
                    "site-name": name,
                    "data-path": str(tmp_path / "a.npz"),
                    "signing-key-path": str(tmp_path / "keys" / signing_key),
                    "roster-path": str(roster),
                }
            )
        )["roster"]

    taken = roster_check("second.sign")
    assert not taken.ok and "already taken" in taken.detail and "'hospital-a'" in taken.detail
    own = roster_check("first.sign")
    assert own.ok, own.detail
    missing = roster_check("first.sign", name="hospital-b")
    assert not missing.ok and "not in the roster" in missing.detail
    # Half a setup (a roster but no signing key) names the keys that go together.
    half = _by_name(check_site({"site-name": "x", "roster-path": str(roster)}))["roster"]
    assert not half.ok and "signing-key-path" in half.detail
    # A site naming no roster gets no roster check (honest-but-curious deployments).
    assert "roster" not in _by_name(check_site({"site-name": "x"}))


def test_site_check_cli_says_the_name_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_signing_key(tmp_path / "keys", "first")
    create_signing_key(tmp_path / "keys", "second")
    _site_file(tmp_path / "a.npz")
    write_roster(tmp_path / "roster.json", {"hospital-a": tmp_path / "keys/first.sign.pub"})
    (tmp_path / "site.yaml").write_text(
        "name: hospital-a\n"
        "data: {path: a.npz}\n"
        "extra: {signing-key-path: keys/second.sign, roster-path: roster.json}\n"
    )
    assert site_main(["check", "--site", str(tmp_path / "site.yaml")]) == 1
    out = capsys.readouterr().out
    assert "FAIL roster: site name 'hospital-a' is already taken in the roster" in out
