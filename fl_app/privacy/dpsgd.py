"""One client's local DP-SGD training for one federated round, with Opacus.

Implements DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS
2016) through Opacus' :class:`~opacus.PrivacyEngine`: each step draws a Poisson
sample of the local records, clips every per-sample gradient to ``max_grad_norm``
``C``, sums them, adds Gaussian noise of standard deviation ``z·C`` and divides by
the expected batch size. The guarantee is record level, per institution
(docs/architecture.md, Threat models: ``record_level``), against anyone who sees the
model after any step.

Trust assumptions and what this module does *not* do:

* It does not account. The caller owns the privacy history (one ledger per run,
  persisted across rounds, house rule 5); this module returns the number of steps
  actually taken and the sampling rate they used, and :func:`planned_steps` gives
  both *before* training so the server can project ε and refuse a round that would
  exceed the budget. Opacus' own accountant is attached by ``make_private`` and
  only used here as a cross-check of the step count.
* The sampling rate is Opacus', not ``batch_size / num_examples``: ``make_private``
  turns a ``DataLoader`` of ``k = ceil(N / B)`` batches into Poisson sampling with
  ``q = 1 / k`` and ``int(1 / q)`` steps per epoch (which is ``k - 1`` for some
  ``k``, e.g. 93, because of floating point). :func:`planned_steps` repeats exactly
  those expressions and :func:`train_dpsgd` checks the loader agrees.
* The noised sum is divided by ``N // k``. Opacus computes ``int(N * (1 / k))``,
  which floating point makes one less for some ``(N, k)`` and 0 for ``N=49, B=1``
  (a division by zero: NaN weights); we set the value it intends. This scales
  signal and noise together, so z, q and the guarantee are unchanged.
* Who holds the randomness (docs/architecture.md, Rules). With ``secure_mode=True`` (the
  default) the Gaussian noise and the Poisson batches come from two ChaCha20
  keystreams (:class:`fl_app.privacy.noise.SecureNoise`) under keys this process
  draws from ``os.urandom`` at each call: nothing the server sends (seed, round,
  node id, the caller's generator) enters them, so the server cannot regenerate
  and subtract a client's noise, nor learn which records a step used. Opacus still
  clips, sums, scales and counts: only its two random draws are replaced, the noise
  by :class:`~fl_app.privacy.dpsgd_opacus._KeystreamNoise` (a subclass of the optimizer
  class Opacus picked, overriding ``add_noise``) and the batches by
  :class:`~fl_app.privacy.dpsgd_opacus.KeystreamPoissonSampler`.
  Opacus' own ``secure_mode`` is not used: it needs ``torchcsprng``, which is not
  published for current torch. The caller's generator then seeds only dropout,
  which no guarantee rests on. With ``secure_mode=False`` (an explicit opt-in for
  experiments, "not for release") every draw comes from streams seeded by the
  caller's :class:`torch.Generator`: equally seeded runs give bit-identical
  weights, and whoever knows the seed can remove the noise.
* On a GPU (``train.device``, :mod:`fl_app.device`) the model, the batches, the
  per-sample gradients and their clipping live on the device; the randomness does not
  move. torch has no CSPRNG on CUDA (its generator is Philox with a 64-bit seed, a
  statistical generator with no security claim against a party that sees outputs or
  guesses seeds), so seeding it from ``os.urandom`` each step would rest the guarantee
  on an unanalysed assumption. Instead the same ChaCha20 keystream draws the noise on
  the CPU and it is copied to the device once a step (``P`` float32 values: 4 MB for a
  1M-parameter model), and the Poisson batches are drawn on the CPU as index lists.
  Its cost against the step is measured by ``make bench``'s GPU section
  (docs/performance.md). Only dropout uses the device's own generator.
* Empty Poisson batches (probability ``(1 - q)^N`` per step) still take a step
  that adds pure noise: skipping it would reveal that the batch was empty, which the
  accountant does not cover. The step is taken without a forward pass (zero clipped
  sum handed to the DP optimizer), because vmap-based per-sample gradients
  (``functorch`` mode) fail on zero-size convolution batches in torch 2.x.
* FedProx (``proximal_mu > 0``): the proximal gradient ``mu·(w - w_global)`` does
  not touch the data, so it is added *after* clipping and noising (post-processing,
  no privacy cost). Put into the loss instead, Opacus would silently drop it: the
  per-sample hooks see only the data term and the DP optimizer overwrites ``.grad``.
  Weight decay and momentum are likewise applied by the inner optimizer to the
  noised gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn

from fl_app.config.schema import ClientTrainConfig
from fl_app.models import opacus_incompatibilities
from fl_app.privacy.dpsgd_opacus import (
    _batches_per_epoch,
    _expected_batch_size,
    _expected_opacus_warnings,
    _new_privacy_engine,
    _PrivateTrainer,
)
from fl_app.privacy.dpsgd_settings import DpSgdSettings, resolve_grad_sample_mode
from fl_app.privacy.noise import SecureNoise
from fl_app.rng import seeded_global_rng
from fl_app.training import TrainStats, as_tensors

__all__ = [
    "DpSgdResult",
    "planned_steps",
    "train_dpsgd",
]


@dataclass(frozen=True)
class DpSgdResult:
    """What one DP-SGD training call did, for the caller's ledger and audit record.

    Attributes
    ----------
    stats : TrainStats
        Loss/accuracy over the examples of the non-empty Poisson batches (computed
        in each forward pass before that batch's update), ``N``, and ``steps``.
    steps : int
        DP-SGD steps taken (empty batches included); always ``planned_steps(...)[0]``.
    sample_rate : float
        Poisson sampling rate ``q`` used at every step; ``planned_steps(...)[1]``.
    grad_sample_mode : str
        The per-sample gradient engine actually used (``auto`` resolved).
    expected_batch_size : int
        ``N // ceil(N / B)``: the noised sum is divided by it (0 when no step ran).
        Noise std of the averaged gradient is ``z·C / expected_batch_size``.
    """

    stats: TrainStats
    steps: int
    sample_rate: float
    grad_sample_mode: str
    expected_batch_size: int


def planned_steps(num_examples: int, batch_size: int, local_epochs: int) -> tuple[int, float]:
    """Return ``(steps, sample_rate)`` that :func:`train_dpsgd` will use.

    Mirrors Opacus 1.6 exactly (``PrivacyEngine.make_private`` with
    ``poisson_sampling=True``): a loader of ``k = ceil(N / B)`` batches becomes
    Poisson sampling with ``q = 1 / k`` (so ``q = 1`` when ``B >= N``) and
    ``int(1 / q)`` steps per epoch. Note ``int(1 / (1 / k))`` is ``k - 1`` for some
    ``k`` (93, 99, 105, ...), and ``q`` is not ``B / N`` (``N=1437, B=64``: ``q=1/23``,
    not ``0.0445``). The accountant must use these values, not recomputed ones.

    Parameters
    ----------
    num_examples : int
        Local training set size ``N`` (>= 0).
    batch_size : int
        Configured batch size ``B`` (>= 1); the expected Poisson batch size is
        ``N // k``, close to but not always ``B``.
    local_epochs : int
        Passes over the data (>= 0).

    Returns
    -------
    tuple
        ``(steps, q)``; ``(0, 0.0)`` for an empty dataset (nothing is trained or spent).

    Raises
    ------
    ValueError
        On a negative size or epoch count, or a batch size below 1.
    """
    n, b, e = int(num_examples), int(batch_size), int(local_epochs)
    if n < 0:
        raise ValueError(f"num_examples must be >= 0, found {num_examples}")
    if b < 1:
        raise ValueError(f"train.batch_size must be >= 1, found {batch_size}")
    if e < 0:
        raise ValueError(f"train.local_epochs must be >= 0, found {local_epochs}")
    if n == 0:
        return 0, 0.0
    sample_rate = 1 / _batches_per_epoch(n, b)  # opacus: sample_rate = 1 / len(data_loader)
    steps_per_epoch = int(1 / sample_rate)  # UniformWithReplacementSampler.steps
    return e * steps_per_epoch, sample_rate


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train_dpsgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: ClientTrainConfig,
    dp: DpSgdSettings,
    *,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> tuple[nn.Module, DpSgdResult]:
    """Train ``model`` in place with DP-SGD for one round (Opacus, Poisson sampling).

    The model is validated, Opacus hooks are attached to it directly (no
    ``GradSampleModule`` wrapper), it is trained, and the hooks and every attribute
    Opacus added are removed again, also when training raises. The returned module
    *is* ``model``: its ``state_dict`` keys are the non-private model's (no
    ``_module.`` prefix), so :func:`fl_app.weights.model_to_ndarrays` reads the
    trained weights from either. The model is left in training mode with ``.grad``
    unset.

    Parameters
    ----------
    model : torch.nn.Module
        Model to train; parameters are updated in place.
    x : numpy.ndarray
        Features ``[N, *input_shape]`` (cast to ``float32``).
    y : numpy.ndarray
        Integer labels ``[N]``.
    cfg : ClientTrainConfig
        ``local_epochs``, ``batch_size`` (sets ``q``, see :func:`planned_steps`),
        ``optimizer``, ``lr``, ``momentum``, ``weight_decay``.
    dp : DpSgdSettings
        ``z``, ``C``, per-sample gradient mode, ``secure_mode``.
    generator : torch.Generator
        CPU generator; three seeds are drawn from it (Poisson sampling, noise,
        dropout) when ``secure_mode`` is off, only the dropout seed when it is on
        (sampling and noise then come from fresh OS-keyed keystreams, so equal
        generators give different runs). The global RNG is neither read nor changed.
    proximal_mu : float, optional
        FedProx weight; its gradient is added after the noise (module docstring).

    Returns
    -------
    tuple
        ``(model, DpSgdResult)``. An empty dataset or zero epochs return without
        training: ``steps=0``, and the sampling rate of :func:`planned_steps`.

    Raises
    ------
    ValueError
        If Opacus cannot train the model (naming each offending layer), on malformed
        data or invalid hyper-parameters, or an unusable ``grad_sample_mode``.
    RuntimeError
        If the steps taken disagree with :func:`planned_steps` (an Opacus change).
    """
    mu = float(proximal_mu)
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"proximal_mu must be finite and >= 0, found {proximal_mu!r}")
    model.train()
    problems = opacus_incompatibilities(model)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"model is not compatible with Opacus DP-SGD:\n{listing}")
    n_rows = int(np.asarray(y).shape[0])
    mode = resolve_grad_sample_mode(
        model, dp.grad_sample_mode, batch_size=min(int(cfg.batch_size), max(1, n_rows))
    )
    device = _device_of(model)
    xt, yt = as_tensors(x, y, device)
    n = int(yt.shape[0])
    steps_planned, sample_rate = planned_steps(n, cfg.batch_size, cfg.local_epochs)
    engine = _new_privacy_engine()
    if steps_planned == 0:
        stats = TrainStats(loss=0.0, accuracy=0.0, num_examples=n, steps=0)
        return model, DpSgdResult(stats, 0, sample_rate, mode, 0)
    with _expected_opacus_warnings():
        return _train(
            model, xt, yt, cfg, dp, mode, engine, generator, mu, steps_planned, sample_rate
        )


def _train(
    model: nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    cfg: ClientTrainConfig,
    dp: DpSgdSettings,
    mode: str,
    engine: PrivacyEngine,
    generator: torch.Generator,
    mu: float,
    steps_planned: int,
    sample_rate: float,
) -> tuple[nn.Module, DpSgdResult]:
    # long: one round's linear sequence (sources, trainer, checks, epochs, cross-checks);
    # mutation testing's accepted survivors in tests/mutants-accepted.md are named by it.
    device = _device_of(model)
    n = int(yt.shape[0])
    sampling_gen: torch.Generator | None = None
    noise_gen: torch.Generator | None = None
    keystreams: tuple[SecureNoise, SecureNoise] | None = None
    if dp.secure_mode:
        # Fresh OS-random keys in this process: nothing the caller passed enters them.
        keystreams = (SecureNoise(), SecureNoise())
        layer_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    else:
        seeds = torch.randint(0, 2**62, (3,), generator=generator).tolist()
        sampling_gen = torch.Generator().manual_seed(int(seeds[0]))
        noise_gen = torch.Generator(device=device).manual_seed(int(seeds[1]))
        layer_seed = int(seeds[2])

    trainer = _PrivateTrainer(
        model,
        xt,
        yt,
        cfg,
        dp,
        mode,
        sampling_generator=sampling_gen,
        noise_generator=noise_gen,
        proximal_mu=mu,
        engine=engine,
        keystreams=keystreams,
    )
    loss_sum = 0.0
    correct = 0
    seen = 0
    steps = 0
    try:
        per_epoch = len(trainer.loader)
        if per_epoch * int(cfg.local_epochs) != steps_planned:
            raise RuntimeError(
                f"Opacus' Poisson loader has {per_epoch} steps per epoch, planned_steps "
                f"expected {steps_planned // int(cfg.local_epochs)}"
            )
        if trainer.loader.sample_rate != sample_rate:
            raise RuntimeError(
                f"Opacus samples at q={trainer.loader.sample_rate!r}, "
                f"planned_steps expected {sample_rate!r}"
            )
        with seeded_global_rng(layer_seed, device):
            for _ in range(int(cfg.local_epochs)):
                # Opacus' sampler with its generator; index the tensors directly rather
                # than collating example by example (same batches, far less overhead).
                for indices in trainer.batch_sampler:
                    idx = torch.as_tensor(indices, dtype=torch.long, device=device)
                    b_loss, b_correct, bs = trainer.step(xt[idx], yt[idx])
                    loss_sum += b_loss
                    correct += b_correct
                    seen += bs
                    steps += 1
        counted = trainer.steps_counted_by_opacus()
    finally:
        trainer.close()
    if steps != steps_planned or counted != steps:
        raise RuntimeError(
            f"DP-SGD took {steps} steps (Opacus counted {counted}), "
            f"planned_steps says {steps_planned}"
        )
    stats = TrainStats(
        loss=loss_sum / seen if seen else 0.0,
        accuracy=correct / seen if seen else 0.0,
        num_examples=n,
        steps=steps,
    )
    result = DpSgdResult(
        stats=stats,
        steps=steps,
        sample_rate=sample_rate,
        grad_sample_mode=mode,
        expected_batch_size=_expected_batch_size(n, int(cfg.batch_size)),
    )
    return model, result
