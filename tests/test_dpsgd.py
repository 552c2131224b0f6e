"""Guarantees of fl_app.privacy.dpsgd: one client's DP-SGD round with Opacus.

Exact checks (no tolerance beyond float32 rounding) use ``q = 1`` (``batch_size >=
N``): every record is in every batch, so the update of one step is known in closed
form from per-sample gradients computed here independently of Opacus.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from fl_app.config.schema import ClientTrainConfig, ModelConfig, ModelName
from fl_app.models import build_model
from fl_app.privacy import dpsgd, dpsgd_opacus
from fl_app.privacy.dpsgd import DpSgdResult, planned_steps, train_dpsgd
from fl_app.privacy.dpsgd_settings import (
    DpSgdSettings,
    GradSampleMode,
    ghost_clipping_layers,
    resolve_grad_sample_mode,
)
from fl_app.training import evaluate, train_local
from fl_app.weights import flatten, model_to_ndarrays, weights_digest

MODES = ["hooks", "functorch", "ghost"]
OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64)


def _model(name: str, **kw: object) -> nn.Module:
    return build_model(ModelConfig(name=ModelName(name), **kw), [1, 8, 8], 10, seed=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(model: nn.Module) -> np.ndarray:
    return flatten(model_to_ndarrays(model))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", MODES)
def test_trains_and_improves_accuracy(digits, name: str, mode: str) -> None:
    x, y = digits
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
    model = _model(name)
    before = evaluate(model, xte, yte).accuracy
    cfg = ClientTrainConfig(local_epochs=2, batch_size=100, lr=0.5, momentum=0.9)
    # Seeded (the opt-in): a utility threshold must not depend on the draw.
    dp = DpSgdSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, secure_mode=False
    )
    out, res = train_dpsgd(model, xtr, ytr, cfg, dp, generator=_gen())
    after = evaluate(out, xte, yte).accuracy
    assert out is model
    assert isinstance(res, DpSgdResult)
    assert res.grad_sample_mode == mode
    assert res.steps == planned_steps(1000, 100, 2)[0] == res.stats.steps == 20
    assert after > before + 0.3, (before, after)
    assert res.stats.num_examples == 1000
    assert math.isfinite(res.stats.loss) and 0.0 <= res.stats.accuracy <= 1.0


def test_auto_mode_resolves_per_model() -> None:
    assert resolve_grad_sample_mode(_model("mlp"), "auto") == "ghost"
    # Below ~0.5M per-sample gradient entries hooks measured faster than ghost.
    mlp = _model("mlp")
    small = 64
    big = -(-500_000 // sum(p.numel() for p in mlp.parameters()))
    assert resolve_grad_sample_mode(mlp, "auto", batch_size=small) == "hooks"
    assert resolve_grad_sample_mode(mlp, "auto", batch_size=big) == "ghost"
    # Conv2d/GroupNorm have norm samplers (fl_app.privacy.ghost_norms): CNNs get ghost.
    assert resolve_grad_sample_mode(_model("cnn"), GradSampleMode.auto) == "ghost"
    for mode in MODES:
        assert resolve_grad_sample_mode(_model("cnn"), mode) == mode
    norm_sampled, fallback = ghost_clipping_layers(_model("cnn"))
    assert norm_sampled[0] == "features.0" and norm_sampled[-1] == "head" and fallback == []
    with pytest.raises(ValueError, match="grad_sample_mode='ew' is unknown"):
        resolve_grad_sample_mode(_model("mlp"), "ew")


def test_tied_parameters_never_get_ghost() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    tied = nn.Sequential(a, nn.ReLU(), b)
    assert resolve_grad_sample_mode(tied, "auto") == "hooks"
    with pytest.raises(ValueError, match="shared between layers"):
        resolve_grad_sample_mode(tied, "ghost")


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("noise_multiplier", {"noise_multiplier": -1.0, "max_grad_norm": 1.0}),
        ("noise_multiplier", {"noise_multiplier": float("nan"), "max_grad_norm": 1.0}),
        ("max_grad_norm", {"noise_multiplier": 1.0, "max_grad_norm": 0.0}),
        ("max_grad_norm", {"noise_multiplier": 1.0, "max_grad_norm": float("inf")}),
        ("grad_sample_mode", {"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                              "grad_sample_mode": "fast"}),
    ],
)  # fmt: skip
def test_settings_are_checked(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        DpSgdSettings(**kwargs)
    assert DpSgdSettings(1, 2, "ghost").grad_sample_mode is GradSampleMode.ghost


# ----------------------------------------------------------------------- steps and q


@pytest.mark.parametrize(
    ("n", "batch", "epochs"),
    [
        (1000, 100, 2),  # k = 10
        (1437, 64, 1),  # k = 23: q = 1/23, not 64/1437
        (93, 1, 1),  # k = 93: Opacus takes int(1 / (1/93)) = 92 steps an epoch
        (49, 1, 1),  # Opacus' own expected batch size is int(49 * (1/49)) = 0
        (10, 64, 3),  # B > N: q = 1
    ],
)
def test_planned_steps_equal_steps_taken(digits, n: int, batch: int, epochs: int) -> None:
    x, y = digits
    steps, q = planned_steps(n, batch, epochs)
    k = -(-n // batch)
    assert q == 1 / k
    cfg = ClientTrainConfig(local_epochs=epochs, batch_size=batch, lr=0.05, momentum=0.0)
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    model, res = train_dpsgd(_model("mlp"), x[:n], y[:n], cfg, dp, generator=_gen())
    assert (res.steps, res.sample_rate) == (steps, q)
    assert res.expected_batch_size == n // k >= 1
    assert np.isfinite(_flat(model)).all()
    if (n, batch) == (93, 1):
        assert steps == 92


def test_planned_steps_agree_with_opacus_loader_on_a_grid() -> None:
    """Opacus' own Poisson loader, built the way make_private builds it."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    for n in [1, 2, 7, 49, 93, 98, 100, 211, 999, 1437, 4999]:
        data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
        for batch in [1, 2, 3, 16, 64, 250, 5000]:
            loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch))
            assert planned_steps(n, batch, 3) == (3 * len(loader), loader.sample_rate)


def test_planned_steps_edge_cases() -> None:
    assert planned_steps(0, 16, 3) == (0, 0.0)
    assert planned_steps(5, 16, 0) == (0, 1.0)
    for args, name in [((-1, 1, 1), "num_examples"), ((1, 0, 1), "batch_size"),
                       ((1, 1, -1), "local_epochs")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            planned_steps(*args)


def test_empty_dataset_and_zero_epochs_train_nothing(digits) -> None:
    x, y = digits
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    model = _model("mlp")
    w0 = _flat(model)
    _, res = train_dpsgd(model, x[:0], y[:0], ClientTrainConfig(), dp, generator=_gen())
    assert (res.steps, res.sample_rate, res.stats.num_examples) == (0, 0.0, 0)
    cfg = ClientTrainConfig(local_epochs=0, batch_size=16)
    _, res = train_dpsgd(model, x[:32], y[:32], cfg, dp, generator=_gen())
    assert (res.steps, res.sample_rate, res.stats.num_examples) == (0, 0.5, 32)
    np.testing.assert_array_equal(_flat(model), w0)


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batches_take_noise_steps(digits, mode: str) -> None:
    # B = 1 over 30 records: q = 1/30, each batch empty with probability ~0.36. Conv
    # layers under functorch crash on zero-size batches unless the step skips the model.
    x, y = digits
    cfg = ClientTrainConfig(local_epochs=1, batch_size=1, lr=0.1, momentum=0.0)
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    model, res = train_dpsgd(_model("cnn"), x[:30], y[:30], cfg, dp, generator=_gen(3))
    assert res.steps == planned_steps(30, 1, 1)[0]
    assert np.isfinite(_flat(model)).all()


def _empty_step_update(mode: str, z: float) -> np.ndarray:
    """Update of one DP step on an empty batch (lr 1, no momentum, expected batch 5)."""
    model = _model("mlp", hidden=[64])
    xt, yt = torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)
    cfg = ClientTrainConfig(local_epochs=1, batch_size=5, lr=1.0, momentum=0.0)
    dp = DpSgdSettings(noise_multiplier=z, max_grad_norm=1.0, grad_sample_mode=mode)
    w0 = _flat(model)
    with dpsgd_opacus._expected_opacus_warnings():
        trainer = dpsgd_opacus._PrivateTrainer(
            model, xt, yt, cfg, dp, mode,
            sampling_generator=_gen(1), noise_generator=_gen(2),
        )  # fmt: skip
        try:
            assert trainer.step(xt[:0], yt[:0]) == (0.0, 0, 0)
        finally:
            trainer.close()
    return _flat(model) - w0


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_step_is_pure_noise(mode: str) -> None:
    """An empty batch adds N(0, (z·C/5)²) per coordinate and nothing else.

    4,810 coordinates: the sample std has relative standard error 1/sqrt(2·4810) = 1.0%;
    the 6% tolerance is 5.9 standard errors (false-failure rate < 1e-8 for any seed).
    """
    np.testing.assert_array_equal(_empty_step_update(mode, 0.0), 0.0)
    delta = _empty_step_update(mode, 2.0)
    assert abs(delta.std() / (2.0 * 1.0 / 5) - 1) < 0.06


# ----------------------------------------------------------------- clipping and noise


def _per_sample_grads(model: nn.Module, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    grads = []
    for i in range(len(y)):
        m = copy.deepcopy(model)
        m.zero_grad()
        xi, yi = torch.from_numpy(x[i : i + 1]), torch.from_numpy(y[i : i + 1])
        nn.functional.cross_entropy(m(xi), yi).backward()
        grads.append(np.concatenate([p.grad.double().numpy().ravel() for p in m.parameters()]))
    return grads


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", MODES)
def test_per_sample_clipping_is_exact_and_bounds_sensitivity(digits, name, mode) -> None:
    """One step, q = 1, z = 0: the update is exactly -lr·mean_i clip_C(g_i).

    Inputs are scaled ×30 so every per-sample gradient norm exceeds C: clipping is
    active, the plain update is far larger, and the DP update stays within lr·C
    (each record moves the sum by at most C: the sensitivity DP-SGD's noise covers).
    """
    x, y = digits
    xs, ys = x[:6] * 30.0, y[:6]
    lr, c = 0.01, 0.5
    model = _model(name)
    g = _per_sample_grads(model, xs, ys)
    norms = np.array([np.linalg.norm(gi) for gi in g])
    assert (norms > 2 * c).all()
    clipped = [gi * min(1.0, c / (ni + 1e-6)) for gi, ni in zip(g, norms, strict=True)]
    expected = -lr * np.mean(clipped, axis=0)

    w0 = _flat(model)  # parameters() and state_dict() orders agree for these models
    cfg = ClientTrainConfig(local_epochs=1, batch_size=6, lr=lr, momentum=0.0)
    dp = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=c, grad_sample_mode=mode)
    _, res = train_dpsgd(model, xs, ys, cfg, dp, generator=_gen())
    delta = _flat(model) - w0
    assert (res.steps, res.sample_rate, res.expected_batch_size) == (1, 1.0, 6)
    np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(delta) <= lr * c * (1 + 1e-5)
    assert np.linalg.norm(lr * np.mean(g, axis=0)) > 2 * lr * c


@pytest.mark.parametrize(("name", "mode"), [("mlp", "hooks"), ("mlp", "ghost"), ("cnn", "hooks")])
def test_noise_std_is_z_c_over_expected_batch_size(digits, name: str, mode: str) -> None:
    """With q = 1 the same batch is drawn in both runs, so the z > 0 update minus the
    z = 0 update is exactly -lr·noise/B: each coordinate N(0, (lr·z·C/B)²).

    MLP: 4,810 coordinates, relative s.e. of the sample std 1.0%; CNN: 6,222 (0.9%).
    Tolerance 6% on the std (>= 5.9 s.e.) and |mean| < 6·std/sqrt(n): false-failure
    rate below 1e-8 for any seed (the test itself is seeded, hence deterministic).
    """
    x, y = digits
    xs, ys = x[:50], y[:50]
    lr, z, c = 1.0, 2.0, 0.5
    cfg = ClientTrainConfig(local_epochs=1, batch_size=50, lr=lr, momentum=0.0)
    updates = {}
    for zz in (0.0, z):
        model = _model(name)
        w0 = _flat(model)
        dp = DpSgdSettings(noise_multiplier=zz, max_grad_norm=c, grad_sample_mode=mode)
        _, res = train_dpsgd(model, xs, ys, cfg, dp, generator=_gen(7))
        updates[zz] = _flat(model) - w0
    noise = updates[z] - updates[0.0]
    sigma = lr * z * c / res.expected_batch_size
    assert res.expected_batch_size == 50
    assert abs(noise.std() / sigma - 1) < 0.06
    assert abs(noise.mean()) < 6 * sigma / math.sqrt(noise.size)


def test_batchnorm_model_is_rejected_naming_the_layer(digits) -> None:
    x, y = digits
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    w0 = [p.detach().clone() for p in model.parameters()]
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm2d\)"):
        train_dpsgd(model, x[:32], y[:32], ClientTrainConfig(), dp, generator=_gen())
    for p, q in zip(model.parameters(), w0, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ------------------------------------------------------- determinism and model state


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_gives_bit_identical_weights(digits, mode: str) -> None:
    x, y = digits
    cfg = ClientTrainConfig(local_epochs=1, batch_size=50, lr=0.2)
    dp = DpSgdSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, secure_mode=False
    )
    digests = []
    for seed in (11, 11, 12):
        model = _model("mlp", dropout=0.2)  # dropout draws from the generator too
        rng_before = torch.get_rng_state()
        train_dpsgd(model, x[:300], y[:300], cfg, dp, generator=_gen(seed))
        assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
        digests.append(weights_digest(model_to_ndarrays(model)))
    assert digests[0] == digests[1] != digests[2]


def test_model_is_plain_after_training(digits) -> None:
    x, y = digits
    model = _model("cnn")
    keys = list(model.state_dict())
    cfg = ClientTrainConfig(local_epochs=1, batch_size=100, lr=0.1)
    for mode in MODES:  # three rounds in a row on the same object
        dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
        out, _ = train_dpsgd(model, x[:300], y[:300], cfg, dp, generator=_gen())
        assert out is model and list(model_to_ndarrays(model)) == keys
        for sub in model.modules():
            assert not sub._forward_hooks and not sub._forward_pre_hooks
            assert not sub._backward_hooks and not getattr(sub, "_backward_pre_hooks", {})
            assert not hasattr(sub, "activations")
        for p in model.parameters():
            assert p.grad is None
            assert not [a for a in OPACUS_PARAM_ATTRS if hasattr(p, a)]
    copy.deepcopy(model)
    train_local(model, x[:100], y[:100], cfg, generator=_gen())


def test_hooks_are_removed_when_training_fails(digits, monkeypatch) -> None:
    x, y = digits
    model = _model("mlp")
    calls = []
    real_step = dpsgd_opacus._PrivateTrainer.step

    def failing_step(self, xb, yb):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step(self, xb, yb)

    monkeypatch.setattr(dpsgd_opacus._PrivateTrainer, "step", failing_step)
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks")
    with pytest.raises(RuntimeError, match="boom"):
        train_dpsgd(model, x[:100], y[:100], ClientTrainConfig(), dp, generator=_gen())
    assert all(not sub._forward_hooks for sub in model.modules())
    assert not [a for p in model.parameters() for a in OPACUS_PARAM_ATTRS if hasattr(p, a)]


def test_fedprox_gradient_is_added_after_the_noise(digits) -> None:
    """q = 1, z = 0, two steps from w0: the proximal term changes only the second step,
    by exactly -lr·mu·(w1 - w0) (it is zero at w0). In the loss, Opacus would drop it."""
    x, y = digits
    xs, ys = x[:20], y[:20]
    lr, mu = 0.1, 5.0
    dp = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="hooks")

    def run(epochs: int, prox: float) -> np.ndarray:
        model = _model("mlp")
        cfg = ClientTrainConfig(local_epochs=epochs, batch_size=20, lr=lr, momentum=0.0)
        train_dpsgd(model, xs, ys, cfg, dp, generator=_gen(), proximal_mu=prox)
        return _flat(model)

    w0 = _flat(_model("mlp"))
    w1 = run(1, mu)
    np.testing.assert_allclose(w1, run(1, 0.0), rtol=0, atol=0)
    np.testing.assert_allclose(run(2, mu) - run(2, 0.0), -lr * mu * (w1 - w0), atol=1e-7)
    with pytest.raises(ValueError, match="proximal_mu"):
        train_dpsgd(_model("mlp"), xs, ys, ClientTrainConfig(), dp, generator=_gen(),
                    proximal_mu=-1.0)  # fmt: skip


# ------------------------------------------------------------------------ secure mode


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_secure_mode_runs_without_the_callers_seed(digits, mode) -> None:
    """Default (secure) mode: equal caller generators give different weights, both
    optimizer classes Opacus picks (DPOptimizer, ghost clipping) take the keystream."""
    x, y = digits
    cfg = ClientTrainConfig(local_epochs=1, batch_size=50, lr=0.2)
    dp = DpSgdSettings(1.0, 1.0, grad_sample_mode=mode)
    assert dp.secure_mode
    digests = []
    for _ in range(2):
        model = _model("mlp")
        _, res = train_dpsgd(model, x[:300], y[:300], cfg, dp, generator=_gen(5))
        assert res.steps == planned_steps(300, 50, 1)[0]
        digests.append(weights_digest(model_to_ndarrays(model)))
    assert digests[0] != digests[1]  # noise and sampling do not come from the caller's seed


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_secure_mode_noise_std(digits, mode: str) -> None:
    """Keystream noise has std z·C/B per coordinate and mean 0; q = 1 so both runs use
    the same batch and the difference of the z > 0 and z = 0 updates is -lr·noise/B.
    4,810 coordinates: tolerance 6% on the std (5.9 standard errors) and |mean| < 6
    standard errors: false-failure rate below 1e-8 (the noise is unseeded here)."""
    x, y = digits
    xs, ys = x[:50], y[:50]
    cfg = ClientTrainConfig(local_epochs=1, batch_size=50, lr=1.0, momentum=0.0)
    updates = {}
    for z in (0.0, 2.0):
        model = _model("mlp")
        w0 = _flat(model)
        dp = DpSgdSettings(noise_multiplier=z, max_grad_norm=0.5, grad_sample_mode=mode)
        train_dpsgd(model, xs, ys, cfg, dp, generator=_gen())
        updates[z] = _flat(model) - w0
    noise = updates[2.0] - updates[0.0]
    sigma = 2.0 * 0.5 / 50
    assert abs(noise.std() / sigma - 1) < 0.06
    assert abs(noise.mean()) < 6 * sigma / math.sqrt(noise.size)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_keystream_optimizer_changes_only_where_the_noise_comes_from(mode: str) -> None:
    """The keystream subclass overrides add_noise and nothing else: clipping, scaling
    and step counting stay Opacus' own (for the optimizer class each mode picks), and
    the sampler keeps Opacus' q and steps."""
    model = _model("mlp")
    xt, yt = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    cfg = ClientTrainConfig(local_epochs=1, batch_size=4, lr=0.1)
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    with dpsgd_opacus._expected_opacus_warnings():
        trainer = dpsgd_opacus._PrivateTrainer(
            model, xt, yt, cfg, dp, mode, sampling_generator=None, noise_generator=None,
            keystreams=(dpsgd.SecureNoise(), dpsgd.SecureNoise()),
        )  # fmt: skip
    try:
        opt = trainer.optimizer
        opacus_cls = type(opt).__mro__[2]
        assert type(opt).__mro__[1] is dpsgd_opacus._KeystreamNoise
        for name in ("pre_step", "clip_and_accumulate", "scale_grad", "step", "zero_grad"):
            assert getattr(type(opt), name) is getattr(opacus_cls, name), name
        sampler = trainer.batch_sampler
        assert isinstance(sampler, dpsgd_opacus.KeystreamPoissonSampler)
        assert (sampler.sample_rate, sampler.steps) == (trainer.loader.sample_rate, 2)
    finally:
        trainer.close()
