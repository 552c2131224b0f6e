"""Tests for fl_app.training: convergence, determinism, FedProx, evaluation, edge cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.nn import functional

from fl_app.config.schema import ClientTrainConfig, ModelConfig, ModelName, OptimizerName
from fl_app.models import build_model
from fl_app.training import (
    EvalStats,
    TrainStats,
    evaluate,
    make_optimizer,
    shuffled_batches,
    train_local,
)
from fl_app.weights import flatten, model_to_ndarrays

DIGITS_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, *DIGITS_SHAPE)
    return x, data.target.astype(np.int64)


def _model(name: ModelName = ModelName.mlp, seed: int = 0, **kw: object) -> torch.nn.Module:
    cfg = ModelConfig(name=name, hidden=[64], **kw)  # type: ignore[arg-type]
    return build_model(cfg, DIGITS_SHAPE, 10, seed=seed)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mlp_learns_digits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    model = _model()
    cfg = ClientTrainConfig(local_epochs=5, batch_size=32, lr=0.1, momentum=0.9)
    stats = train_local(model, x, y, cfg, generator=_gen(0))
    assert stats.num_examples == len(y)
    assert stats.steps == 5 * -(-len(y) // 32)
    assert 0.7 < stats.accuracy <= 1.0
    assert np.isfinite(stats.loss)
    assert evaluate(model, x, y).accuracy > 0.9


def test_cnn_with_adam_learns_digits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    model = _model(ModelName.cnn, channels=[8, 16], norm_groups=4)
    cfg = ClientTrainConfig(
        local_epochs=3, batch_size=32, lr=0.01, optimizer=OptimizerName.adam, weight_decay=1e-4
    )
    train_local(model, x, y, cfg, generator=_gen(0))
    assert evaluate(model, x, y).accuracy > 0.9


def _train_weights(
    x: np.ndarray, y: np.ndarray, gen_seed: int, **model_kw: object
) -> tuple[TrainStats, np.ndarray]:
    model = _model(seed=3, **model_kw)
    cfg = ClientTrainConfig(local_epochs=2, batch_size=16, lr=0.05)
    stats = train_local(model, x, y, cfg, generator=_gen(gen_seed))
    return stats, flatten(model_to_ndarrays(model))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bit_identical_with_same_generator_seed(
    digits: tuple[np.ndarray, np.ndarray], dropout: float
) -> None:
    x, y = digits[0][:300], digits[1][:300]
    rng_before = torch.get_rng_state()
    s1, w1 = _train_weights(x, y, 11, dropout=dropout)
    s2, w2 = _train_weights(x, y, 11, dropout=dropout)
    _, w3 = _train_weights(x, y, 12, dropout=dropout)
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG was used"
    assert s1 == s2
    assert np.array_equal(w1, w2)
    assert not np.array_equal(w1, w3)


def test_generator_is_the_only_source_of_order(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    torch.manual_seed(0)
    _, w1 = _train_weights(x[:100], y[:100], 5)
    torch.manual_seed(1)
    _, w2 = _train_weights(x[:100], y[:100], 5)
    assert np.array_equal(w1, w2)


def test_proximal_term_pulls_towards_global(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:400], digits[1][:400]
    cfg = ClientTrainConfig(local_epochs=2, batch_size=32, lr=0.05, momentum=0.0)
    start = flatten(model_to_ndarrays(_model(seed=1)))
    distances = {}
    for mu in (0.0, 1.0, 10.0):
        model = _model(seed=1)
        train_local(model, x, y, cfg, generator=_gen(0), proximal_mu=mu)
        distances[mu] = float(np.linalg.norm(flatten(model_to_ndarrays(model)) - start))
    assert distances[10.0] < distances[1.0] < distances[0.0]
    assert distances[10.0] < 0.5 * distances[0.0]


def test_reported_loss_is_mean_over_examples_seen(digits: tuple[np.ndarray, np.ndarray]) -> None:
    # With lr=0 the model never changes, so the training means equal an evaluation.
    x, y = digits[0][:70], digits[1][:70]
    model = _model()
    cfg = ClientTrainConfig(local_epochs=3, batch_size=32, lr=0.0)
    stats = train_local(model, x, y, cfg, generator=_gen(0))
    ref = evaluate(model, x, y)
    assert stats.steps == 3 * 3
    assert stats.num_examples == 70
    assert stats.loss == pytest.approx(ref.loss, rel=1e-5)
    assert stats.accuracy == pytest.approx(ref.accuracy)


def test_evaluate_matches_manual_computation(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:301], digits[1][:301]
    model = _model(ModelName.cnn, dropout=0.5)
    model.train()
    stats = evaluate(model, x, y, batch_size=64)
    assert model.training, "evaluate must restore the previous mode"
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        target = torch.from_numpy(y)
        loss = functional.cross_entropy(logits, target).item()
        acc = (logits.argmax(1) == target).double().mean().item()
    assert isinstance(stats, EvalStats)
    assert stats.num_examples == 301
    assert stats.loss == pytest.approx(loss, rel=1e-5)
    assert stats.accuracy == pytest.approx(acc)


def test_empty_dataset(digits: tuple[np.ndarray, np.ndarray]) -> None:
    model = _model()
    before = flatten(model_to_ndarrays(model))
    x = np.zeros((0, *DIGITS_SHAPE), np.float32)
    y = np.zeros((0,), np.int64)
    gen = _gen(0)
    gen_state = gen.get_state()
    stats = train_local(model, x, y, ClientTrainConfig(), generator=gen)
    assert stats == TrainStats(loss=0.0, accuracy=0.0, num_examples=0, steps=0)
    assert np.array_equal(flatten(model_to_ndarrays(model)), before)
    assert torch.equal(gen.get_state(), gen_state)
    assert evaluate(model, x, y) == EvalStats(loss=0.0, accuracy=0.0, num_examples=0)


def test_one_example(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:1], digits[1][:1]
    model = _model(ModelName.cnn)
    cfg = ClientTrainConfig(local_epochs=3, batch_size=32)
    stats = train_local(model, x, y, cfg, generator=_gen(0), proximal_mu=0.01)
    assert stats.num_examples == 1 and stats.steps == 3
    assert np.isfinite(stats.loss) and stats.accuracy in (0.0, 1 / 3, 2 / 3, 1.0)
    ev = evaluate(model, x, y)
    assert ev.num_examples == 1 and np.isfinite(ev.loss)


def test_shuffled_batches_cover_every_example_once() -> None:
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    y = torch.arange(10)
    batches = list(shuffled_batches(x, y, 4, _gen(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[0] for b in batches]).flatten().long(), seen)


def test_make_optimizer() -> None:
    params = list(_model().parameters())
    sgd = make_optimizer(params, ClientTrainConfig(lr=0.2, momentum=0.5, weight_decay=0.1))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["weight_decay"] == 0.1
    adam = make_optimizer(params, ClientTrainConfig(optimizer=OptimizerName.adam, lr=0.01))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.01
    bad = dataclasses.replace(ClientTrainConfig(), optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"train\.optimizer"):
        make_optimizer(params, bad)


def test_bad_data_raises(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    with pytest.raises(ValueError, match="length"):
        train_local(_model(), x[:5], y[:4], ClientTrainConfig(), generator=_gen(0))
    with pytest.raises(ValueError, match="integer"):
        evaluate(_model(), x[:2], np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        train_local(_model(), x[:5], y[:5], ClientTrainConfig(batch_size=0), generator=_gen(0))
