"""The real ServerApp + ClientApp through the in-process Grid (no Ray)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client.pipeline import STAGE_ORDER, PipelineStages, run_train_pipeline
from fl_app.config.compose import compose_config, config_hash
from fl_app.protocol import CLIENT_REFUSED, SPEC_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.runtime.simulation import run_simulation_experiment
from fl_app.server.app import initial_arrays, run_experiment
from fl_app.weights import load_safetensors, to_array_record


def _inprocess(*overrides: str):
    return compose_config("config", ["runtime=inprocess", *overrides])


def test_default_experiment_reaches_90_percent_and_writes_run_dir(tmp_path: Path) -> None:
    cfg = _inprocess()
    assert (cfg.dataset.num_partitions, cfg.num_rounds) == (10, 5)
    summary = run_simulation_experiment(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert summary["accuracy"] >= 0.90
    assert summary["initial_accuracy"] < 0.3  # it learned, it did not start there
    assert summary["rounds"] == 5 and summary["config_hash"] == config_hash(cfg)
    assert summary["privacy"]["epsilon"] is None  # no DP: nothing is claimed

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4, 5]
    for r in lines:
        assert r["clients_sampled"] == r["clients_replied"] == r["clients_accepted"] == 10
        assert r["clients_rejected"] == 0 and r["model_updated"]
        for key in (
            "train_loss",
            "train_accuracy",
            "fed_eval_accuracy",
            "server_accuracy",
            "server_loss",
            "round_seconds",
        ):
            assert np.isfinite(r[key]), key
    assert lines[-1]["server_accuracy"] == pytest.approx(summary["accuracy"])

    arrays, meta = load_safetensors(tmp_path / "model.safetensors")
    manifest = json.loads((tmp_path / "run.json").read_text())
    # The model file carries the config hash keyed by the run's secret salt (HMAC-SHA256,
    # worked here with hmac directly), never the plain hash: its SHA-256 is published.
    salt = bytes.fromhex(manifest["config_hash_salt"])
    message = b"fl-app published config hash v1\x00" + config_hash(cfg).encode()
    assert meta["config_hash"] == hmac.new(salt, message, hashlib.sha256).hexdigest()
    assert set(arrays) == set(initial_arrays(cfg))
    assert manifest["status"] == "completed"
    assert (tmp_path / "config.yaml").is_file()


def test_dirichlet_partitioning_runs(tmp_path: Path) -> None:
    cfg = _inprocess("dataset.partitioner=dirichlet", "num_rounds=2")
    summary = run_simulation_experiment(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["accuracy"] > 0.5


@pytest.mark.parametrize("strategy", ["fedadam", "fedprox"])
def test_other_strategies_learn(tmp_path: Path, strategy: str) -> None:
    cfg = _inprocess(f"strategy={strategy}", "num_rounds=3", "federated_eval_every=0")
    summary = run_simulation_experiment(cfg, tmp_path)
    assert summary["accuracy"] > summary["initial_accuracy"] + 0.3


def test_runs_are_reproducible(tmp_path: Path) -> None:
    cfg = _inprocess("num_rounds=2", "federated_eval_every=0")
    a = run_simulation_experiment(cfg, tmp_path / "a")
    b = run_simulation_experiment(cfg, tmp_path / "b")
    assert a["weights_sha256"] == b["weights_sha256"]
    c = run_simulation_experiment(
        _inprocess("num_rounds=2", "federated_eval_every=0", "seed=1"), tmp_path / "c"
    )
    assert c["weights_sha256"] != a["weights_sha256"]


def test_dropped_client_is_reported_and_round_goes_on(tmp_path: Path) -> None:
    # The in-process grid is synchronous: a lost reply never arrives, so the round
    # ends at the stage timeout, kept short here.
    cfg = _inprocess("num_rounds=2", "federated_eval_every=0", "runtime.train_timeout_s=0.5")
    grid = InProcessGrid(client_app, 10, seed=cfg.seed)
    grid.drop_at(grid.node_ids[3], message_type="train", count=None)  # dies at its 1st train
    summary = run_experiment(grid, cfg, tmp_path, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_missing"] for r in lines] == [1, 1]
    assert all(r["clients_accepted"] == 9 and r["model_updated"] for r in lines)
    assert summary["status"] == "completed"


def _instruction(grid: InProcessGrid, config: dict, message_type: str = "train") -> Message:
    cfg = _inprocess()
    content = RecordDict(
        {"arrays": to_array_record(initial_arrays(cfg)), "config": ConfigRecord(config)}
    )
    return Message(content, dst_node_id=grid.node_ids[0], message_type=message_type)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({SPEC_KEY: "{not json", "server-round": 1}, "not valid JSON"),
        ({SPEC_KEY: '{"model": {"name": "resnet"}}', "server-round": 1}, "model.name"),
        ({SPEC_KEY: '{"dataset": {"_target_": "os.system"}}', "server-round": 1}, "_target_"),
        ({"server-round": 1}, "JSON string"),
        ({SPEC_KEY: "{}", "server-round": "one"}, "server-round"),
        ({SPEC_KEY: "{}", "server-round": 1, "proximal-mu": -1.0}, "proximal-mu"),
    ],
)
def test_client_refuses_bad_instructions_with_structured_error(config: dict, words: str) -> None:
    grid = InProcessGrid(client_app, 2, seed=0)
    replies = list(grid.send_and_receive([_instruction(grid, config)]))
    assert len(replies) == 1 and replies[0].has_error()
    assert replies[0].error.code == CLIENT_REFUSED
    assert words in replies[0].error.reason


@pytest.mark.parametrize("field", ["seed", "run_key"])
def test_a_spec_cannot_read_the_clients_environment(monkeypatch, field: str) -> None:
    # OmegaConf would resolve ${oc.env:...} on the client: the spec must be refused, and
    # the reply must not carry the variable's value (a type error used to echo it).
    monkeypatch.setenv("FLAPP_PROBE_SECRET", "hunter2")
    cfg = _inprocess()
    from fl_app.client_spec import encode_spec, spec_from_config

    spec = json.loads(encode_spec(spec_from_config(cfg)))
    spec[field] = "${oc.env:FLAPP_PROBE_SECRET}"
    grid = InProcessGrid(client_app, 2, seed=0)
    msg = _instruction(grid, {SPEC_KEY: json.dumps(spec), "server-round": 1})
    reply = next(iter(grid.send_and_receive([msg])))
    assert reply.has_error() and reply.error.code == CLIENT_REFUSED
    assert f"client spec field `{field}`: '${{' is refused" in reply.error.reason
    assert "hunter2" not in reply.error.reason


def test_client_refuses_partition_out_of_range() -> None:
    cfg = _inprocess()
    from fl_app.client_spec import encode_spec, spec_from_config

    grid = InProcessGrid(
        client_app, 1, seed=0, node_config_fn=lambda i, n: {"partition-id": 5, "num-partitions": 3}
    )
    msg = _instruction(grid, {SPEC_KEY: encode_spec(spec_from_config(cfg)), "server-round": 1})
    reply = next(iter(grid.send_and_receive([msg])))
    assert reply.has_error() and reply.error.code == CLIENT_REFUSED
    assert "partition" in reply.error.reason


def test_pipeline_runs_stages_in_the_fixed_order_whatever_is_enabled() -> None:
    calls: list[str] = []
    glob = {"a": np.zeros(3, np.float32)}

    def stage(name: str):
        def run(update):
            calls.append(name)
            return {k: v + 1 for k, v in update.items()}

        return run

    stages = PipelineStages(
        load=lambda a: calls.append("load"),
        train=lambda: (calls.append("train") or {"a": np.full(3, 2.0, np.float32)}, None),
        mask=stage("mask"),
        clip=stage("clip"),
        encode=stage("encode"),
        noise=stage("noise"),
        compress=stage("compress"),
    )
    result = run_train_pipeline(glob, stages)
    assert calls == ["load", "train", "compress", "clip", "noise", "encode", "mask"]
    assert result.stages_run == list(STAGE_ORDER)
    np.testing.assert_array_equal(result.update["a"], np.full(3, 7.0, np.float32))
    calls.clear()
    partial = PipelineStages(load=stages.load, train=stages.train, noise=stage("noise"))
    assert run_train_pipeline(glob, partial).stages_run == ["load", "train", "delta", "noise"]


def test_client_context_state_is_not_needed_between_rounds() -> None:
    # A fresh Context per message (deployment spawns a process per message) gives the
    # same reply as a persistent one: the foundation keeps no hidden client state.
    cfg = _inprocess()
    from fl_app.client_spec import encode_spec, spec_from_config

    grid = InProcessGrid(client_app, 2, seed=0)
    config = {SPEC_KEY: encode_spec(spec_from_config(cfg)), "server-round": 1}
    first = next(iter(grid.send_and_receive([_instruction(grid, config)])))
    ctx = Context(
        run_id=1,
        node_id=grid.node_ids[0],
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    second = client_app(_copy_for_client(grid, config), ctx)
    assert list(first.content["update"]) == list(second.content["update"])
    for key in first.content["update"]:
        np.testing.assert_array_equal(
            first.content["update"][key].numpy(), second.content["update"][key].numpy()
        )


def _copy_for_client(grid: InProcessGrid, config: dict) -> Message:
    msg = _instruction(grid, config)
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


@pytest.mark.parametrize(
    ("overrides", "server_saw"),
    [
        # Under secure aggregation the server unmasks only the sum: the note must not
        # claim it saw any client's update (claims audit, item 5).
        (["privacy=central", "privacy.clip_side=client", "secagg=secaggplus"], "masked sum"),
        (["privacy=central", "privacy.clip_side=client"], "every client's update"),
        (["privacy=central"], "every client's update (unclipped)"),
    ],
)
def test_summary_privacy_note_says_what_the_server_saw(
    overrides: list[str], server_saw: str
) -> None:
    from fl_app.config.guarantee import privacy_note as _privacy_note

    note = _privacy_note(_inprocess(*overrides))
    assert server_saw in note
    if "secagg=secaggplus" in overrides:
        assert "saw every" not in note and "saw each" not in note
        assert "server saw only the masked sum" in note
