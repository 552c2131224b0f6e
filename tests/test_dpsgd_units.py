"""DP-SGD as units: settings, planning, mode choice, keystream wiring (fl_app/privacy/
dpsgd.py, dpsgd_settings.py, dpsgd_opacus.py).

tests/test_dpsgd.py trains real models; this file pins the small pieces with values
worked by hand: ``(steps, q)`` from ``k = ceil(N / B)``, the ghost/hooks rule at its
``GHOST_MIN_ENTRIES`` edge, Poisson batches from 53-bit uniforms chosen by the test,
noise ``summed_grad + z·C·n`` from normals chosen by the test, and one-step training
statistics against a cross-entropy computed here with torch. Kills mutants of dpsgd.py
(mutmut, tests/mutants-accepted.md).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from fl_app.config.schema import ClientTrainConfig
from fl_app.privacy import dpsgd, dpsgd_opacus, dpsgd_settings
from fl_app.privacy.dpsgd import planned_steps, train_dpsgd
from fl_app.privacy.dpsgd_opacus import KeystreamPoissonSampler
from fl_app.privacy.dpsgd_settings import (
    GHOST_MIN_ENTRIES,
    DpSgdSettings,
    GradSampleMode,
    ghost_clipping_layers,
    resolve_grad_sample_mode,
)


# ---------------------------------------------------------------------- settings
def test_settings_coerce_and_accept_the_edges() -> None:
    s = DpSgdSettings(0, 1)
    assert s.noise_multiplier == 0.0 and isinstance(s.noise_multiplier, float)
    assert s.max_grad_norm == 1.0 and isinstance(s.max_grad_norm, float)
    assert s.grad_sample_mode is GradSampleMode.auto and s.secure_mode is True
    tiny = DpSgdSettings(1e-300, 1e-300, "hooks", secure_mode=0)  # type: ignore[arg-type]
    assert tiny.max_grad_norm == 1e-300 and tiny.grad_sample_mode is GradSampleMode.hooks
    assert tiny.secure_mode is False
    assert DpSgdSettings(1, 1, secure_mode=1).secure_mode is True  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("z", "c", "message"),
    [
        (-1e-9, 1.0, "noise_multiplier must be finite and >= 0, found -1e-09"),
        (math.inf, 1.0, "noise_multiplier must be finite and >= 0, found inf"),
        (math.nan, 1.0, "noise_multiplier must be finite and >= 0, found nan"),
        (1.0, 0.0, "max_grad_norm must be finite and > 0, found 0.0"),
        (1.0, -2.0, "max_grad_norm must be finite and > 0, found -2.0"),
        (1.0, math.nan, "max_grad_norm must be finite and > 0, found nan"),
    ],
)
def test_settings_refuse_out_of_range(z: float, c: float, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DpSgdSettings(z, c)
    assert str(err.value) == message


def test_unknown_mode_lists_the_known_ones() -> None:
    known = "choose one of: auto, hooks, functorch, ghost"
    with pytest.raises(ValueError) as err:
        DpSgdSettings(1.0, 1.0, "fast")  # type: ignore[arg-type]
    assert str(err.value) == f"grad_sample_mode='fast' is unknown; {known}"
    with pytest.raises(ValueError) as err:
        resolve_grad_sample_mode(nn.Linear(2, 2), "fast")
    assert str(err.value) == f"grad_sample_mode='fast' is unknown; {known}"


# ---------------------------------------------------------------------- planning
@pytest.mark.parametrize(
    ("n", "b", "e", "steps", "q"),
    [
        (100, 10, 3, 30, 0.1),  # k = 10
        (101, 10, 1, 11, 1 / 11),  # k = ceil(10.1) = 11
        (1437, 64, 2, 46, 1 / 23),  # q = 1/23, not 64/1437
        (93, 1, 1, 92, 1 / 93),  # int(1 / (1/93)) = int(92.99999999999999) = 92
        (5, 16, 2, 2, 1.0),  # B > N: q = 1, one step an epoch
        (1, 1, 1, 1, 1.0),
        (7, 3, 0, 0, 1 / 3),  # zero epochs: no step, the rate still reported
        (0, 16, 3, 0, 0.0),  # empty: nothing trained or spent
    ],
)
def test_planned_steps_by_hand(n: int, b: int, e: int, steps: int, q: float) -> None:
    assert planned_steps(n, b, e) == (steps, q)


def test_planned_steps_refuse_negative_or_zero_batch() -> None:
    cases = [
        ((-1, 1, 1), "num_examples must be >= 0, found -1"),
        ((1, 0, 1), "train.batch_size must be >= 1, found 0"),
        ((1, 1, -1), "train.local_epochs must be >= 0, found -1"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            planned_steps(*args)
        assert str(err.value) == message
    assert planned_steps(0, 1, 0) == (0, 0.0)  # all at their lowest allowed values


@pytest.mark.parametrize(
    ("n", "b", "expected"), [(49, 1, 1), (1437, 64, 62), (10, 64, 10), (100, 10, 10)]
)
def test_expected_batch_size_is_n_floor_k(n: int, b: int, expected: int) -> None:
    # N // ceil(N / B): 1437 // 23 = 62; 49 // 49 = 1 (Opacus' float gives 0).
    assert dpsgd_opacus._expected_batch_size(n, b) == expected


# ----------------------------------------------------------------- mode selection
def _mlp(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_ghost_layers_by_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.Embedding(3, 2))
    assert ghost_clipping_layers(model) == (["0", "2"], ["1"])
    assert ghost_clipping_layers(nn.Linear(2, 2)) == (["<root>"], [])
    assert ghost_clipping_layers(nn.Conv1d(1, 1, 1)) == ([], ["<root>"])


def test_tied_parameters_detection() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    assert not dpsgd_settings._has_tied_parameters(nn.Sequential(a, b))
    b.weight = a.weight
    assert dpsgd_settings._has_tied_parameters(nn.Sequential(a, b))
    a.weight.requires_grad_(False)  # shared but frozen: nothing trains it twice
    assert not dpsgd_settings._has_tied_parameters(nn.Sequential(a, b))


def test_auto_picks_ghost_exactly_from_ghost_min_entries() -> None:
    model = _mlp(8)
    params = 4 * 8 + 8 + 8 * 3 + 3  # 67 trainable parameters
    edge = -(-GHOST_MIN_ENTRIES // params)  # the smallest batch reaching the threshold
    assert GHOST_MIN_ENTRIES == 500_000
    assert (edge - 1) * params < GHOST_MIN_ENTRIES <= edge * params
    assert resolve_grad_sample_mode(model, "auto", batch_size=edge) == "ghost"
    assert resolve_grad_sample_mode(model, "auto", batch_size=edge - 1) == "hooks"
    assert resolve_grad_sample_mode(model, "auto") == "ghost"  # no batch size: large
    exact = nn.Linear(1000, 499)  # 499,500 parameters: batch 1 is below, batch 2 above
    assert resolve_grad_sample_mode(exact, "auto", batch_size=1) == "hooks"
    assert resolve_grad_sample_mode(nn.Linear(999, 500), "auto", batch_size=1) == "ghost"  # 500k
    # Frozen parameters do not count towards the entries.
    frozen = _mlp(8)
    frozen[1].weight.requires_grad_(False)
    assert resolve_grad_sample_mode(frozen, "auto", batch_size=edge) == "hooks"


def test_auto_falls_back_to_hooks_and_explicit_modes_are_kept() -> None:
    conv = nn.Sequential(nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Linear(4, 2))
    assert resolve_grad_sample_mode(conv, "auto") == "hooks"
    assert resolve_grad_sample_mode(nn.ReLU(), "auto") == "hooks"  # nothing to train
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    tied = nn.Sequential(a, b)
    assert resolve_grad_sample_mode(tied, "auto") == "hooks"
    assert resolve_grad_sample_mode(tied, "hooks") == "hooks"
    assert resolve_grad_sample_mode(tied, GradSampleMode.functorch) == "functorch"
    with pytest.raises(ValueError) as err:
        resolve_grad_sample_mode(tied, "ghost")
    assert str(err.value) == (
        "grad_sample_mode='ghost' does not support parameters shared between layers; "
        "use 'hooks' or 'auto'"
    )
    assert resolve_grad_sample_mode(conv, "ghost") == "ghost"


def test_device_of_a_parameterless_model_is_the_cpu() -> None:
    assert dpsgd._device_of(nn.ReLU()) == torch.device("cpu")
    assert dpsgd._device_of(nn.Linear(1, 1)) == torch.device("cpu")


# ------------------------------------------------------------- keystream wiring
def _word(u: float) -> int:
    """The 64-bit word whose top 53 bits encode ``u`` (a multiple of 2**-53)."""
    return int(u * 2**53) << 11 | 0x7FF  # low 11 bits are discarded by the sampler


class _Words:
    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.calls: list[int] = []

    def words(self, n: int) -> np.ndarray:
        self.calls.append(n)
        start = sum(self.calls[:-1])
        return np.array([_word(u) for u in self.values[start : start + n]], dtype=np.uint64)


def test_poisson_batches_keep_a_record_iff_its_uniform_is_below_q() -> None:
    u = [0.0, 0.25, 0.5, 0.75, 0.5 - 2**-53, 1 - 2**-53]  # step 1: records 0..2, step 2: 3..5
    source = _Words(u)
    sampler = KeystreamPoissonSampler(num_samples=3, sample_rate=0.5, steps=2, source=source)  # type: ignore[arg-type]
    assert list(sampler) == [[0, 1], [1]]
    assert source.calls == [3, 3]
    full = KeystreamPoissonSampler(num_samples=3, sample_rate=1.0, steps=2, source=_Words(u))  # type: ignore[arg-type]
    assert list(full) == [[0, 1, 2], [0, 1, 2]]  # q = 1: every record (u < 1 always)
    assert len(full) == 2


class _Normals:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def standard_normal_f32(self, size: int) -> np.ndarray:
        self.calls.append(size)
        return np.arange(1, size + 1, dtype=np.float32)


def _keystream_optimizer(z: float, c: float) -> tuple[DPOptimizer, list[nn.Parameter]]:
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=z, max_grad_norm=c, expected_batch_size=1
    )
    for i, p in enumerate(params):
        p.summed_grad = torch.full_like(p, 10.0 * (i + 1))  # type: ignore[attr-defined]
    return opt, params


def test_keystream_noise_is_z_c_times_the_sources_normals_in_parameter_order() -> None:
    opt, params = _keystream_optimizer(0.5, 4.0)
    source = _Normals()
    dpsgd_opacus._use_keystream_noise(opt, source)  # type: ignore[arg-type]
    assert type(opt).__name__ == "KeystreamDPOptimizer" and isinstance(opt, DPOptimizer)
    opt.add_noise()
    assert source.calls == [7]  # one draw for all 4 + 3 coordinates
    # std = z * C = 2: grad = summed + 2 * (1, 2, ..., 7), the first 4 to the 2x2 matrix.
    assert params[0].grad is not None and params[1].grad is not None
    assert torch.equal(params[0].grad, torch.tensor([[12.0, 14.0], [16.0, 18.0]]))
    assert torch.equal(params[1].grad, torch.tensor([30.0, 32.0, 34.0]))
    with pytest.raises(ValueError):
        opt.add_noise()  # each summed gradient is noised once (Opacus' processed flag)


def test_keystream_noise_honours_the_adjusted_multiplier_and_z_zero() -> None:
    opt, params = _keystream_optimizer(0.5, 4.0)
    opt._adjusted_noise_multiplier = 0.25  # type: ignore[attr-defined]
    dpsgd_opacus._use_keystream_noise(opt, _Normals())  # type: ignore[arg-type]
    opt.add_noise()
    assert params[1].grad is not None
    assert torch.equal(params[1].grad, torch.tensor([25.0, 26.0, 27.0]))  # std 0.25 * 4 = 1
    opt, params = _keystream_optimizer(0.0, 4.0)
    source = _Normals()
    dpsgd_opacus._use_keystream_noise(opt, source)  # type: ignore[arg-type]
    opt.add_noise()
    assert source.calls == []  # no noise, no keystream drawn
    assert params[0].grad is not None
    assert torch.equal(params[0].grad, torch.full((2, 2), 10.0))
    assert params[0].grad is not params[0].summed_grad  # type: ignore[attr-defined]


def test_keystream_subclass_is_made_once_per_optimizer_class() -> None:
    a, _ = _keystream_optimizer(1.0, 1.0)
    b, _ = _keystream_optimizer(1.0, 1.0)
    dpsgd_opacus._use_keystream_noise(a, _Normals())  # type: ignore[arg-type]
    dpsgd_opacus._use_keystream_noise(b, _Normals())  # type: ignore[arg-type]
    assert type(a) is type(b) is dpsgd_opacus._KEYSTREAM_CLASSES[DPOptimizer]
    assert type(a).__mro__[1:3] == (dpsgd_opacus._KeystreamNoise, DPOptimizer)


# -------------------------------------------------------------------- training
def _data(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2][:n])


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_proximal_mu_must_be_finite_and_non_negative(bad: float) -> None:
    x, y = _data()
    with pytest.raises(ValueError, match=f"proximal_mu must be finite and >= 0, found {bad}"):
        train_dpsgd(
            _mlp(),
            x,
            y,
            ClientTrainConfig(),
            DpSgdSettings(1.0, 1.0),
            generator=torch.Generator().manual_seed(0),
            proximal_mu=bad,
        )


def test_zero_epochs_return_the_plan_and_the_mode_without_training() -> None:
    x, y = _data()
    model = _mlp()
    model.eval()
    cfg = ClientTrainConfig(local_epochs=0, batch_size=4)
    out, res = train_dpsgd(
        model, x, y, cfg, DpSgdSettings(1.0, 1.0, "hooks"), generator=torch.Generator()
    )
    assert out is model and model.training  # left in training mode
    assert (res.steps, res.sample_rate, res.grad_sample_mode, res.expected_batch_size) == (
        0,
        0.5,
        "hooks",
        0,
    )
    assert (res.stats.loss, res.stats.accuracy, res.stats.num_examples, res.stats.steps) == (
        0.0,
        0.0,
        6,
        0,
    )


@pytest.mark.parametrize("secure", [True, False])
def test_one_full_batch_step_reports_the_loss_and_accuracy_before_it(secure: bool) -> None:
    """q = 1 (B >= N), one epoch: one step on every record; its statistics are those of
    the initial model, computed here with torch."""
    x, y = _data()
    torch.manual_seed(0)
    model = _mlp()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        accuracy = float((logits.argmax(1) == torch.from_numpy(y)).float().mean())
    cfg = ClientTrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0)
    dp = DpSgdSettings(1.0, 1.0, "hooks", secure_mode=secure)
    _, res = train_dpsgd(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(1))
    assert (res.steps, res.sample_rate, res.grad_sample_mode, res.expected_batch_size) == (
        1,
        1.0,
        "hooks",
        6,
    )
    assert res.stats.loss == pytest.approx(loss, rel=1e-5)
    assert res.stats.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert (res.stats.num_examples, res.stats.steps) == (6, 1)


class _Recorded(dpsgd.SecureNoise):
    """SecureNoise that records which draws it served (the test's view of the wiring)."""

    made: ClassVar[list[_Recorded]] = []

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []
        self.inside = False
        _Recorded.made.append(self)

    def words(self, n: int) -> np.ndarray:
        if not self.inside:  # not the uniforms standard_normal_f32 draws itself
            self.calls.append(("words", n))
        return super().words(n)

    def standard_normal_f32(self, size: int) -> np.ndarray:
        self.calls.append(("normal", size))
        self.inside = True
        try:
            return super().standard_normal_f32(size)
        finally:
            self.inside = False


def test_secure_mode_draws_batches_and_noise_from_two_fresh_keystreams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two epochs at q = 1 over 6 records: 2 steps. The first keystream serves the
    batches (6 uniforms a step), the second the noise (one N(0, 1) per trainable
    parameter a step: 67 for the 4-8-3 MLP); seeded mode makes neither."""
    monkeypatch.setattr(dpsgd, "SecureNoise", _Recorded)
    _Recorded.made = []
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=2, batch_size=8, lr=0.1, momentum=0.0)
    gen = torch.Generator().manual_seed(0)
    _, res = train_dpsgd(_mlp(), x, y, cfg, DpSgdSettings(1.0, 1.0, "hooks"), generator=gen)
    assert res.steps == 2 and res.stats.steps == 2
    assert len(_Recorded.made) == 2
    sampling, noise = _Recorded.made
    assert sampling.calls == [("words", 6), ("words", 6)]
    assert noise.calls == [("normal", 67), ("normal", 67)]
    _Recorded.made = []
    seeded = DpSgdSettings(1.0, 1.0, "hooks", secure_mode=False)
    train_dpsgd(_mlp(), x, y, cfg, seeded, generator=torch.Generator().manual_seed(0))
    assert _Recorded.made == []


def test_a_loader_that_disagrees_with_the_plan_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-check against Opacus' loader (an Opacus upgrade changing its sampling)."""
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0)
    for plan, message in (
        ((2, 1.0), "Opacus' Poisson loader has 1 steps per epoch, planned_steps expected 2"),
        ((1, 0.5), "Opacus samples at q=1.0, planned_steps expected 0.5"),
    ):
        monkeypatch.setattr(dpsgd, "planned_steps", lambda *_a, plan=plan: plan)
        with pytest.raises(RuntimeError) as err:
            train_dpsgd(
                _mlp(), x, y, cfg, DpSgdSettings(1.0, 1.0, "hooks"), generator=torch.Generator()
            )
        assert str(err.value) == message


def test_a_module_with_its_own_parameter_and_a_child_is_not_tied() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.inner = nn.Linear(2, 2)

    assert not dpsgd_settings._has_tied_parameters(Scaled())


def test_accuracy_counts_the_records_the_model_gets_right() -> None:
    """A model that predicts class 0 for every record (zero weights, bias on class 0):
    two of the six labels are 0, so the accuracy is 2/6 by hand (not 4/6, the records
    it gets wrong; an accuracy of 1/2 could not tell the two apart)."""
    x, _ = _data()
    y = np.array([0, 1, 2, 0, 2, 1])
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    model = nn.Sequential(nn.Flatten(), linear)
    cfg = ClientTrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0)
    dp = DpSgdSettings(0.0, 1.0, GradSampleMode.hooks, secure_mode=False)
    _, res = train_dpsgd(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(1))
    assert res.steps == 1 and res.stats.num_examples == 6
    assert res.stats.accuracy == pytest.approx(2 / 6, abs=1e-12)


def test_a_step_reports_its_own_batch_empty_or_of_one_record() -> None:
    """An empty batch reports (0, 0, 0) (a pure-noise step adds no loss and no correct
    record to the round's sums); a batch of one record goes through the model: its
    cross-entropy and correctness are those of the model before the step, computed here
    with torch."""
    x, y = _data()
    torch.manual_seed(0)
    model = _mlp()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        logits = model(xt[:1])
        ce = float(nn.functional.cross_entropy(logits, yt[:1], reduction="sum"))
        right = int(logits.argmax(1)[0] == yt[0])
    cfg = ClientTrainConfig(local_epochs=1, batch_size=2, lr=0.1, momentum=0.0)
    dp = DpSgdSettings(1.0, 1.0, GradSampleMode.hooks, secure_mode=False)
    with dpsgd_opacus._expected_opacus_warnings():
        trainer = dpsgd_opacus._PrivateTrainer(
            model, xt, yt, cfg, dp, "hooks", sampling_generator=None,
            noise_generator=torch.Generator().manual_seed(0), keystreams=None,
        )  # fmt: skip
    try:
        one = trainer.step(xt[:1], yt[:1])
        empty = trainer.step(xt[:0], yt[:0])
    finally:
        trainer.close()
    assert one[0] == pytest.approx(ce, rel=1e-6) and one[1:] == (right, 1)
    assert empty == (0.0, 0, 0)


def test_statistics_sum_over_every_step() -> None:
    """lr = 0 and z = 0 keep the model fixed: two full-batch epochs (q = 1) see every
    record twice, so the mean loss and accuracy are those of the initial model."""
    x, y = _data()
    torch.manual_seed(0)
    model = _mlp()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        accuracy = float((logits.argmax(1) == torch.from_numpy(y)).float().mean())
    cfg = ClientTrainConfig(local_epochs=2, batch_size=8, lr=0.0, momentum=0.0)
    dp = DpSgdSettings(0.0, 1.0, "hooks")
    _, res = train_dpsgd(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(1))
    assert (res.steps, res.stats.steps, res.stats.num_examples) == (2, 2, 6)
    assert res.stats.loss == pytest.approx(loss, rel=1e-5)
    assert res.stats.accuracy == pytest.approx(accuracy, abs=1e-12)


def test_seeded_mode_depends_on_the_callers_generator_only() -> None:
    """secure_mode=False: equal generators give bit-identical weights whatever the global
    RNG holds (every draw comes from the three seeds taken from the generator)."""
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=2, batch_size=2, lr=0.5, momentum=0.0)
    dp = DpSgdSettings(1.0, 1.0, "hooks", secure_mode=False)

    def weights(global_seed: int, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = _mlp()
        torch.manual_seed(global_seed)
        train_dpsgd(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in model.parameters()]

    a, b, other = weights(1, 5), weights(2, 5), weights(1, 6)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, other, strict=True))


def test_empty_poisson_batches_are_indexed_as_empty_long_tensors() -> None:
    """B = 1 over 6 records: q = 1/6, 6 steps an epoch, each batch empty with probability
    (5/6)**6 = 0.33; over 3 epochs (18 steps) at least one is empty except with
    probability 0.67**18 < 7e-4 (an empty index list must still index as long)."""
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=3, batch_size=1, lr=0.1, momentum=0.0)
    model, res = train_dpsgd(
        _mlp(), x, y, cfg, DpSgdSettings(1.0, 1.0, "hooks"), generator=torch.Generator()
    )
    assert res.steps == 18 and res.sample_rate == 1 / 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_step_count_opacus_disagrees_with_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpsgd_opacus._PrivateTrainer, "steps_counted_by_opacus", lambda self: 99)
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=1, batch_size=8, lr=0.1, momentum=0.0)
    with pytest.raises(RuntimeError) as err:
        train_dpsgd(
            _mlp(), x, y, cfg, DpSgdSettings(1.0, 1.0, "hooks"), generator=torch.Generator()
        )
    assert str(err.value) == "DP-SGD took 1 steps (Opacus counted 99), planned_steps says 1"


class _NeverSample(dpsgd.SecureNoise):
    """Every uniform is (2**53 - 1) / 2**53: no record is ever below q < 1."""

    def words(self, n: int) -> np.ndarray:
        return np.full(n, np.uint64(2**64 - 1), dtype=np.uint64)


def test_a_round_of_empty_batches_reports_zero_loss_and_accuracy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dpsgd, "SecureNoise", _NeverSample)
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=1, batch_size=1, lr=0.1, momentum=0.0)
    _, res = train_dpsgd(
        _mlp(), x, y, cfg, DpSgdSettings(1.0, 1.0, "hooks"), generator=torch.Generator()
    )
    assert (res.steps, res.stats.steps, res.stats.num_examples) == (6, 6, 6)
    assert (res.stats.loss, res.stats.accuracy) == (0.0, 0.0)


def test_an_opacus_incompatible_model_is_refused_naming_each_layer() -> None:
    x, y = _data()
    bad = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError) as err:
        train_dpsgd(
            bad, x, y, ClientTrainConfig(), DpSgdSettings(1.0, 1.0), generator=torch.Generator()
        )
    assert str(err.value) == (
        "model is not compatible with Opacus DP-SGD:\n"
        "  - layer '1' (BatchNorm1d): BatchNorm cannot support training with differential "
        "privacy.\n"
        "  - layer '3' (BatchNorm1d): BatchNorm cannot support training with differential "
        "privacy."
    )


def test_auto_mode_sees_the_batch_the_data_allows() -> None:
    """``auto`` is resolved with ``min(B, max(1, N))``: 6 records of the 67-parameter MLP
    give 402 per-sample entries (hooks); one record of a 300,300-parameter layer gives
    300,300 (hooks), where two would reach GHOST_MIN_ENTRIES (ghost)."""
    cfg = ClientTrainConfig(local_epochs=0, batch_size=16)
    x, y = _data()
    _, res = train_dpsgd(_mlp(), x, y, cfg, DpSgdSettings(1.0, 1.0), generator=torch.Generator())
    assert res.grad_sample_mode == "hooks"
    wide = nn.Linear(1000, 300)
    one = np.zeros((1, 1000), dtype=np.float32)
    _, res = train_dpsgd(
        wide, one, np.array([0]), cfg, DpSgdSettings(1.0, 1.0), generator=torch.Generator()
    )
    assert res.grad_sample_mode == "hooks"
    assert resolve_grad_sample_mode(wide, "auto", batch_size=2) == "ghost"


def test_proximal_mu_defaults_to_zero() -> None:
    """Seeded mode, equal generators: leaving proximal_mu out equals passing 0."""
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=3, batch_size=8, lr=0.5, momentum=0.0)
    dp = DpSgdSettings(0.5, 1.0, "hooks", secure_mode=False)
    runs = []
    for kwargs in ({}, {"proximal_mu": 0.0}, {"proximal_mu": 1.0}):
        torch.manual_seed(0)
        model = _mlp()
        train_dpsgd(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(3), **kwargs)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_ghost_clipping_takes_the_step_hooks_takes() -> None:
    """z = 0, q = 1, one step: both engines clip the same per-sample gradients to C = 0.1
    and average them over the 6 records, so the updated weights agree (float32)."""
    x, y = _data()
    cfg = ClientTrainConfig(local_epochs=1, batch_size=8, lr=1.0, momentum=0.0)
    out = {}
    for mode in ("hooks", "ghost"):
        torch.manual_seed(0)
        model = _mlp()
        dp = DpSgdSettings(0.0, 0.1, mode, secure_mode=False)
        _, res = train_dpsgd(model, x, y, cfg, dp, generator=torch.Generator().manual_seed(0))
        assert res.grad_sample_mode == mode
        out[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.manual_seed(0)
    before = torch.cat([p.detach().flatten() for p in _mlp().parameters()])
    assert not torch.allclose(out["hooks"], before)
    assert torch.allclose(out["hooks"], out["ghost"], rtol=0, atol=1e-6)


def test_each_parameter_gets_its_own_slice_of_noise() -> None:
    """Three tensors (2, 3 and 1 coordinates): normals 1..6 in order, never reused."""
    params = [
        nn.Parameter(torch.zeros(2)),
        nn.Parameter(torch.zeros(3)),
        nn.Parameter(torch.zeros(1)),
    ]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
    )
    for p in params:
        p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
    dpsgd_opacus._use_keystream_noise(opt, _Normals())  # type: ignore[arg-type]
    opt.add_noise()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    assert [g.tolist() for g in grads if g is not None] == [[1.0, 2.0], [3.0, 4.0, 5.0], [6.0]]
