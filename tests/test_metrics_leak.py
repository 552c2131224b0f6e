"""Nothing un-noised per client reaches a server that the threat model does not trust.

Under ``honest_but_curious`` (secure aggregation), ``distributed_dp`` and local DP, every
message the server receives is inspected as it arrives (the in-process grid's reply
hook): no evaluation reply, no per-client loss, accuracy or example count, and of the
per-client numbers only those listed as public in the README (record-level ε and δ,
rounds trained, partition id, local DP's ε and release count). DP-SGD's steps, sample
rate and z are not among them: each gives the site's record count to within a batch.
A config that asks for federated evaluation under these threat models is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client_spec import encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import initial_arrays, run_experiment
from fl_app.weights import to_array_record

# Written out here, not imported: the README's list of what the server may see.
PUBLIC = {
    "dp-epsilon",
    "dp-delta",
    "dp-rounds",
    "dp-partition-id",
    "dp-local-epsilon",
    "dp-local-releases",
}
PROTOCOL = {"server-round", "fl-app.secagg-stage"}

COMMON = [
    "runtime=inprocess",
    "dataset.num_partitions=4",
    "num_rounds=1",
    "train.local_epochs=1",
    "server_eval=false",
]
THREAT_MODELS = {
    "honest_but_curious+dpsgd": [
        "privacy=central",
        "privacy.threat_model=honest_but_curious",
        "privacy.clip_side=client",
        "secagg=secaggplus",
        "privacy.record_level=true",
        "privacy.dpsgd.noise_multiplier=1.0",
    ],
    "distributed_dp": ["privacy=distributed", "secagg=secaggplus", "secagg.bits=16"],
    "local": ["privacy=local", "privacy.record_level=true", "privacy.dpsgd.noise_multiplier=1.0"],
    # Secure aggregation without client-level DP: it hides each update, so a plaintext
    # evaluation reply beside the masked sum would undo it (claims audit).
    "secagg_only": ["secagg=secaggplus", "secagg.clip=5.0"],
}


def _records(msg: Message) -> dict[str, Any]:
    return dict(msg.content.items()) if msg.has_content() else {}


def _recorded_run(cfg: Any, out: Path) -> tuple[dict[str, Any], list[Message], set[str]]:
    """Run ``cfg`` on 4 in-process clients: the summary, every reply the server received
    (as it arrived) and the types of the messages it sent."""
    received: list[Message] = []

    def hook(node: int, reply: Message) -> Message:
        received.append(reply)
        return reply

    grid = InProcessGrid(client_app, 4, seed=cfg.seed, message_hook=hook)
    try:
        summary = run_experiment(grid, cfg, out, progress=False)
    finally:
        grid.close()
    return summary, received, {d.message_type for d in grid.sent}


def _evaluate_reply(cfg: Any) -> Message:
    """A fresh client's reply to an evaluate instruction for ``cfg``'s spec."""
    spec = spec_from_config(cfg, "run1")
    content = RecordDict(
        {
            "arrays": to_array_record(initial_arrays(cfg)),
            "config": ConfigRecord({"fl-app.spec": encode_spec(spec), "server-round": 1}),
        }
    )
    grid = InProcessGrid(client_app, 4, seed=0)
    try:
        msg = Message(content, dst_node_id=grid.node_ids[0], message_type="evaluate")
        return next(iter(grid.send_and_receive([msg])))
    finally:
        grid.close()


@pytest.mark.parametrize("name", list(THREAT_MODELS))
def test_server_receives_no_per_client_plaintext_metric(name: str, tmp_path: Path) -> None:
    cfg = compose_config("config", [*COMMON, *THREAT_MODELS[name]])
    summary, received, sent_types = _recorded_run(cfg, tmp_path)
    assert summary["rounds"] == 1
    assert sent_types == {"train"}  # federated evaluation is off under this threat model
    updates = 0
    for reply in received:
        assert reply.metadata.message_type == "train"
        assert not reply.has_error(), reply.error.reason
        for key, record in _records(reply).items():
            if isinstance(record, MetricRecord):
                extra = set(record) - PUBLIC - PROTOCOL - {"num-examples"}
                assert not extra, f"{name}: per-client plaintext metrics {sorted(extra)}"
                if "num-examples" in record:  # local DP: every client weighs 1
                    assert record["num-examples"] == 1
            elif isinstance(record, ConfigRecord):
                words = ("loss", "accurac", "example", "steps", "sample")
                assert not [k for k in record if any(w in k for w in words)], (key, list(record))
            else:  # arrays: the masked vector, or local DP's noised update
                assert key in ("masked", "update"), key
                updates += 1
    assert updates == 4
    # Nor does anything per client reach the run directory's metrics beyond that list.
    text = (tmp_path / "metrics.jsonl").read_text()
    for leak in ("dp_steps", "dp_sample_rate", "dp_noise_multiplier", "fed_eval"):
        assert leak not in text


@pytest.mark.parametrize("name", list(THREAT_MODELS))
def test_asking_for_federated_evaluation_there_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*COMMON, *THREAT_MODELS[name], "federated_eval_every=1"])
    assert err.value.field == "federated_eval_every"
    assert "federated_eval_every=0" in str(err.value)
    # Off by default there, and still allowed where the server may see the metrics.
    assert compose_config("config", [*COMMON, *THREAT_MODELS[name], "federated_eval_every=0"])
    trusted = compose_config("config", [*COMMON, "privacy=central", "federated_eval_every=1"])
    assert trusted.federated_eval_every == 1


@pytest.mark.parametrize("name", [*THREAT_MODELS, "trusted_server"])
def test_client_refuses_to_evaluate_where_the_server_must_not_see_its_metrics(
    name: str,
) -> None:
    """The client's own check, should a server ask anyway."""
    overrides = THREAT_MODELS.get(name, ["privacy=central"])
    reply = _evaluate_reply(compose_config("config", [*COMMON, *overrides]))
    if name == "trusted_server":  # the server may see them: the client evaluates
        assert not reply.has_error() and "eval-loss" in reply.content["metrics"]
    else:
        assert reply.has_error() and "un-noised" in reply.error.reason


def test_dpsgd_lost_state_guard_works_on_rounds_where_steps_are_hidden(tmp_path: Path) -> None:
    """The server sees rounds trained, not steps; a client whose state holds fewer
    rounds than the server saw it train refuses (as with steps where they are public)."""
    from flwr.app import Context

    from fl_app.privacy.state import ROUNDS_SEEN_KEY

    cfg = compose_config(
        "config",
        [
            *COMMON,
            "privacy=dpsgd",
            f"privacy.dpsgd.state_dir={tmp_path}",
            "dataset.num_partitions=3",
        ],
    )
    spec = encode_spec(spec_from_config(cfg, "run1"))
    arrays = to_array_record(initial_arrays(cfg))

    def train(rnd: int, rounds_seen: int) -> Message:
        context = Context(  # a fresh process every time: only the state file persists
            run_id=1,
            node_id=5,
            node_config={"partition-id": 0, "num-partitions": 3},
            state=RecordDict(),
            run_config={},
        )
        config = {"fl-app.spec": spec, "server-round": rnd, ROUNDS_SEEN_KEY: rounds_seen}
        msg = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
            dst_node_id=5,
            message_type="train",
        )
        msg.metadata.__dict__["_message_id"] = f"m{rnd}-{rounds_seen}"
        return client_app(msg, context)

    grid = InProcessGrid(client_app, 3, seed=0)  # the server-side task identity
    try:
        lost = train(1, 1)  # the server saw a round this site has no record of
        assert lost.has_error() and "lost or replaced" in lost.error.reason
        first = train(1, 0)
        assert not first.has_error() and first.content["metrics"]["dp-rounds"] == 1
        assert not train(2, 1).has_error()  # restarted, state file on disk: continues
        rewound = train(3, 3)
        assert rewound.has_error() and "lost or replaced" in rewound.error.reason
    finally:
        grid.close()


def test_record_level_dpsgd_sends_no_unnoised_loss_or_accuracy(tmp_path: Path) -> None:
    """DP-SGD's epsilon covers the noised update only: a client's train loss/accuracy
    and any evaluation on its records are un-noised functions of them. With record-level
    DP on its own (no secure aggregation) the server gets the update, the example count
    (FedAvg's weight, public there) and the DP-SGD numbers, and nothing else; federated
    evaluation is off by default, an error when asked for, and refused by the client."""
    overrides = [*COMMON, "privacy=dpsgd", f"privacy.dpsgd.state_dir={tmp_path / 'state'}"]
    cfg = compose_config("config", overrides)
    summary, received, sent_types = _recorded_run(cfg, tmp_path / "run")
    assert sent_types == {"train"}
    refused = _evaluate_reply(cfg)
    assert summary["rounds"] == 1 and len(received) == 4
    assert all(r.metadata.message_type == "train" for r in received)
    for reply in received:
        metrics = reply.content["metrics"]
        assert not [k for k in metrics if "loss" in k or "accurac" in k], list(metrics)
        assert metrics["num-examples"] > 1
    assert refused.has_error() and "record-level DP-SGD" in refused.error.reason
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*overrides, "federated_eval_every=1"])
    assert err.value.field == "federated_eval_every" and "record_level" in str(err.value)
