"""A deviating server cannot downgrade a secure-aggregation run by plain instruction.

The spec carries no threat model: before this guard, a server that sent an ordinary
train instruction (no secure-aggregation stage) to a distributed-DP client got the raw
update (norm 4.9 against a clip of 1, no noise) and its loss, accuracy and example
count in plaintext (red-team finding 4). After a round under secure aggregation the
real ClientApp refuses, for that run key, a plain train, a secure round without the
distributed-DP noise, and federated evaluation; a fresh node (the control) still
answers the same plain instruction, so the refusal comes from what the run used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client_spec import decode_spec, encode_spec
from fl_app.config.compose import compose_config
from fl_app.protocol import SPEC_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.wire import SECAGG_DDP, SECAGG_STAGE_KEY
from fl_app.server.app import initial_arrays, run_experiment
from fl_app.testing.adversary import LyingGrid
from fl_app.weights import to_array_record

N = 3


@pytest.fixture(scope="module")
def after_secure_round(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two distributed-DP rounds under SecAgg+ through the real driver, round 2's
    stage-3 instructions stripped of the distributed-DP noise parameters; the round-1
    stage-3 config (spec included) each node received, the round reports, and the grid
    with the nodes' contexts."""
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=distributed",
            "secagg=secaggplus",
            "secagg.bits=16",
            "secagg.stage_timeout_s=5",
            f"dataset.num_partitions={N}",
            "federated_eval_every=0",
            "server_eval=false",
            "num_rounds=2",
            "train.local_epochs=1",
        ],
    )
    stage3: dict[int, dict[str, Any]] = {}

    def keep(rnd: int, stage: int, node: int, config: dict[str, Any]) -> dict[str, Any]:
        if stage == 3 and rnd == 1:
            stage3[node] = dict(config)
        if stage == 3 and rnd == 2:
            config.pop(SECAGG_DDP, None)  # a secure round with the noise switched off
        return config

    state = tmp_path_factory.mktemp("site-state")

    def node_config(i: int, n: int) -> dict[str, Any]:
        return {"partition-id": i, "num-partitions": n, "dp-state-dir": str(state)}

    grid = InProcessGrid(client_app, N, seed=cfg.seed, node_config_fn=node_config)
    run = tmp_path_factory.mktemp("ddp")
    run_experiment(LyingGrid(grid, keep), cfg, run, progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["model_updated"] and len(stage3) == N
    yield cfg, grid, stage3, lines
    grid.close()


def _send(cfg: Any, context: Context, config: dict[str, Any], message_type: str) -> Message:
    content = RecordDict(
        {"arrays": to_array_record(initial_arrays(cfg)), "config": ConfigRecord(config)}
    )
    msg = Message(content, dst_node_id=context.node_id, message_type=message_type)
    return client_app(msg, context)


def _fresh(context: Context, *, keep_state_dir: bool = False) -> Context:
    """The node with an empty ``Context.state`` (a restarted SuperNode); without
    ``keep_state_dir`` also without its dp-state-dir (a node that never trained)."""
    node_config = dict(context.node_config)
    if not keep_state_dir:
        node_config.pop("dp-state-dir")
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config={},
    )


def _plain(config: dict[str, Any], *, hide_metrics: bool = False) -> dict[str, Any]:
    """The stage-3 instruction as a plain one: same spec and round, no secagg keys, and
    (unless ``hide_metrics``) the spec's hide_client_metrics cleared, as a server that
    knows the client checks it would."""
    out = {k: v for k, v in config.items() if not k.startswith("fl-app.secagg")}
    assert SPEC_KEY in out and SECAGG_STAGE_KEY not in out
    spec = decode_spec(out[SPEC_KEY])
    assert spec.hide_client_metrics  # distributed_dp
    if not hide_metrics:
        out[SPEC_KEY] = encode_spec(dataclasses.replace(spec, hide_client_metrics=False))
    return out


def test_a_plain_train_contradicting_the_spec_is_refused_from_the_first_message(
    after_secure_round: Any,
) -> None:
    # The red-team repro: the spec still says distributed_dp (per-client numbers hidden
    # from the server), the instruction is plain; a node that never trained refuses too.
    cfg, grid, stage3, _ = after_secure_round
    node = grid.node_ids[0]
    reply = _send(cfg, _fresh(grid.context(node)), _plain(stage3[node], hide_metrics=True), "train")
    assert reply.has_error()
    assert "site policy `require_secure_aggregation`" in reply.error.reason
    assert "threat model hides per-client numbers" in reply.error.reason


def test_a_plain_train_after_a_secure_round_is_refused(after_secure_round: Any) -> None:
    cfg, grid, stage3, _ = after_secure_round
    node = grid.node_ids[0]
    plain = _plain(stage3[node])
    reply = _send(cfg, grid.context(node), plain, "train")
    assert reply.has_error()
    assert "site policy `require_secure_aggregation`" in reply.error.reason
    assert "plain one" in reply.error.reason
    # Control: the same instruction to a node that never trained securely in this run
    # is answered with an update (what every node did before the guard).
    control = _send(cfg, _fresh(grid.context(node)), plain, "train")
    assert not control.has_error(), control.error.reason
    assert "update" in control.content.array_records


def test_a_restarted_node_remembers_the_run_was_secure(after_secure_round: Any) -> None:
    # Context.state is gone after a SuperNode restart; the marks kept beside the site's
    # DP state (dp-state-dir) are not.
    cfg, grid, stage3, _ = after_secure_round
    node = grid.node_ids[0]
    restarted = _fresh(grid.context(node), keep_state_dir=True)
    reply = _send(cfg, restarted, _plain(stage3[node]), "train")
    assert reply.has_error()
    assert "site policy `require_secure_aggregation`" in reply.error.reason
    state_dir = Path(str(restarted.node_config["dp-state-dir"]))
    kept = json.loads((state_dir / "protected-runs-partition-0.json").read_text())
    # "ddp-schedule:none": constant noise is pinned for the run like a stated schedule.
    marks = ["ddp", "ddp-schedule:none", "hide-metrics", "secagg"]
    assert kept == {decode_spec(stage3[node][SPEC_KEY]).run_key: marks}


def test_federated_evaluation_after_a_secure_round_is_refused(after_secure_round: Any) -> None:
    cfg, grid, stage3, _ = after_secure_round
    node = grid.node_ids[1]
    config = _plain(stage3[node])  # hide_client_metrics cleared: checked by the client
    reply = _send(cfg, grid.context(node), config, "evaluate")
    assert reply.has_error()
    assert "does not evaluate in it" in reply.error.reason


def test_a_secure_round_without_the_distributed_dp_noise_is_refused(
    after_secure_round: Any,
) -> None:
    _, _, stage3, lines = after_secure_round
    assert all(SECAGG_DDP in c for c in stage3.values())  # round 1 carried the noise
    assert not lines[1]["model_updated"]
    reasons = [f["reason"] for f in lines[1]["failures"]]
    assert len(reasons) == N
    assert all("site policy `require_secure_aggregation`" in r for r in reasons), reasons
    assert all("no distributed-DP noise" in r for r in reasons)


def test_local_dp_noise_cannot_be_dropped_later_in_the_run(
    after_secure_round: Any, tmp_path: Path
) -> None:
    # Local DP (honest_but_curious): after one noised train, the same run key's train
    # without local noise (spec flag cleared too) and its federated evaluation are
    # refused; a node that never trained in the run answers the same plain train.
    from fl_app.client_spec import ClientDpSpec, spec_from_config
    from fl_app.config.schema import Accountant
    from fl_app.protocol import CLIP_NORM_KEY

    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=local",
            "privacy.accountant=prv",
            f"dataset.num_partitions={N}",
            "train.local_epochs=1",
            "server_eval=false",
        ],
    )
    local = ClientDpSpec(local_noise_multiplier=5.0, delta=1e-5, accountant=Accountant.prv)
    noised = spec_from_config(cfg, "ldp", local)
    plain = dataclasses.replace(spec_from_config(cfg, "ldp", None), hide_client_metrics=False)
    _, grid, _, _ = after_secure_round  # its node ids (the in-process run's identity)
    context = Context(
        run_id=1,
        node_id=grid.node_ids[0],
        node_config={"partition-id": 0, "num-partitions": N, "dp-state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    first = {SPEC_KEY: encode_spec(noised), "server-round": 1, CLIP_NORM_KEY: 1.0}
    assert not _send(cfg, context, first, "train").has_error()
    later = {SPEC_KEY: encode_spec(plain), "server-round": 2}
    reply = _send(cfg, context, later, "train")
    assert reply.has_error() and "no local noise" in reply.error.reason
    reply = _send(cfg, context, later, "evaluate")
    assert reply.has_error() and "does not evaluate in it" in reply.error.reason
    control = _send(cfg, _fresh(context), later, "train")
    assert not control.has_error(), control.error.reason
