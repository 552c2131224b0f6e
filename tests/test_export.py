"""Model release (``fl-app export``): what a public or restricted export holds, and refuses.

Guarantees tested:

* round trip: the public weights load into a freshly built model and reproduce the
  run's reported test accuracy and loss exactly;
* no per-client data: no exported file (of either tier) contains a node id of the run
  or the raw bytes of any client update captured on the wire;
* refusals, with nothing written: a tampered or swapped model, a missing ledger when the
  run claims central DP, a run that did not complete, a broken audit log, a non-empty
  output directory;
* a run without DP exports with a prominent no-guarantee warning;
* the restricted tier adds the ledger and per-round aggregates (no node ids), and the
  audit log records the export and still verifies against the run's anchor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fl_app.audit import AuditLog, verify
from fl_app.cli.export import export_main
from fl_app.client.app import app as client_app
from fl_app.config.compose import compose_config, to_app_config
from fl_app.data import load_server_test_set
from fl_app.models import build_model
from fl_app.privacy.ledger import FederationLedger
from fl_app.release import EXPORT_FILES, ExportRefused, export_run
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import run_experiment
from fl_app.server.rundir import published_config_hash
from fl_app.training import evaluate
from fl_app.weights import load_ndarrays, load_safetensors, weights_digest


class Run:
    """A finished run directory plus what was seen on the wire while it ran."""

    def __init__(self, path: Path, summary: dict[str, Any]) -> None:
        self.path = path
        self.summary = summary
        self.node_ids: set[int] = set()
        self.updates: list[bytes] = []  # first 64 bytes of each float32 array clients sent


def _run(base: Path, name: str, *overrides: str) -> Run:
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "dataset.num_partitions=4",
            "num_rounds=2",
            "train.local_epochs=1",
            *overrides,
        ],
    )
    path = base / name
    seen = Run(path, {})

    def hook(node: int, reply: Message) -> Message:
        seen.node_ids.add(int(node))
        if reply.has_content():
            for record in reply.content.array_records.values():
                for array in record.values():
                    arr = np.ascontiguousarray(array.numpy(), dtype=np.float32)
                    if arr.size >= 16:
                        seen.updates.append(arr.tobytes()[:64])
        return reply

    with InProcessGrid(
        client_app, cfg.dataset.num_partitions, seed=cfg.seed, message_hook=hook
    ) as grid:
        seen.node_ids.update(int(n) for n in grid.get_node_ids())
        seen.summary = run_experiment(grid, cfg, path, progress=False)
    assert seen.updates and seen.node_ids
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("export-runs")
    return {
        "central": _run(base, "central", "privacy=central"),
        "record": _run(base, "record", "privacy=dpsgd", "dataset.num_partitions=3"),
        "local": _run(base, "local", "privacy=local"),
        "none": _run(base, "none"),
    }


def _copy(run: Run, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run.path, dst)
    return dst


def _cfg_of(run_dir: Path) -> Any:
    import yaml

    return to_app_config(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _node_ids_in_run_dir(run: Run) -> set[str]:
    """Node ids as the run directory names them (metrics and summary), plus the wire's."""
    ids = {str(n) for n in run.node_ids}
    for rec in _metrics(run.path):
        ids.update(rec.get("client_metrics", {}))
        ids.update(str(f["node"]) for f in rec["failures"] + rec["rejections"])
    rl = run.summary["privacy"].get("record_level") or {}
    ids.update(rl.get("per_client", {}))
    cl = run.summary["privacy"].get("client_level") or {}
    ids.update(cl.get("releases", {}))  # local DP: releases by node id
    return ids


# ---- round trip ---------------------------------------------------------------------


def test_public_export_round_trip_reproduces_the_reported_accuracy(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run = runs["central"]
    result = export_run(run.path, "public", tmp_path / "out")
    out = result.out_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "model_card.json", "model_card.md", "MANIFEST.json"]
    )
    arrays, meta = load_safetensors(out / "model.safetensors")
    assert set(meta) <= {
        "format",
        "tier",
        "config_hash",
        "code_version",
        "rounds",
        "weights_sha256",
    }
    assert weights_digest(arrays) == run.summary["weights_sha256"]

    cfg = _cfg_of(run.path)
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=1234)
    load_ndarrays(model, arrays)
    test = load_server_test_set(cfg.dataset, cfg.seed)
    assert test is not None
    stats = evaluate(model, test.x, test.y)
    assert float(stats.accuracy) == run.summary["accuracy"]
    assert float(stats.loss) == run.summary["loss"]

    manifest = json.loads((out / "MANIFEST.json").read_text())
    import hashlib

    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert manifest["tier"] == "public"
    # Published: keyed by the run's secret salt, never the searchable plain hash.
    published = published_config_hash(
        run.summary["config_hash"],
        json.loads((run.path / "run.json").read_text())["config_hash_salt"],
    )
    assert manifest["source"]["config_hash"] == published != run.summary["config_hash"]
    assert manifest["code_version"] and manifest["exported_at"]

    card = json.loads((out / "model_card.json").read_text())
    assert card == result.card
    cl = card["privacy"]["client_level"]
    priv = run.summary["privacy"]
    assert cl["epsilon"] == priv["epsilon"] and cl["delta"] == priv["delta"]
    assert (cl["noise_multiplier_z"], cl["clip_C"], cl["accountant"]) == (1.0, 1.0, "pld")
    assert cl["rounds_accounted"] == 2 and cl["sample_rate_q"] == 1.0
    assert card["evaluation"]["test_accuracy"] == run.summary["accuracy"]
    assert card["reproducibility"]["config_hash"] == published
    assert meta["config_hash"] == published
    # CSPRNG central noise (the default): releasable, and the seed removes nothing.
    assert card["release"] == {"for_release": True, "status": "for release", "reasons": []}
    assert card["reproducibility"]["seed"] == 42
    assert not any("seeded" in item for item in card["not_protected"])
    assert any("server saw every client" in item for item in card["not_protected"])
    md = (out / "model_card.md").read_text()
    assert "What is NOT protected" in md and f"{priv['epsilon']:.6g}" in md


# ---- no per-client data --------------------------------------------------------------


@pytest.mark.parametrize("name", ["central", "record", "local", "none"])
@pytest.mark.parametrize("tier", ["public", "restricted"])
def test_exported_files_hold_no_node_id_and_no_client_update(
    runs: dict[str, Run], tmp_path: Path, name: str, tier: str
) -> None:
    run = runs[name]
    result = export_run(run.path, tier, tmp_path / "out")
    node_ids = _node_ids_in_run_dir(run)
    assert len(run.node_ids) == run.summary["clients"]
    if name in ("record", "local"):  # the scan is meaningful: the run directory names them
        assert any(n.encode() in (run.path / "summary.json").read_bytes() for n in node_ids)
    files = {p.name: p.read_bytes() for p in result.out_dir.iterdir()}
    assert set(files) == set(result.files)
    for fname, data in files.items():
        for node in node_ids:
            assert node.encode() not in data, f"{fname} names node {node}"
        for prefix in run.updates:
            assert prefix not in data, f"{fname} holds a client update's bytes"
    # ...while the same byte scan finds the released weights in the exported model.
    released, _ = load_safetensors(result.out_dir / "model.safetensors")
    biggest = max(released.values(), key=lambda a: a.size)
    assert biggest.astype(np.float32).tobytes()[:64] in files["model.safetensors"]


def test_restricted_tier_adds_the_ledger_and_per_round_aggregates(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run = runs["central"]
    result = export_run(run.path, "restricted", tmp_path / "out")
    out = result.out_dir
    assert {"privacy_ledger.json", "metrics.jsonl"} <= set(result.files)
    ledger = FederationLedger.from_json((out / "privacy_ledger.json").read_text())
    assert ledger.epsilon() == run.summary["privacy"]["epsilon"]
    lines = _metrics(out)
    assert [r["round"] for r in lines] == [1, 2]
    for rec, orig in zip(lines, _metrics(run.path), strict=True):
        assert not {"client_metrics", "rejections", "failures", "note"} & set(rec)
        assert all(isinstance(v, (int, float, bool)) or v is None for v in rec.values())
        for key in ("server_accuracy", "dp_epsilon", "train_loss", "clients_accepted"):
            assert rec[key] == orig[key]
    assert result.card["reproducibility"]["seed"] == 42  # restricted: the seed is given


def test_record_level_per_institution_epsilon_only_in_restricted(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run = runs["record"]
    public = export_run(run.path, "public", tmp_path / "pub")
    assert "record_level_epsilon.json" not in public.files
    rl = public.card["privacy"]["record_level_dp"]
    assert rl["epsilon_max"] == run.summary["privacy"]["record_level_epsilon_max"]
    assert rl["institutions_reporting"] == 3 and rl["clip_C"] == 1.0
    assert any("Record-level DP only" in item for item in public.card["not_protected"])
    restricted = export_run(run.path, "restricted", tmp_path / "res")
    table = json.loads((restricted.out_dir / "record_level_epsilon.json").read_text())
    assert [r["institution"] for r in table["institutions"]] == [1, 2, 3]
    assert max(r["epsilon"] for r in table["institutions"]) == rl["epsilon_max"]
    assert "privacy_ledger.json" not in restricted.files  # no client-level DP, no ledger
    for rec in _metrics(restricted.out_dir):
        assert not any("partition" in k for k in rec)


def test_local_dp_ledger_is_exported_with_anonymous_client_keys(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run = runs["local"]
    original = FederationLedger.from_json((run.path / "privacy_ledger.json").read_text())
    # The server counts each site's releases under its stable identity, not the node id.
    assert {k for k, _ in original.local} == {f"partition-{i}" for i in range(len(run.node_ids))}
    result = export_run(run.path, "restricted", tmp_path / "out")
    ledger = FederationLedger.from_json((result.out_dir / "privacy_ledger.json").read_text())
    assert [k for k, _ in ledger.local] == ["client-1", "client-2", "client-3", "client-4"]
    assert sorted(n for _, n in ledger.local) == sorted(n for _, n in original.local)
    assert max(ledger.local_epsilons().values()) == run.summary["privacy"]["epsilon"]
    cl = result.card["privacy"]["client_level"]
    assert cl["clients_accounted"] == 4 and cl["noise_multiplier_z"] == 5.0
    assert result.card["reproducibility"]["seed"] == 42  # local noise is always a CSPRNG's


# ---- no DP ------------------------------------------------------------------------------


def test_run_without_dp_exports_with_a_prominent_no_guarantee_warning(
    runs: dict[str, Run], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs["none"]
    rc = export_main([str(run.path), "--tier", "public", "--out", str(tmp_path / "out")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "NO differential-privacy guarantee" in err
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["privacy"]["differential_privacy"] is False
    assert "NO differential-privacy guarantee" in card["privacy"]["guarantee"]
    assert card["not_protected"][0].startswith("Nothing")
    md = (tmp_path / "out" / "model_card.md").read_text()
    # The warning comes before any section of the card.
    assert md.index("WARNING: NO DIFFERENTIAL PRIVACY") < md.index("## Task")
    assert card["reproducibility"]["seed"] == 42  # no DP noise to protect


# ---- refusals ---------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _swap_model_and_edit_summary(run_dir: Path, other: Path) -> None:
    """Replace the model with another run's and rewrite the summary's hashes to match it."""
    shutil.copy(other / "model.safetensors", run_dir / "model.safetensors")
    summary = json.loads((run_dir / "summary.json").read_text())
    other_summary = json.loads((other / "summary.json").read_text())
    summary["model_sha256"] = other_summary["model_sha256"]
    summary["weights_sha256"] = other_summary["weights_sha256"]
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _set_status(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest["status"] = "failed"
    (run_dir / "run.json").write_text(json.dumps(manifest))


def _break_audit(run_dir: Path, line: int = 4) -> None:
    lines = (run_dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
    # The first stage.outcome record: line 4 after run.start, round 1's ledger.spend and
    # round.start; line 3 in a run without client-level DP (no ledger.spend).
    i = next(i for i, line in enumerate(lines) if b'"accepted":4' in line)
    assert i == line - 1
    lines[i] = lines[i].replace(b'"accepted":4', b'"accepted":3')
    (run_dir / "audit.jsonl").write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d, o: _flip_last_byte(d / "model.safetensors"), "not the model the run released"),
        (_swap_model_and_edit_summary, "audit.jsonl run.end records model.safetensors"),
        (lambda d, o: (d / "privacy_ledger.json").unlink(), "privacy_ledger.json is missing"),
        (lambda d, o: _set_status(d), "not 'completed'"),
        (lambda d, o: _break_audit(d), "audit.jsonl is broken at line 4"),
    ],
    ids=["tampered-model", "swapped-model", "ledger-deleted", "not-completed", "broken-audit"],
)
def test_refuses_and_writes_nothing(
    runs: dict[str, Run], tmp_path: Path, tamper: Any, reason: str
) -> None:
    run_dir = _copy(runs["central"], tmp_path)
    tamper(run_dir, runs["none"].path)
    audit_before = (run_dir / "audit.jsonl").read_bytes()
    with pytest.raises(ExportRefused, match=reason) as info:
        export_run(run_dir, "public", tmp_path / "out")
    assert info.value.fix  # every refusal names a fix
    assert not (tmp_path / "out").exists()
    assert (run_dir / "audit.jsonl").read_bytes() == audit_before
    rc = export_main([str(run_dir), "--tier", "public", "--out", str(tmp_path / "out")])
    assert rc == 1


def _edit_summary(run_dir: Path, **changes: Any) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    for key, value in changes.items():
        target = summary["privacy"] if key == "epsilon" else summary
        target[key] = value
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"model_sha256": "0" * 64}, "model.safetensors has SHA-256"),
        ({"epsilon": 0.01}, "privacy_ledger.json accounts epsilon"),
    ],
    ids=["model-hash", "epsilon"],
)
def test_an_edited_summary_is_blamed_not_the_intact_file(
    runs: dict[str, Run], tmp_path: Path, edit: dict[str, Any], reason: str
) -> None:
    """The model and ledger still hash to what the audit log recorded at the run's end:
    the refusal's fix names summary.json, not the file it was compared with (issue 17)."""
    run_dir = _copy(runs["central"], tmp_path)
    _edit_summary(run_dir, **edit)
    with pytest.raises(ExportRefused, match=reason) as info:
        export_run(run_dir, "restricted", tmp_path / "out")
    assert "summary.json was edited after the run" in info.value.fix
    assert "restore summary.json" in info.value.fix


def test_refuses_a_non_empty_out_dir_and_overwrites_only_an_earlier_export(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run = runs["none"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportRefused, match="not empty"):
        export_run(run.path, "public", out)
    with pytest.raises(ExportRefused, match="holds other files"):
        export_run(run.path, "public", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"

    fresh = tmp_path / "fresh"
    export_run(run.path, "restricted", fresh)
    with pytest.raises(ExportRefused, match="not empty"):
        export_run(run.path, "public", fresh)
    result = export_run(run.path, "public", fresh, overwrite=True)
    # The restricted files of the earlier export are gone, not left beside the public one.
    assert sorted(p.name for p in fresh.iterdir()) == sorted(result.files)
    assert set(result.files) <= set(EXPORT_FILES) and "metrics.jsonl" not in result.files


# ---- audit ----------------------------------------------------------------------------


def test_export_is_recorded_in_the_audit_log_which_still_verifies(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run_dir = _copy(runs["central"], tmp_path)
    anchor = json.loads((run_dir / "summary.json").read_text())["audit"]
    before = len((run_dir / "audit.jsonl").read_bytes().splitlines())  # earlier tests exported
    assert before > anchor["seq"]
    result = export_run(run_dir, "restricted", tmp_path / "out")
    lines = (run_dir / "audit.jsonl").read_bytes().splitlines()
    last = json.loads(lines[-1])
    assert last["event"] == "model.export" and last["seq"] == before
    assert result.audit_seq == last["seq"]
    assert last["data"] == {"tier": "restricted", "files": result.files}
    assert verify(
        run_dir / "audit.jsonl", expected_head=anchor["head"], expected_seq=anchor["seq"]
    ).ok
    assert verify(run_dir / "audit.jsonl").ok
    # The log was closed (unlocked): a second export appends again.
    again = export_run(run_dir, "public", tmp_path / "out2")
    assert again.audit_seq == last["seq"] + 1
    # While another writer holds the log, the export is refused before --out is touched.
    with (
        AuditLog(run_dir / "audit.jsonl"),
        pytest.raises(ExportRefused, match="cannot take the export record"),
    ):
        export_run(run_dir, "public", tmp_path / "out2", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == sorted(again.files)


def test_a_log_the_summary_does_not_anchor_is_verified_and_appended_to(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run_dir = _copy(runs["none"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["audit"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    result = export_run(run_dir, "public", tmp_path / "out")
    assert result.audit_seq is not None and verify(run_dir / "audit.jsonl").ok
    _break_audit(run_dir, line=3)
    with pytest.raises(ExportRefused, match=r"audit\.jsonl is broken at line 3"):
        export_run(run_dir, "public", tmp_path / "out2")


def _audit_doc(summary: dict[str, Any], record_bound: float) -> dict[str, Any]:
    """An audit.json as `fl-app audit-privacy --canaries --client-canaries` writes it."""
    bound = {"canaries": 100, "guesses": 50, "correct": 40, "delta": 1e-5, "confidence": 0.95}
    return {
        "model_sha256": summary["model_sha256"],
        "config_hash": summary["config_hash"],
        "one_run": {**bound, "epsilon_lower_bound": record_bound, "accounted_epsilon": 3.0,
                    "exposure": {"exposure_bits": 1.5}},
        "client_one_run": {
            "released_model": {**bound, "epsilon_lower_bound": 0.0, "accounted_epsilon": 3.0},
            "server_view": {**bound, "epsilon_lower_bound": 2.93, "accounted_epsilon": None},
        },
    }  # fmt: skip


def test_the_card_cites_an_audit_written_after_the_run_without_touching_the_evidence(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    """audit.json (written into <run>/privacy_audit/ after the run) is cited with its own
    SHA-256; the rest of the card and the audit log's verification are unchanged; an
    audit of another model is named, not cited; a bound above the accounted ε is shown."""
    import hashlib

    run_dir = _copy(runs["central"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    anchor = summary["audit"]
    plain = export_run(run_dir, "public", tmp_path / "plain").card
    assert "empirical_audit" not in plain["privacy"]
    path = run_dir / "privacy_audit" / "audit.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_audit_doc(summary, 0.8123)))
    result = export_run(run_dir, "public", tmp_path / "cited")
    cited = result.card["privacy"].pop("empirical_audit")
    assert result.card == plain
    assert verify(
        run_dir / "audit.jsonl", expected_head=anchor["head"], expected_seq=anchor["seq"]
    ).ok
    assert cited["cited"] is True and cited["failed"] is False
    assert cited["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cited["file"] == "privacy_audit/audit.json" and cited["exposure_bits"] == 1.5
    assert [b["statement"] for b in cited["bounds"]] == [
        "accounted ε 3; audited lower bound 0.812 at 95 % confidence",
        "accounted ε 3; audited lower bound 0 at 95 % confidence",
        "no accounted ε (not compared); audited lower bound 2.93 at 95 % confidence",
    ]
    card_md = (tmp_path / "cited" / "model_card.md").read_text()
    assert "### Empirical privacy audit" in card_md
    assert "record-level canaries, released model: accounted ε 3; audited lower bound " \
        "0.812 at 95 % confidence" in card_md  # fmt: skip
    assert cited["sha256"] in card_md
    path.write_text(json.dumps(_audit_doc(summary, 3.5)))
    failed = export_run(run_dir, "public", tmp_path / "failed").card["privacy"]["empirical_audit"]
    assert failed["failed"] is True and failed["bounds"][0]["exceeds_accounted"] is True
    path.write_text(json.dumps({**_audit_doc(summary, 0.8), "model_sha256": "0" * 64}))
    stale = export_run(run_dir, "public", tmp_path / "stale").card["privacy"]["empirical_audit"]
    assert stale["cited"] is False and "model_sha256 differs" in stale["why_not"]
    assert "bounds" not in stale


def test_client_canaries_replay_a_real_central_runs_ledger(runs: dict[str, Run]) -> None:
    """`--client-canaries` on a run this release wrote: one replayed round per ledger
    event with its clip, noise std and expected cohort; the released-model bound is
    compared with summary.json's ε, the server's (central DP: trusted) with nothing."""
    from fl_app.privacy_audit.client_canaries import client_canary_audit, rounds_from_run
    from fl_app.privacy_audit.one_run import check_against_accounted

    run_dir = runs["central"].path
    summary = runs["central"].summary
    ledger = FederationLedger.from_json((run_dir / "privacy_ledger.json").read_text())
    rounds = rounds_from_run(summary, json.loads(ledger.to_json()), int(summary["rounds"]))
    assert [(r.clip, r.noise_std, r.divisor) for r in rounds] == [
        (e.clip, e.noise_std, e.cohort) for e in ledger.events
    ]
    bounds, section = client_canary_audit(run_dir, 40, seed=0)
    assert (section["mode"], section["rounds_replayed"]) == ("central", len(ledger.events))
    assert bounds["released_model"].accounted_epsilon == summary["privacy"]["epsilon"]
    assert bounds["server_view"].accounted_epsilon is None
    check_against_accounted(bounds["released_model"])


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    assert export_main([]) == 2
    assert export_main([str(tmp_path), "--tier", "secret", "--out", str(tmp_path / "o")]) == 2
    assert export_main([str(tmp_path / "missing"), "--tier", "public", "--out", "x"]) == 1


def test_a_run_with_an_audit_signing_key_exports(tmp_path: Path) -> None:
    """config.yaml records ``audit_signing_key`` (how the run signed, not what it trained),
    which the run's config hash excludes: the export must hash it the same way, not refuse
    the run with a config-hash mismatch; the key's path reaches no exported file."""
    from fl_app.audit import generate_signing_key

    key = tmp_path / "keys" / "audit.pem"
    generate_signing_key(key)
    run = _run(tmp_path, "signed", "num_rounds=1", f"audit_signing_key={key}")
    assert _cfg_of(run.path).audit_signing_key == str(key)
    out = tmp_path / "out"
    assert export_main([str(run.path), "--tier", "public", "--out", str(out)]) == 0
    for path in out.iterdir():
        assert str(key) not in path.read_bytes().decode("utf-8", "replace"), path.name


def test_the_card_is_attached_to_the_runs_mlflow_run_or_the_export_warns(
    runs: dict[str, Run], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run tracked in MLflow gets the card `fl-app export` builds after it (listed by
    MlflowClient, byte for byte the exported files); an MLflow run that is gone, or
    mlflow missing here, is a warning and the export still completes."""
    import dataclasses
    import sys

    from mlflow.tracking import MlflowClient

    from fl_app.server.tracking import open_tracker

    run_dir = _copy(runs["central"], tmp_path)
    cfg = _cfg_of(run_dir)
    tracked = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, mlflow=True))
    tracker = open_tracker(tracked, run_dir, run_dir / "model.safetensors")
    run_id = tracker.sinks["mlflow"].run_id  # type: ignore[attr-defined]
    tracker.sinks["mlflow"].finish(2, {}, {}, [], None, False)
    out = tmp_path / "out"
    assert export_main([str(run_dir), "--tier", "public", "--out", str(out)]) == 0
    assert "WARNING" not in capsys.readouterr().err
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    listed = {a.path for a in client.list_artifacts(run_id, "model_card/public")}
    assert listed == {"model_card/public/model_card.json", "model_card/public/model_card.md"}
    got = Path(client.download_artifacts(run_id, "model_card/public", str(tmp_path / "dl")))
    for name in ("model_card.json", "model_card.md"):
        assert (got / name).read_bytes() == (out / name).read_bytes()

    argv = [str(run_dir), "--tier", "public", "--out", str(out), "--overwrite"]
    real = sys.modules.get("mlflow.tracking")
    sys.modules["mlflow.tracking"] = None  # type: ignore[assignment]  # import fails
    try:
        assert export_main(argv) == 0
    finally:
        sys.modules["mlflow.tracking"] = real  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert f"WARNING: the run was tracked in MLflow (run {run_id}) but mlflow is not" in err
    # The MLflow run is gone (deleted from the store, or the store replaced).
    gone = "0" * 32
    where = json.loads((run_dir / "tracking.json").read_text())
    where["mlflow"]["run_id"] = gone
    (run_dir / "tracking.json").write_text(json.dumps(where))
    assert export_main(argv) == 0
    err = capsys.readouterr().err
    assert f"WARNING: the card could not be attached to MLflow run {gone}" in err
    assert (out / "model_card.json").is_file()
