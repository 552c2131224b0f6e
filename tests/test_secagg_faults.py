"""No input from a client crashes the server: a faulty sum abandons only its round.

Each test feeds, through the real ServerApp driver and ClientApp (in-process Grid), a
stage-3 or stage-4 reply that a faulty or malicious client could send, well formed so
that it passes every reply check. The guarantee: the round is abandoned with a reason
in ``metrics.jsonl`` and in the audit log, the model is unchanged, and the next round
runs normally. Before this was in place, a shifted masked value made the decoded sum
out of range and the ``ValueError`` ended the whole run; a weight shifted to zero or
below did the same in the mean; an unclipped input and a wrapped distributed-DP sum
were released as the model update.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fl_app.client.app import app as client_app
from fl_app.config.compose import compose_config
from fl_app.protocol import METRICS_KEY, SERVER_ROUND
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.vector import round_codec
from fl_app.secagg.wire import (
    SECAGG_MASKED_ARRAY,
    SECAGG_MASKED_KEY,
    SECAGG_RECORD_KEY,
    SECAGG_REPLY_SELF_MASK_SHARES,
    SECAGG_STAGE_KEY,
)
from fl_app.server.app import run_experiment
from fl_app.weights import load_safetensors

N = 10
CLIP = 2.0
PARAMS = 4810  # the default experiment's model


def _stage_and_round(reply: Message) -> tuple[int, int] | None:
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return None
    m = reply.content.metric_records[METRICS_KEY]
    stage, rnd = m.get(SECAGG_STAGE_KEY), m.get(SERVER_ROUND)
    if not isinstance(stage, int) or not isinstance(rnd, int):
        return None
    return stage, rnd


def _shift(reply: Message, change: Callable[[np.ndarray], None]) -> Message:
    y = reply.content.array_records[SECAGG_MASKED_KEY][SECAGG_MASKED_ARRAY].numpy().copy()
    change(y)  # uint32: adding wraps mod 2**32, as the ring does
    reply.content[SECAGG_MASKED_KEY] = ArrayRecord({SECAGG_MASKED_ARRAY: Array(y)})
    return reply


def _corrupt_shares(reply: Message) -> Message:
    rec = dict(reply.content.config_records[SECAGG_RECORD_KEY])
    raw = bytearray(rec[SECAGG_REPLY_SELF_MASK_SHARES])  # type: ignore[arg-type]
    for i in range(65, len(raw), 66):  # last byte of every 66-byte share
        raw[i] ^= 1
    rec[SECAGG_REPLY_SELF_MASK_SHARES] = bytes(raw)
    reply.content[SECAGG_RECORD_KEY] = ConfigRecord(rec)
    return reply


def _run(overrides: list[str], tmp: Path, hook: Callable[[int, Message], Any]) -> list[dict]:
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "federated_eval_every=0",
            "server_eval=false",
            "secagg=secaggplus",
            "secagg.stage_timeout_s=5",
            *overrides,
        ],
    )
    grid = InProcessGrid(client_app, N, seed=cfg.seed, message_hook=hook)
    try:
        run_experiment(grid, cfg, tmp, progress=False)
    finally:
        grid.close()
    return [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines()]


def _audit_notes(tmp: Path) -> dict[int, str]:
    out = {}
    for line in (tmp / "audit.jsonl").read_text().splitlines():
        rec = json.loads(line)
        data = rec.get("data", rec)
        if rec.get("event") == "aggregation.done":
            out[int(data["round"])] = str(data["note"])
    return out


def test_faulty_sums_abandon_their_round_and_the_run_goes_on(tmp_path: Path) -> None:
    # One scale for the whole run: the codec depends on (bits, clip, cohort) only.
    scale = round_codec(32, CLIP, N).scale
    tampered: set[int] = set()

    def out_of_range(y: np.ndarray) -> None:
        y[0] = (int(y[0]) + 2**31) % 2**32  # half the ring: no 10 honest inputs get there

    def weight_below_zero(y: np.ndarray) -> None:
        # Σw <= 10 * 1e-6 (max_weight below): subtracting 9.5 (in units of C) keeps the
        # sum decodable but makes the total weight negative.
        y[PARAMS] = (int(y[PARAMS]) - round(9.5 * CLIP * scale)) % 2**32

    def unclipped(y: np.ndarray) -> None:
        # +0.5*C on each of 4,810 coordinates: norm 0.5*C*sqrt(4810) ~ 35*C > 10*C,
        # each coordinate still well inside the codec's range.
        np.add(y[:PARAMS], np.uint32(round(0.5 * CLIP * scale)), out=y[:PARAMS])

    masked_faults = {1: out_of_range, 2: weight_below_zero, 3: unclipped}

    def hook(node: int, reply: Message) -> Message:
        tag = _stage_and_round(reply)
        if tag is None:
            return reply
        stage, rnd = tag
        if stage == 3 and rnd in masked_faults and rnd not in tampered:
            tampered.add(rnd)
            return _shift(reply, masked_faults[rnd])
        if stage == 4 and rnd == 4:  # every holder's self-mask shares corrupted
            return _corrupt_shares(reply)
        return reply

    lines = _run(["num_rounds=5", f"secagg.clip={CLIP}", "secagg.max_weight=1e6"], tmp_path, hook)
    assert [r["model_updated"] for r in lines] == [False, False, False, False, True]
    assert all(r["mean_update_norm"] == 0.0 for r in lines[:4])
    assert "after unmasking" in lines[0]["note"] and "magnitude" in lines[0]["note"]
    assert "after unmasking" in lines[1]["note"] and "weight" in lines[1]["note"]
    assert "after unmasking" in lines[2]["note"] and "not clipped" in lines[2]["note"]
    assert "abandoned at stage unmask" in lines[3]["note"]
    # Rounds 1-3 were unmasked before they were refused (the server saw their sums),
    # round 4 never was: the flag lets the accounting tell the two apart.
    assert [r.get("secagg_abandoned_after_unmask") for r in lines] == [1.0] * 3 + [None] * 2
    assert lines[4]["secagg_contributors"] == N
    notes = _audit_notes(tmp_path)
    assert all(notes[i + 1] == lines[i]["note"] for i in range(4)) and notes[5] == ""


def test_distributed_dp_sum_outside_its_sanity_bound_abandons_the_round(tmp_path: Path) -> None:
    done: list[int] = []

    def hook(node: int, reply: Message) -> Message:
        if _stage_and_round(reply) == (3, 1) and not done:
            done.append(node)

            def wrap(y: np.ndarray) -> None:
                # A vector of uniform ring elements (a client whose masking went wrong,
                # or garbage): the sum is uniform too, with norm ~ 2**31 * sqrt(d'/3),
                # far above n * bound + noise. (A client that only skews its own input
                # within the ring is not detectable from the sum, and not the point.)
                y[:] = np.random.default_rng(0).integers(0, 2**32, y.size, dtype=np.uint32)

            return _shift(reply, wrap)
        return reply

    lines = _run(
        [
            "privacy=distributed",
            "secagg.bits=32",
            "num_rounds=2",
            "privacy.noise_multiplier=0.3",
        ],
        tmp_path,
        hook,
    )
    assert [r["model_updated"] for r in lines] == [False, True]
    assert "distributed-DP sum has norm" in lines[0]["note"]
    assert lines[0]["secagg_abandoned_after_unmask"] == 1.0
    assert _audit_notes(tmp_path)[1] == lines[0]["note"]


def test_the_model_is_unchanged_by_an_abandoned_round(tmp_path: Path) -> None:
    # num_rounds=1 with a faulty sum: the saved model is the initial one, bit for bit.
    from fl_app.server.app import initial_arrays

    done: list[int] = []

    def hook(node: int, reply: Message) -> Message:
        if _stage_and_round(reply) == (3, 1) and not done:
            done.append(node)

            def shift(y: np.ndarray) -> None:
                y[0] = (int(y[0]) + 2**31) % 2**32

            return _shift(reply, shift)
        return reply

    cfg_overrides = ["num_rounds=1", f"secagg.clip={CLIP}"]
    lines = _run(cfg_overrides, tmp_path, hook)
    assert not lines[0]["model_updated"]
    cfg = compose_config("config", ["runtime=inprocess", "secagg=secaggplus", *cfg_overrides])
    w0 = initial_arrays(cfg)
    saved = load_safetensors(tmp_path / "model.safetensors")[0]
    assert set(saved) == set(w0) and all(np.array_equal(saved[k], w0[k]) for k in w0)
