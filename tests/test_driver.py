"""The round driver: exact aggregates, ingestion checks, faults, delegation to strategies."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fl_app.protocol import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND, UPDATE_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.weights import to_array_record
from strategies.driver import RoundDriver
from strategies.driver_types import DriverSettings
from strategies.sampling import FixedSizeSampler, PoissonSampler
from strategies.validation import ReplyLimits

GLOBAL = {
    "w": np.zeros((3, 2), dtype=np.float32),
    "b": np.zeros((2,), dtype=np.float32),
    "s": np.array(0.0, dtype=np.float32),
}
Behaviour = Callable[[Message, Context, int], Message]


def good_reply(
    msg: Message,
    pid: int,
    *,
    value: float | None = None,
    n: int | None = None,
    rnd: int | None = None,
) -> Message:
    """A valid train reply: Δ = value everywhere, num-examples = n."""
    value = float(pid + 1) if value is None else value
    n = pid + 1 if n is None else n
    rnd = int(msg.content["config"][SERVER_ROUND]) if rnd is None else rnd
    arrays = msg.content["arrays"]
    update = {
        k: np.full(a.shape, value, dtype=a.dtype)
        for k, a in ((k, v.numpy()) for k, v in arrays.items())
    }
    return Message(
        RecordDict(
            {
                UPDATE_KEY: to_array_record(update),
                METRICS_KEY: MetricRecord(
                    {NUM_EXAMPLES: n, SERVER_ROUND: rnd, "train-loss": float(pid)}
                ),
            }
        ),
        reply_to=msg,
    )


def eval_reply(msg: Message, pid: int) -> Message:
    rnd = int(msg.content["config"][SERVER_ROUND])
    return Message(
        RecordDict(
            {
                METRICS_KEY: MetricRecord(
                    {NUM_EXAMPLES: 10, SERVER_ROUND: rnd, "eval-accuracy": 0.1 * pid}
                )
            }
        ),
        reply_to=msg,
    )


def make_app(
    behaviours: dict[int, Behaviour] | None = None, seen: list[dict] | None = None
) -> ClientApp:
    behaviours = behaviours or {}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if seen is not None:
            seen.append(dict(msg.content["config"]))
        if pid in behaviours:
            return behaviours[pid](msg, context, pid)
        return good_reply(msg, pid)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return eval_reply(msg, int(context.node_config["partition-id"]))

    return app


def driver(
    strategy=None,
    *,
    rounds: int = 1,
    fraction: float = 1.0,
    min_replies: int = 1,
    limits: ReplyLimits | None = None,
    evaluate: bool = False,
) -> RoundDriver:
    return RoundDriver(
        strategy or FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        train_sampler=FixedSizeSampler(fraction, seed=3),
        evaluate_sampler=FixedSizeSampler(1.0, seed=3, stream=1) if evaluate else None,
        settings=DriverSettings(
            num_rounds=rounds,
            min_train_replies=min_replies,
            train_timeout_s=0.5,
            evaluate_timeout_s=0.5,
            limits=limits or ReplyLimits(),
        ),
    )


def expected_mean(pids: list[int]) -> float:
    weights = np.array([p + 1 for p in pids], dtype=np.float64)
    values = np.array([p + 1 for p in pids], dtype=np.float64)
    return float((weights * values).sum() / weights.sum())


def test_aggregate_is_exact_weighted_mean_of_updates() -> None:
    grid = InProcessGrid(make_app(), 5, seed=1)
    result = driver().run(grid, GLOBAL)
    want = expected_mean([0, 1, 2, 3, 4])  # Σ n_i Δ_i / Σ n_i with n_i = Δ_i = i + 1
    for k, v in result.arrays.items():
        assert v.dtype == GLOBAL[k].dtype and v.shape == GLOBAL[k].shape
        np.testing.assert_allclose(v, want, rtol=0, atol=1e-6)
    report = result.reports[0]
    assert (report.train.sampled, report.train.accepted, report.train.missing) == (5, 5, 0)
    assert report.model_updated
    # Weighted train metrics: Σ n_i * pid / Σ n_i.
    assert report.train.metrics["train-loss"] == pytest.approx((0 + 2 + 6 + 12 + 20) / 15)


def nan_reply(msg, ctx, pid):
    r = good_reply(msg, pid)
    arr = r.content[UPDATE_KEY]["w"].numpy().copy()
    arr[0, 0] = np.nan
    r.content[UPDATE_KEY]["w"] = to_array_record({"w": arr})["w"]
    return r


def wrong_shape(msg, ctx, pid):
    r = good_reply(msg, pid)
    r.content[UPDATE_KEY]["b"] = to_array_record({"b": np.zeros(3, np.float32)})["b"]
    return r


def wrong_dtype(msg, ctx, pid):
    r = good_reply(msg, pid)
    r.content[UPDATE_KEY]["b"] = to_array_record({"b": np.zeros(2, np.float64)})["b"]
    return r


def missing_array(msg, ctx, pid):
    r = good_reply(msg, pid)
    del r.content[UPDATE_KEY]["s"]
    return r


def huge_norm(msg, ctx, pid):
    return good_reply(msg, pid, value=1e6)


def stale_round(msg, ctx, pid):
    return good_reply(msg, pid, rnd=0)


def zero_examples(msg, ctx, pid):
    return good_reply(msg, pid, n=0)


def absurd_examples(msg, ctx, pid):
    return good_reply(msg, pid, n=10**12)


def extra_record(msg, ctx, pid):
    r = good_reply(msg, pid)
    r.content["leak"] = ConfigRecord({"x": 1})
    return r


def no_metrics(msg, ctx, pid):
    r = good_reply(msg, pid)
    del r.content[METRICS_KEY]
    return r


def raises(msg, ctx, pid):
    raise RuntimeError("client blew up")


def error_reply(msg, ctx, pid):
    return Message(Error(code=1001, reason="refused"), reply_to=msg)


MALFORMED = {
    "NaN": nan_reply,
    "shape": wrong_shape,
    "dtype": wrong_dtype,
    "missing": missing_array,
    "norm": huge_norm,
    "stale": stale_round,
    "zero-n": zero_examples,
    "absurd-n": absurd_examples,
    "extra-record": extra_record,
    "no-metrics": no_metrics,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_reply_is_rejected_with_reason_and_round_goes_on(name: str) -> None:
    grid = InProcessGrid(make_app({1: MALFORMED[name]}), 4, seed=2)
    result = driver().run(grid, GLOBAL)
    report = result.reports[0]
    assert report.train.accepted == 3
    assert len(report.train.rejected) == 1 and report.train.rejected[0][0] == grid.node_ids[1]
    assert report.train.rejected[0][1]  # a reason is recorded
    np.testing.assert_allclose(result.arrays["w"], expected_mean([0, 2, 3]), atol=1e-6)


@pytest.mark.parametrize("behaviour", [raises, error_reply])
def test_client_failure_counts_as_failed_not_crash(behaviour) -> None:
    grid = InProcessGrid(make_app({0: behaviour}), 3, seed=2)
    result = driver().run(grid, GLOBAL)
    report = result.reports[0]
    assert report.train.accepted == 2 and len(report.train.failed) == 1
    np.testing.assert_allclose(result.arrays["b"], expected_mean([1, 2]), atol=1e-6)


def test_too_few_valid_replies_leave_model_unchanged() -> None:
    grid = InProcessGrid(make_app({i: huge_norm for i in range(3)}), 4, seed=2)
    result = driver(min_replies=2).run(grid, GLOBAL)
    report = result.reports[0]
    assert not report.model_updated and "model unchanged" in report.note
    for k in GLOBAL:
        np.testing.assert_array_equal(result.arrays[k], GLOBAL[k])
    assert report.to_record()["model_updated"] is False


def test_dropped_node_is_missing_and_round_completes() -> None:
    grid = InProcessGrid(make_app(), 4, seed=5, drop=lambda node, msg: node == grid.node_ids[2])
    result = driver(rounds=2).run(grid, GLOBAL)
    for report in result.reports:
        assert report.train.missing == 1 and report.train.accepted == 3
    np.testing.assert_allclose(result.arrays["w"], 2 * expected_mean([0, 1, 3]), atol=1e-5)


def test_duplicate_and_forged_replies_are_rejected() -> None:
    app = make_app()
    grid = InProcessGrid(app, 3, seed=9)
    d = driver()
    injected = []

    original_push = grid.push_messages

    def push_and_forge(messages):
        messages = list(messages)
        ids = list(original_push(messages))
        first = messages[0]
        # A second, different reply from the same node to the same instruction.
        dup = good_reply(first, 0, value=100.0)
        grid.inject_reply(dup)
        injected.append(dup)
        return ids

    grid.push_messages = push_and_forge  # type: ignore[method-assign]
    result = d.run(grid, GLOBAL)
    report = result.reports[0]
    assert report.train.accepted == 3
    assert any("duplicate" in reason for _, reason in report.train.rejected)
    np.testing.assert_allclose(result.arrays["w"], expected_mean([0, 1, 2]), atol=1e-6)


def test_fedprox_config_reaches_clients_and_spec_keys_are_sent() -> None:
    seen: list[dict] = []
    grid = InProcessGrid(make_app(seen=seen), 2, seed=1)
    d = driver(
        FedProx(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0, proximal_mu=0.25)
    )
    d.train_config = {"fl-app.spec": "{}"}
    d.run(grid, GLOBAL)
    assert seen and all(c["proximal-mu"] == 0.25 and c[SERVER_ROUND] == 1 for c in seen)
    assert all(c["fl-app.spec"] == "{}" for c in seen)


def test_fedadam_server_step_runs_on_the_mean_update() -> None:
    grid = InProcessGrid(make_app(), 3, seed=1)
    adam = FedAdam(
        fraction_train=1.0,
        min_train_nodes=0,
        min_available_nodes=0,
        eta=0.1,
        beta_1=0.0,
        beta_2=0.0,
        tau=1e-9,
    )
    result = driver(adam).run(grid, GLOBAL)
    # beta_1 = beta_2 = 0: step = eta * Δ̄ / (|Δ̄| + tau) = eta * sign(Δ̄).
    np.testing.assert_allclose(result.arrays["w"], 0.1, atol=1e-5)


def test_sampling_is_seeded_and_sized() -> None:
    seen_nodes: list[list[int]] = []
    grid = InProcessGrid(make_app(), 20, seed=4)
    d = driver(rounds=3, fraction=0.25)

    class Spy:
        def on_round_end(self, report, arrays):
            seen_nodes.append(report.train.sampled)

    d.listeners.append(Spy())
    d.run(grid, GLOBAL)
    assert seen_nodes == [5, 5, 5]
    s = FixedSizeSampler(0.25, seed=4)
    ids = grid.node_ids
    assert s.sample(ids, 1) == s.sample(list(reversed(ids)), 1)
    assert s.sample(ids, 1) != s.sample(ids, 2)
    p = PoissonSampler(0.3, seed=4)
    sizes = [len(p.sample(list(range(1000)), r)) for r in range(1, 30)]
    # Binomial(1000, 0.3): mean 300, sd 14.5; all 29 draws within 6 sd (false-fail < 1e-7).
    assert all(abs(n - 300) < 87 for n in sizes)


def test_federated_evaluation_is_weighted_and_reported() -> None:
    grid = InProcessGrid(make_app(), 4, seed=1)
    result = driver(evaluate=True).run(grid, GLOBAL)
    ev = result.reports[0].evaluate
    assert ev is not None and ev.accepted == 4
    assert ev.metrics["eval-accuracy"] == pytest.approx(0.1 * (0 + 1 + 2 + 3) / 4)
    rec = result.reports[0].to_record()
    assert rec["fed_eval_accuracy"] == pytest.approx(0.15)


def test_samplers_accept_unsigned_64_bit_node_ids() -> None:
    ids = [2**64 - 1, 2**63 + 5, 7, 2**63 - 1]
    assert set(FixedSizeSampler(0.5, seed=0).sample(ids, 1)) <= set(ids)
    assert len(FixedSizeSampler(0.5, seed=0).sample(ids, 1)) == 2
    assert set(PoissonSampler(1.0, seed=0).sample(ids, 1)) == set(ids)
