"""A client refuses ``share.artifact=weights`` where its spec asks for client-level DP or
compression (fl_app/client/train.py ``_refuse_unbounded_weights``).

The weights path sends ``w_global + Δ`` in place of what the compress/clip/noise stages
made of Δ, so under a local-DP spec a deviating server that also sets
``share.artifact=weights`` got the raw, unclipped, un-noised update (red-team finding: the
validator refused the combination on the server only). These tests build that spec by
hand and check the client's reply is an error naming ``share.artifact``, and that the
honest weights configuration (no DP, no compression) still sends the trained weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_app.client_spec import ClientDpSpec, ClientSpec, encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.config.schema import ShareArtifact, ShareCompression
from fl_app.protocol import CLIP_NORM_KEY, SPEC_KEY, UPDATE_KEY


def _reply(spec: ClientSpec, cfg: Any, tmp_path: Path) -> Message:
    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import initial_arrays
    from fl_app.weights import to_array_record

    node = InProcessGrid(client_app, 3, seed=0).node_ids[0]  # sets Flower's task identity

    config: dict[str, Any] = {SPEC_KEY: encode_spec(spec), "server-round": 1}
    if spec.client_dp is not None:
        config[CLIP_NORM_KEY] = 1.0
    content = RecordDict(
        {"arrays": to_array_record(initial_arrays(cfg)), "config": ConfigRecord(config)}
    )
    msg = Message(content, dst_node_id=node, message_type="train")
    context = Context(
        run_id=1,
        node_id=node,
        node_config={"partition-id": 0, "num-partitions": 3, "dp-state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    return client_app(msg, context)


def _cfg() -> Any:
    return compose_config(
        "config", ["runtime=inprocess", "dataset.num_partitions=3", "train.local_epochs=1"]
    )


def _weights(spec: ClientSpec, **share: Any) -> ClientSpec:
    fields = {"artifact": ShareArtifact.weights, **share}
    return dataclasses.replace(spec, share=dataclasses.replace(spec.share, **fields))


@pytest.mark.parametrize("case", [0, 1, 2])
def test_weights_with_client_dp_or_compression_is_refused(case: int, tmp_path: Path) -> None:
    cfg = _cfg()
    if case == 0:  # local DP: the server would get un-noised weights
        dp = ClientDpSpec(local_noise_multiplier=1.0, state_dir=str(tmp_path))
        spec = _weights(spec_from_config(cfg, "run-w", dp))
    elif case == 1:  # central DP's client-side clip: the server would get unclipped weights
        spec = _weights(spec_from_config(cfg, "run-w", ClientDpSpec()))
    else:  # compression: the sketch (or k values) replaced by the full weights
        spec = _weights(spec_from_config(cfg, "run-w", None), compression=ShareCompression.sketch)
    reply = _reply(spec, cfg, tmp_path)
    assert reply.has_error()
    reason = reply.error.reason or ""
    assert "share.artifact=weights" in reason
    assert "refused" in reason


def test_weights_without_dp_or_compression_still_sends_the_weights(tmp_path: Path) -> None:
    from fl_app.server.app import initial_arrays

    cfg = _cfg()
    reply = _reply(_weights(spec_from_config(cfg, "run-w", None)), cfg, tmp_path)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = reply.content.array_records[UPDATE_KEY]
    init = initial_arrays(cfg)
    assert list(sent) == list(init)
    # Trained weights: near w_global (one epoch), not a Δ near zero.
    w_norm = float(np.sqrt(sum(float((v**2).sum()) for v in init.values())))
    gap = float(np.sqrt(sum(float(((sent[k].numpy() - init[k]) ** 2).sum()) for k in init)))
    assert 0.0 < gap < w_norm
