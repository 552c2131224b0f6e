"""The site's client audit log (node-config ``audit-dir``) and the server's signed head.

Guarantees: every train/evaluate instruction with a spec leaves one record in a chain
that verifies; the artifact recorded is what left the client under each privacy path
(raw, clipped, noised, masked update; evaluation metrics); records hold counts, ids and
ε only; a broken client log stops the client; the server's Ed25519-signed head verifies
with ``fl-app audit verify`` and catches an edited or truncated log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fl_app.audit import (
    KNOWN_EVENTS,
    generate_signing_key,
    load_verify_key,
    verify,
    verify_head_signature,
)
from fl_app.cli.audit import audit_main
from fl_app.client.app import app as client_app
from fl_app.client.audit import client_audit_path
from fl_app.client.identity import AUDIT_DIR_KEY
from fl_app.client_spec import encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.protocol import CLIENT_REFUSED, SPEC_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import initial_arrays, run_experiment
from fl_app.weights import to_array_record


def _cfg(*overrides: str) -> Any:
    return compose_config(
        "config",
        [
            "runtime=inprocess",
            "dataset.num_partitions=3",
            "federated_eval_every=0",
            "train.local_epochs=1",
            "num_rounds=2",
            *overrides,
        ],
    )


def _audited_run(cfg: Any, tmp: Path, n: int) -> tuple[dict[str, Any], list[Path]]:
    audit_dir = tmp / "site-audit"

    def node_config(pid: int, num: int) -> dict[str, Any]:
        return {"partition-id": pid, "num-partitions": num, AUDIT_DIR_KEY: str(audit_dir)}

    grid = InProcessGrid(client_app, n, seed=cfg.seed, node_config_fn=node_config)
    try:
        summary = run_experiment(grid, cfg, tmp / "run", progress=False)
    finally:
        grid.close()
    run_key = json.loads((tmp / "run" / "run.json").read_text())["run_key"]
    return summary, [client_audit_path(audit_dir, run_key, pid) for pid in range(n)]


def _records(path: Path) -> list[dict[str, Any]]:
    result = verify(path)
    assert result.ok, result.reason
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plain_run_leaves_a_verified_chain_per_node_with_updates_and_eval(
    tmp_path: Path,
) -> None:
    summary, paths = _audited_run(_cfg("federated_eval_every=1"), tmp_path, 3)
    assert summary["status"] == "completed"
    for pid, path in enumerate(paths):
        recs = _records(path)
        assert recs[0]["event"] == "run.start"
        assert recs[0]["data"] == {
            "role": "client",
            "run_key": path.name.split("-")[1],
            "partition": str(pid),
            "site": f"partition-{pid}",  # simulated: the site identity is the partition
        }
        rounds = [r["data"] for r in recs[1:]]
        assert all(r["event"] == "client.round" for r in recs[1:])
        assert [(d["round"], d["message_type"], d["artifact"]) for d in rounds] == [
            (1, "train", "update"),
            (1, "evaluate", "evaluation_metrics"),
            (2, "train", "update"),
            (2, "evaluate", "evaluation_metrics"),
        ]
        assert all(d["epsilon"] == {} and d["policy"] == "none" for d in rounds)
        # Counts, ids and ε only: the record fields are exactly these.
        assert {k for d in rounds for k in d} == {
            "round",
            "message_type",
            "artifact",
            "epsilon",
            "policy",
        }
    assert {"client.round", "client.refused"} <= set(KNOWN_EVENTS)


def test_client_side_clip_records_clipped_update(tmp_path: Path) -> None:
    _, paths = _audited_run(_cfg("privacy=central", "privacy.clip_side=client"), tmp_path, 3)
    for path in paths:
        arts = [r["data"]["artifact"] for r in _records(path) if r["event"] == "client.round"]
        assert arts == ["clipped_update", "clipped_update"]


def test_local_dp_records_noised_update_and_local_epsilon(tmp_path: Path) -> None:
    _, paths = _audited_run(_cfg("privacy=local"), tmp_path, 3)
    for path in paths:
        rounds = [r["data"] for r in _records(path) if r["event"] == "client.round"]
        assert [d["artifact"] for d in rounds] == ["noised_update", "noised_update"]
        eps = [d["epsilon"]["local"] for d in rounds]
        assert 0 < eps[0] < eps[1]  # the client's own ledger grows each release
        assert all("record_level" not in d["epsilon"] for d in rounds)


def test_secure_aggregation_records_masked_update_for_stage_3_only(tmp_path: Path) -> None:
    cfg = _cfg("secagg=secaggplus", "secagg.clip=5", "dataset.num_partitions=4")
    summary, paths = _audited_run(cfg, tmp_path, 4)
    assert summary["status"] == "completed"
    for path in paths:
        recs = _records(path)
        # Key-exchange stages (1, 2, 4) carry no spec and release no data: not logged.
        assert [r["event"] for r in recs] == ["run.start", "client.round", "client.round"]
        assert [r["data"]["artifact"] for r in recs[1:]] == ["masked_update"] * 2


def _instruction(grid: InProcessGrid, cfg: Any, run_key: str, rnd: int = 1) -> Message:
    config = ConfigRecord(
        {SPEC_KEY: encode_spec(spec_from_config(cfg, run_key)), "server-round": rnd}
    )
    content = RecordDict({"arrays": to_array_record(initial_arrays(cfg)), "config": config})
    return Message(content, dst_node_id=grid.node_ids[0], message_type="train")


def test_broken_client_log_stops_the_client_and_hostile_run_key_stays_in_dir(
    tmp_path: Path,
) -> None:
    cfg = _cfg()
    audit_dir = tmp_path / "a"
    grid = InProcessGrid(
        client_app,
        1,
        seed=0,
        node_config_fn=lambda i, n: {
            "partition-id": 0,
            "num-partitions": 3,
            "audit-dir": str(audit_dir),
        },
    )
    reply = next(iter(grid.send_and_receive([_instruction(grid, cfg, "k1")])))
    assert not reply.has_error()
    path = client_audit_path(audit_dir, "k1", 0)
    assert [r["event"] for r in _records(path)] == ["run.start", "client.round"]
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"role":"client"', '"role":"server"')
    path.write_text("".join(lines))
    reply = next(iter(grid.send_and_receive([_instruction(grid, cfg, "k1", rnd=2)])))
    assert reply.has_error() and reply.error.code == CLIENT_REFUSED
    reason = str(reply.error.reason)
    assert "audit log" in reason and "line 1" in reason
    # A run key that is not a plain token never becomes part of a path.
    reply = next(iter(grid.send_and_receive([_instruction(grid, cfg, "../../evil")])))
    assert not reply.has_error()
    assert client_audit_path(audit_dir, "../../evil", 0).parent == audit_dir
    assert (audit_dir / "audit-unknown-partition-0.jsonl").is_file()
    assert not (tmp_path / "evil-partition-0.jsonl").exists()


# --------------------------------------------------------- server head signing
def test_signed_head_verifies_and_catches_edits_and_truncation(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "audit.pem"
    generate_signing_key(key)
    pub = f"{key}.pub"
    cfg = _cfg(f"audit_signing_key={key}")
    run = tmp_path / "run"
    grid = InProcessGrid(client_app, 3, seed=cfg.seed)
    summary = run_experiment(grid, cfg, run, progress=False)
    log, signed = run / "audit.jsonl", run / "audit_head.sig.json"
    sig = json.loads(signed.read_text())
    assert (sig["seq"], sig["head"]) == (summary["audit"]["seq"], summary["audit"]["head"])
    argv = ["verify", str(log), "--public-key", pub, "--signed-head", str(signed)]
    assert audit_main(argv) == 0
    # Every checkpoint's signed head matches its manifest's anchor.
    verify_key = load_verify_key(pub)
    for rnd in (1, 2):
        ckpt = run / "checkpoints" / f"round-{rnd:04d}"
        manifest = json.loads((ckpt / "manifest.json").read_text())
        head = json.loads((ckpt / "audit_head.sig.json").read_text())
        assert verify_head_signature(verify_key, head)
        assert (head["seq"], head["head"]) == (manifest["audit"]["seq"], manifest["audit"]["head"])
    original = log.read_bytes()
    lines = original.splitlines(keepends=True)
    # Truncation: a valid, shorter chain, caught only by the signed anchor.
    log.write_bytes(b"".join(lines[:-1]))
    assert verify(log).ok and audit_main(argv) == 1
    # An edited record.
    lines[2] = lines[2].replace(b'"round":1', b'"round":7')
    log.write_bytes(b"".join(lines))
    assert audit_main(argv) == 1
    # A signature from another key does not verify.
    log.write_bytes(original)
    other = tmp_path / "keys" / "other.pem"
    generate_signing_key(other)
    assert (
        audit_main(
            ["verify", str(log), "--public-key", f"{other}.pub", "--signed-head", str(signed)]
        )
        == 1
    )


def test_unloadable_signing_key_is_a_config_error_before_the_run(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    cfg = _cfg(f"audit_signing_key={bad}")
    grid = InProcessGrid(client_app, 3, seed=cfg.seed)
    with pytest.raises(ConfigError, match="audit_signing_key") as info:
        run_experiment(grid, cfg, tmp_path / "run", progress=False)
    assert info.value.field == "audit_signing_key"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="audit_signing_key"):
        _cfg("audit_signing_key=' '")
