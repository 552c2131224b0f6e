"""Layers that never leave a site (share.layers; docs/personalization.md).

With ``share.layers=["net.1.*"]`` the MLP's head (``net.3``, for ``model.hidden=[64]``)
stays with each site. Every message the server receives is inspected as it arrives (the
in-process grid's reply hook) under no privacy, DP-SGD and secure aggregation: no head
parameter in any round, and under secure aggregation a masked vector exactly the head's
650 = 64 * 10 + 10 values shorter than a run that shares everything. A restarted client
(a fresh Context: only the state folder persists) resumes with its own head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client_spec import encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import initial_arrays, run_experiment
from fl_app.server.layout import RunLayout
from fl_app.weights import load_safetensors, to_array_record

COMMON = [
    "runtime=inprocess",
    "dataset.num_partitions=4",
    "num_rounds=2",
    "train.local_epochs=1",
    "server_eval=false",
]
BODY = ["share.layers=[net.1.*]"]
HEAD = {"net.3.weight", "net.3.bias"}
HEAD_SIZE = 64 * 10 + 10  # Linear(64, 10): weight and bias
MODES = {
    "none": [],
    "dpsgd": ["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=1.0", "train.batch_size=64"],
    "secagg": ["secagg=secaggplus", "secagg.clip=5.0"],
}


def _run(overrides: list[str], out: Path) -> tuple[dict[str, Any], list[Message]]:
    """Run on 4 in-process clients; every reply the server received."""
    cfg = compose_config("config", [*COMMON, *overrides])
    received: list[Message] = []

    def hook(node: int, reply: Message) -> Message:
        received.append(reply)
        return reply

    grid = InProcessGrid(client_app, 4, seed=cfg.seed, message_hook=hook)
    try:
        summary = run_experiment(grid, cfg, out, progress=False)
    finally:
        grid.close()
    return summary, received


def _array_records(msg: Message) -> dict[str, ArrayRecord]:
    if not msg.has_content():
        return {}
    return {k: v for k, v in msg.content.items() if isinstance(v, ArrayRecord)}


def _masked_sizes(received: list[Message]) -> set[int]:
    return {
        sum(int(np.prod(a.shape)) for a in rec.values())
        for m in received
        for key, rec in _array_records(m).items()
        if key == "masked"
    }


@pytest.mark.parametrize("mode", list(MODES))
def test_server_receives_no_head_parameter_in_any_round(mode: str, tmp_path: Path) -> None:
    summary, received = _run([*MODES[mode], *BODY], tmp_path / "run")
    assert summary["rounds"] == 2
    updates = 0
    for reply in received:
        assert not reply.has_error(), reply.error.reason
        for key, record in _array_records(reply).items():
            assert not HEAD & set(record), (mode, key, list(record))
            assert not [k for k in record if k.startswith("net.3")], (mode, key)
            if key == "update":
                assert list(record) == ["net.1.weight", "net.1.bias"]
                updates += 1
    if mode == "secagg":
        assert updates == 0 and _masked_sizes(received)
    else:
        assert updates == 8  # 4 clients x 2 rounds, each the shared layers only
    # Nor does the server hold a head: the global model is the shared part.
    final, _meta = load_safetensors(RunLayout(tmp_path / "run").model)
    assert set(final) == {"net.1.weight", "net.1.bias"}
    if mode == "none":
        _assert_declared(tmp_path / "run", tmp_path / "export")


def _assert_declared(run: Path, out: Path) -> None:
    """The declaration is in the run manifest, the audit log's run.start and the card."""
    import json

    from fl_app.release.export import export_run

    declared = {"artifact": "delta", "layers": ["net.1.*"]}
    layout = RunLayout(run)
    assert json.loads(layout.run_manifest.read_text())["share"] == declared
    starts = [
        json.loads(line) for line in layout.audit.read_text().splitlines() if '"run.start"' in line
    ]
    assert [e["data"]["share"] for e in starts] == [declared], starts
    result = export_run(run, "restricted", out)
    card = json.loads((result.out_dir / "model_card.json").read_text())
    assert card["model"]["share_artifact"] == "delta"
    assert card["model"]["shared_layers"] == ["net.1.*"]


def test_secure_vector_is_shorter_by_exactly_the_head(tmp_path: Path) -> None:
    """Clipping, encoding and masking cover the shared part only: the masked vector of a
    body-only run is the head's 650 values shorter than a run sharing every layer."""
    secagg = [*MODES["secagg"], "num_rounds=1"]
    _s, all_layers = _run(secagg, tmp_path / "all")
    _s, body_only = _run([*secagg, *BODY], tmp_path / "body")
    (n_all,) = _masked_sizes(all_layers)
    (n_body,) = _masked_sizes(body_only)
    assert n_all - n_body == HEAD_SIZE


def _train_msg(spec: str, arrays: ArrayRecord, rnd: int, node: int) -> Message:
    msg = Message(
        RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"fl-app.spec": spec, "server-round": rnd})}
        ),
        dst_node_id=node,
        message_type="train",
    )
    msg.metadata.__dict__["_message_id"] = f"m{rnd}-{node}"
    return msg


def _fresh_context(state_dir: Path, partition: int) -> Context:
    """A restarted client: a new process keeps nothing but its state folder."""
    return Context(
        run_id=1,
        node_id=5 + partition,
        node_config={
            "partition-id": partition,
            "num-partitions": 4,
            "dp-state-dir": str(state_dir),
        },
        state=RecordDict(),
        run_config={},
    )


def test_restarted_client_resumes_with_its_own_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fl_app.client.personal as personal
    from fl_app.client.personal import kept_layers_path

    cfg = compose_config("config", [*COMMON, *BODY])
    spec = encode_spec(spec_from_config(cfg, "run1"))
    arrays = to_array_record(initial_arrays(cfg))
    assert set(arrays) == {"net.1.weight", "net.1.bias"}
    state = tmp_path / "state"
    grid = InProcessGrid(client_app, 4, seed=0)  # the server-side task identity
    try:
        heads = {}
        for p in (0, 1):
            reply = client_app(_train_msg(spec, arrays, 1, 5 + p), _fresh_context(state, p))
            assert not reply.has_error(), reply.error.reason
            path = kept_layers_path(state, "run1", f"partition-{p}")
            heads[p] = path.read_bytes()
            assert load_safetensors(path)[1] == {"fl-app": "kept-layers"}
        assert heads[0] != heads[1]  # each site its own head
        # The restart: each site's round-2 model starts from its own saved head.
        seen: dict[int, dict[str, np.ndarray]] = {}
        real = personal.SiteLayers.full_model

        def spy(self: Any, global_arrays: Any) -> dict[str, np.ndarray]:
            out = real(self, global_arrays)
            seen[len(seen)] = {k: out[k].copy() for k in HEAD}
            return out

        monkeypatch.setattr(personal.SiteLayers, "full_model", spy)
        for p in (0, 1):
            reply = client_app(_train_msg(spec, arrays, 2, 5 + p), _fresh_context(state, p))
            assert not reply.has_error(), reply.error.reason
            saved, _ = load_safetensors(_write(tmp_path / f"h{p}.safetensors", heads[p]))
            for k in HEAD:
                assert seen[p][k].tobytes() == saved[k].tobytes()
    finally:
        grid.close()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_weights_artifact_sends_weights_and_the_server_takes_the_same_delta(
    tmp_path: Path,
) -> None:
    """share.artifact=weights: each reply holds w_local (the delta run's Δ plus the
    initial weights, in the pipeline's float64-then-float32 arithmetic), and the server's
    Δ = w − w_global gives the delta run's model bit for bit."""
    quick = ["num_rounds=1", "federated_eval_every=0", *BODY]
    _s, as_delta = _run(quick, tmp_path / "delta")
    _s, as_weights = _run([*quick, "share.artifact=weights"], tmp_path / "weights")
    start = initial_arrays(compose_config("config", [*COMMON, *BODY]))

    def updates(replies: list[Message]) -> dict[int, dict[str, np.ndarray]]:
        return {
            int(m.metadata.src_node_id): {k: v.numpy() for k, v in m.content["update"].items()}
            for m in replies
        }

    deltas, weights = updates(as_delta), updates(as_weights)
    assert sorted(deltas) == sorted(weights) and len(deltas) == 4
    for node, w in weights.items():
        for name, value in w.items():
            diff = (value.astype(np.float64) - start[name].astype(np.float64)).astype(np.float32)
            assert diff.tobytes() == deltas[node][name].tobytes()
            assert not np.array_equal(value, deltas[node][name])
    model_d, _ = load_safetensors(RunLayout(tmp_path / "delta").model)
    model_w, _ = load_safetensors(RunLayout(tmp_path / "weights").model)
    assert {k: v.tobytes() for k, v in model_d.items()} == {
        k: v.tobytes() for k, v in model_w.items()
    }


def test_site_evaluates_its_personalized_model(tmp_path: Path) -> None:
    """The evaluate reply scores the global shared layers with the site's own head, read
    from its state folder by a fresh process, not the initial head."""
    from fl_app.client.personal import kept_layers_path
    from fl_app.data import load_client_data
    from fl_app.models import build_model
    from fl_app.training import evaluate
    from fl_app.weights import load_ndarrays

    cfg = compose_config("config", [*COMMON, *BODY])
    spec = encode_spec(spec_from_config(cfg, "run1"))
    start = initial_arrays(cfg)
    arrays = to_array_record(start)
    state = tmp_path / "state"
    grid = InProcessGrid(client_app, 4, seed=0)
    try:
        assert not client_app(_train_msg(spec, arrays, 1, 5), _fresh_context(state, 0)).has_error()
        msg = _train_msg(spec, arrays, 1, 5)
        msg.metadata.__dict__["_message_type"] = "evaluate"
        reply = client_app(msg, _fresh_context(state, 0))
    finally:
        grid.close()
    assert not reply.has_error(), reply.error.reason
    head, _ = load_safetensors(kept_layers_path(state, "run1", "partition-0"))
    data = load_client_data(cfg.dataset, 0, 4, cfg.seed)

    def loss_with(head_arrays: dict[str, np.ndarray]) -> float:
        model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=1)
        load_ndarrays(model, {**start, **head_arrays})
        return float(evaluate(model, data.val.x, data.val.y, batch_size=256).loss)

    initial_head = {
        k: v for k, v in initial_arrays(compose_config("config", COMMON)).items() if k in HEAD
    }
    got = float(reply.content["metrics"]["eval-loss"])
    assert got == pytest.approx(loss_with(head), rel=1e-6)
    assert got != pytest.approx(loss_with(initial_head), rel=1e-3)
