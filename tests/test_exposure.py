"""Exposure of an inserted secret (Carlini et al. 2019): arithmetic, DP limit, training.

Expected values are worked out by hand from the paper's definition
``exposure = log2(R) - log2(rank)``; the DP limit from ``P[exposure >= t] <= e^ε 2^-t
+ δ`` solved by hand; the training cases use digits, the repository's MLP and seeded
draws (secret rng 0, init 0, training generator 0), z for ε=1 from Opacus' own PRV
accountant (not from fl_app).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from fl_app.config.compose import compose_config, config_to_dict
from fl_app.config.schema import ClientTrainConfig, ModelConfig
from fl_app.models import build_model
from fl_app.privacy.dpsgd import planned_steps, train_dpsgd
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy_audit.canaries import _site_files, draw_canaries
from fl_app.privacy_audit.exposure import (
    dp_exposure_limit,
    draw_secret,
    exposure,
    secret_exposure,
)
from fl_app.training import train_local


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exposure_is_log2_candidates_minus_log2_rank() -> None:
    assert exposure(np.array([0.5, 0.1, 0.9, 0.3]), 1) == (1, 2.0)  # lowest of 4
    assert exposure(np.array([0.5, 0.1, 0.9, 0.3]), 2) == (4, 0.0)  # highest
    assert exposure(np.array([0.5, 0.1, 0.9, 0.3]), 0) == (3, 2 - math.log2(3))
    # Ties count against the secret: 0.1 twice, rank 2 for either.
    assert exposure(np.array([0.5, 0.1, 0.9, 0.1]), 1) == (2, 1.0)
    assert exposure(np.array([0.5, 0.1, 0.9, 0.1]), 3) == (2, 1.0)
    losses = np.arange(1024, dtype=np.float64)
    assert exposure(losses, 0) == (1, 10.0)
    assert exposure(losses, 7) == (8, 7.0)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="secret"):
            exposure(np.zeros(4), bad)
    with pytest.raises(ValueError, match="1-D"):
        exposure(np.zeros((2, 2)), 0)


def test_dp_limit_solves_e_eps_2_to_minus_t_plus_delta_at_five_percent() -> None:
    # e^1 * 2^-t + 1e-5 = 0.05  =>  t = log2(e / (0.05 - 1e-5))
    assert dp_exposure_limit(1.0, 1e-5) == pytest.approx(math.log2(math.e / 0.04999), rel=1e-12)
    assert dp_exposure_limit(0.0, 0.0) == pytest.approx(math.log2(20), rel=1e-12)
    assert dp_exposure_limit(2.0, 0.0, alpha=0.25) == pytest.approx(2 / math.log(2) + 2)
    assert dp_exposure_limit(None, 1e-5) is None
    assert dp_exposure_limit(math.inf, 1e-5) is None
    assert dp_exposure_limit(1.0, 0.05) is None


def test_secret_candidates_are_reproducible_on_the_data_range() -> None:
    a = draw_secret((1, 8, 8), 10, (0.0, 1.0), np.random.default_rng(5), num_candidates=300)
    b = draw_secret((1, 8, 8), 10, (0.0, 1.0), np.random.default_rng(5), num_candidates=300)
    assert np.array_equal(a.x, b.x) and (a.label, a.secret) == (b.label, b.secret)
    assert a.x.shape == (300, 1, 8, 8) and a.x.dtype == np.float32
    assert a.x.min() >= 0.0 and a.x.max() <= 1.0 and a.x.std() > 0.2  # U(0,1): sd 0.29
    assert 0 <= a.label < 10 and 0 <= a.secret < 300
    x, y = a.secret_record
    assert np.array_equal(x[0], a.x[a.secret]) and y.tolist() == [a.label]
    two = draw_secret((4,), 3, (0.0, 16.0), np.random.default_rng(5), num_candidates=2)
    assert two.x.shape == (2, 4) and two.x.max() > 1.0 and two.x.max() <= 16.0
    with pytest.raises(ValueError, match="at least 2 candidates"):
        draw_secret((1, 8, 8), 10, (0.0, 1.0), np.random.default_rng(5), num_candidates=1)


def test_the_secret_goes_into_site_zeros_file_only(tmp_path: Path) -> None:
    cfg = compose_config("config", ["runtime=inprocess", "dataset.num_partitions=2"])
    raw = config_to_dict(cfg)
    x = np.zeros((10, 1, 8, 8), np.float32)
    canaries = draw_canaries(x, np.zeros(10, np.int64), 4, 10, np.random.default_rng(0))
    secret = draw_secret((1, 8, 8), 10, (0.0, 1.0), np.random.default_rng(0), 50)
    plain = _site_files(yaml.safe_load(yaml.safe_dump(raw)), canaries, tmp_path / "a")
    with_secret = _site_files(raw, canaries, tmp_path / "b", secret.secret_record)
    scale = float(cfg.dataset.pixel_scale)
    s0, p0 = np.load(with_secret[0]), np.load(plain[0])
    assert len(s0["y"]) == len(p0["y"]) + 1
    assert np.allclose(s0["x"][-1], secret.secret_record[0][0] * scale)
    assert int(s0["y"][-1]) == secret.label
    assert np.array_equal(np.load(with_secret[1])["y"], np.load(plain[1])["y"])


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def _trained_exposure(
    digits: tuple[np.ndarray, np.ndarray], dp: DpSgdSettings | None, train: ClientTrainConfig
) -> float:
    """400 digits records + the secret (one of 1000 candidates, rng 0), trained once."""
    x, y = digits
    secret = draw_secret((1, 8, 8), 10, (0.0, 1.0), np.random.default_rng(0))
    sx, sy = secret.secret_record
    tx, ty = np.concatenate([x[:400], sx]), np.concatenate([y[:400], sy])
    model = build_model(ModelConfig(hidden=[256]), [1, 8, 8], 10, seed=0)
    gen = torch.Generator().manual_seed(0)
    if dp is None:
        train_local(model, tx, ty, train, generator=gen)
    else:
        train_dpsgd(model, tx, ty, train, dp, generator=gen)
    section = secret_exposure(model, secret, 1.0, 1e-5)
    assert section["max_exposure_bits"] == pytest.approx(math.log2(1000))
    assert section["candidates"] == 1000
    assert section["exposure_bits"] == pytest.approx(math.log2(1000 / section["rank"]))
    assert section["dp_limit_95_bits"] == pytest.approx(math.log2(math.e / 0.04999))
    return float(section["exposure_bits"])


def test_overfit_training_exposes_the_secret_and_dpsgd_at_epsilon_one_does_not(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """Non-private, 60 epochs: the secret ranks near the top of 1000 (seeded: rank 12,
    6.4 bits; a random rank gives 1.4 bits on average). DP-SGD at ε=1 (z from Opacus'
    PRV): below the 95 % DP limit log2(e/0.05) = 5.8 and well below the overfit run
    (seeded: 0.65 bits; the same DP-SGD with z=0, clipping only, gave 5.3 bits, so the
    low exposure comes from the noise)."""
    from opacus.accountants.utils import get_noise_multiplier

    plain = ClientTrainConfig(local_epochs=60, batch_size=16, lr=0.1, momentum=0.9)
    overfit = _trained_exposure(digits, None, plain)
    assert overfit > 4.0
    train = ClientTrainConfig(local_epochs=30, batch_size=16, lr=0.5, momentum=0.9)
    steps, q = planned_steps(401, train.batch_size, train.local_epochs)
    z = get_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="prv"
    )
    dp = DpSgdSettings(noise_multiplier=z, max_grad_norm=1.0, secure_mode=False)
    private = _trained_exposure(digits, dp, train)
    limit = dp_exposure_limit(1.0, 1e-5)
    assert limit is not None and private < limit
    assert private < overfit - 2.0
