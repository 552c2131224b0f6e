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
  by :class:`_KeystreamNoise` (a subclass of the optimizer class Opacus picked,
  overriding ``add_noise``) and the batches by :class:`KeystreamPoissonSampler`.
  Opacus' own ``secure_mode`` is not used: it needs ``torchcsprng``, which is not
  published for current torch. The caller's generator then seeds only dropout,
  which no guarantee rests on. With ``secure_mode=False`` (an explicit opt-in for
  experiments, "not for release") every draw comes from streams seeded by the
  caller's :class:`torch.Generator`: equally seeded runs give bit-identical
  weights, and whoever knows the seed can remove the noise.
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

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleHooksFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.module_utils import trainable_modules
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_app.config.schema import ClientTrainConfig
from fl_app.models import opacus_incompatibilities
from fl_app.privacy.noise import SecureNoise
from fl_app.rng import seeded_global_rng
from fl_app.training import TrainStats, as_tensors, make_optimizer

__all__ = [
    "DpSgdResult",
    "DpSgdSettings",
    "GradSampleMode",
    "KeystreamPoissonSampler",
    "ghost_clipping_layers",
    "planned_steps",
    "resolve_grad_sample_mode",
    "train_dpsgd",
]

# Attributes Opacus' hooks and DP optimizer leave on parameters and modules; removed
# after training so the model is a plain module again (picklable, hook-free).
_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")
_PARAM_ATTRS_GHOST = ("_norm_sample",)
_MODULE_ATTRS = ("activations", "max_batch_len")


class GradSampleMode(str, Enum):
    """How Opacus computes per-sample gradients (or their norms).

    ``hooks``: per-layer closed-form per-sample gradients from forward/backward hooks;
    ``functorch``: ``torch.func.vmap`` over every layer; ``ghost``: fast gradient
    clipping (Lee & Kifer 2021; Li et al. 2022): per-sample gradient *norms* without
    materialising per-sample gradients for layers Opacus has a norm sampler for
    (``Linear``, ``Embedding``), then a second backward pass of the reweighted loss;
    other layers fall back to hooks. ``auto``: :func:`resolve_grad_sample_mode`.
    """

    auto = "auto"
    hooks = "hooks"
    functorch = "functorch"
    ghost = "ghost"


@dataclass(frozen=True)
class DpSgdSettings:
    """DP-SGD parameters of one client.

    Attributes
    ----------
    noise_multiplier : float
        ``z``: noise standard deviation in units of ``max_grad_norm`` (>= 0; 0 gives
        clipping without privacy, for tests and diagnostics).
    max_grad_norm : float
        ``C``: L2 bound on each per-sample gradient (> 0).
    grad_sample_mode : GradSampleMode
        Per-sample gradient engine (a member or its string value).
    secure_mode : bool
        Draw Poisson sampling and noise from ChaCha20 keystreams under keys from
        ``os.urandom`` (default); ``False`` draws them from the caller's seeded
        generator (reproducible, predictable by whoever knows the seed).

    Raises
    ------
    ValueError
        Naming the field, the value found and the allowed range.
    """

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: GradSampleMode = GradSampleMode.auto
    secure_mode: bool = True

    def __post_init__(self) -> None:
        z = float(self.noise_multiplier)
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, found {z!r}")
        c = float(self.max_grad_norm)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0, found {c!r}")
        try:
            mode = GradSampleMode(self.grad_sample_mode)
        except ValueError:
            known = ", ".join(m.value for m in GradSampleMode)
            raise ValueError(
                f"grad_sample_mode={self.grad_sample_mode!r} is unknown; choose one of: {known}"
            ) from None
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "max_grad_norm", c)
        object.__setattr__(self, "grad_sample_mode", mode)
        object.__setattr__(self, "secure_mode", bool(self.secure_mode))


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


def _batches_per_epoch(num_examples: int, batch_size: int) -> int:
    # len(DataLoader(dataset, batch_size)) with drop_last=False.
    return -(-num_examples // batch_size)


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


def _expected_batch_size(num_examples: int, batch_size: int) -> int:
    # Opacus computes int(N * (1 / k)), which floating point truncates to N // k - 1
    # for some (N, k), e.g. to 0 for N=49, B=1 (then it divides the gradient by 0).
    # N // k is the value it intends; it only rescales signal and noise together.
    return num_examples // _batches_per_epoch(num_examples, batch_size)


def ghost_clipping_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """Split the layers with trainable parameters by how ghost clipping treats them.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    tuple of list of str
        ``(norm_sampled, fallback)``: qualified names of layers whose per-sample
        gradient norms Opacus computes without per-sample gradients (a registered norm
        sampler: ``Linear``, ``Embedding``), and of the others, which ``ghost`` mode
        handles with per-sample gradients plus a second backward pass.
    """
    samplers = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    norm_sampled: list[str] = []
    fallback: list[str] = []
    for name, sub in trainable_modules(model):
        (norm_sampled if type(sub) in samplers else fallback).append(name or "<root>")
    return norm_sampled, fallback


def _has_tied_parameters(model: nn.Module) -> bool:
    seen: set[int] = set()
    for _, sub in trainable_modules(model):
        for p in sub.parameters(recurse=False):
            if p.requires_grad:
                if id(p) in seen:
                    return True
                seen.add(id(p))
    return False


# Below this many per-sample gradient entries (batch x trainable parameters) hooks beat
# ghost clipping on all-Linear models (measured crossover ~0.5M, see below).
GHOST_MIN_ENTRIES = 500_000


def resolve_grad_sample_mode(
    model: nn.Module, requested: GradSampleMode | str, *, batch_size: int | None = None
) -> str:
    """Return the Opacus ``grad_sample_mode`` to train ``model`` with.

    The ``auto`` rule: **ghost** when every layer with trainable parameters has a
    ghost-clipping norm sampler (``Linear``/``Embedding``, see
    :func:`ghost_clipping_layers`), no parameter is shared between layers and (when
    ``batch_size`` is given) ``batch_size x trainable parameters`` reaches
    ``GHOST_MIN_ENTRIES``; otherwise **hooks**. ``functorch`` is never chosen
    automatically.

    Measured with ``scripts/bench_dpsgd.py`` (2-core CPU shared with other jobs,
    1 torch thread as ``runtime.torch_threads`` gives a client, torch 2.13, Opacus
    1.6): DP step time / plain step time, median of 8-41 paired rounds, and peak
    step memory DP / plain:

    =====================  =======  =====  ============  ============  ============
    model                  params   batch  hooks         functorch     ghost
    =====================  =======  =====  ============  ============  ============
    MLP 8x8 [64]           4.8k     64     3.65x / 37x   6.77x / 37x   3.98x / 2.1x
    MLP 28x28 [256, 256]   269k     256    69.9x / 260x  73.6x / 260x  2.51x / 3.5x
    SmallCNN 28x28         10k      256    1.61x / 1.1x  2.17x / 1.1x  2.18x / 1.5x
    SmallCNN 32x32 [100,   969k     128    2.21x / 2.6x  3.30x / 2.6x  2.87x / 1.4x
    200, 400]
    =====================  =======  =====  ============  ============  ============

    On all-``Linear`` models ghost clipping computes per-sample gradient norms from
    activations and output gradients without the ``B x params`` per-sample gradients
    that bound hooks and functorch (263 MiB for the 269k MLP at B=256), so it wins by
    up to 28x in time and 70x in memory; only on the smallest MLP (below ~0.5M
    per-sample gradient entries, e.g. 4.8k params x 64) is it ~10% (0.1 ms a step)
    slower, which is why the rule takes the batch size into account. Opacus 1.6
    has no norm sampler for convolutions or GroupNorm: ghost mode builds their
    per-sample gradients as hooks does and adds a second backward pass, so on CNNs
    it is slower than hooks (though it frees them layer by layer: less memory).
    ``functorch`` computes the same per-sample gradients as hooks through ``vmap``
    and is never faster here.

    Parameters
    ----------
    model : torch.nn.Module
        The model to train.
    requested : GradSampleMode or str
        ``auto`` or an explicit mode.

    Returns
    -------
    str
        ``"hooks"``, ``"functorch"`` or ``"ghost"``.

    Raises
    ------
    ValueError
        For an unknown mode, or ``ghost`` on a model with parameters shared between
        layers (Opacus' ghost clipping does not support tying).
    """
    try:
        mode = GradSampleMode(requested)
    except ValueError:
        known = ", ".join(m.value for m in GradSampleMode)
        raise ValueError(
            f"grad_sample_mode={requested!r} is unknown; choose one of: {known}"
        ) from None
    tied = _has_tied_parameters(model)
    if mode is GradSampleMode.auto:
        norm_sampled, fallback = ghost_clipping_layers(model)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        large = batch_size is None or batch_size * params >= GHOST_MIN_ENTRIES
        if norm_sampled and not fallback and not tied and large:
            return GradSampleMode.ghost.value
        return GradSampleMode.hooks.value
    if mode is GradSampleMode.ghost and tied:
        raise ValueError(
            "grad_sample_mode='ghost' does not support parameters shared between layers; "
            "use 'hooks' or 'auto'"
        )
    return mode.value


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _expected_opacus_warnings() -> Iterator[None]:
    """Silence the two warnings every DP-SGD call triggers by design."""
    with warnings.catch_warnings():
        # Opacus' secure_mode (torchcsprng) is never used: our keystreams replace it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # Opacus' backward hooks on the first layer, whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _new_privacy_engine() -> PrivacyEngine:
    with _expected_opacus_warnings():
        return PrivacyEngine(accountant="rdp", secure_mode=False)


class KeystreamPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler with its coin flips from a ChaCha20 keystream.

    Each of ``steps`` batches keeps record ``i`` iff ``u_i < q`` for a fresh uniform
    ``u_i`` on ``[0, 1)`` with 53 random bits (probability ``q`` to within ``2**-53``;
    every record when ``q = 1``), exactly the
    sampling :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`
    does and Opacus' accountant assumes, but from ``source`` instead of a
    ``torch.Generator`` (which a seed reproduces).
    """

    def __init__(
        self, *, num_samples: int, sample_rate: float, steps: int, source: SecureNoise
    ) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.source = source

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            # Uniform on [0, 1) like torch.rand, so q = 1 keeps every record.
            u = (self.source.words(self.num_samples) >> np.uint64(11)).astype(np.float64)
            u *= _INV_2_53
            yield np.flatnonzero(u < self.sample_rate).tolist()


class _KeystreamNoise(DPOptimizer):
    """Mixin put in front of the DP optimizer class Opacus chose (see
    :func:`_use_keystream_noise`): ``add_noise`` draws from a ChaCha20 keystream.

    Same contract as Opacus' ``add_noise`` (both ``DPOptimizer`` and the ghost-clipping
    optimizer): ``p.grad = p.summed_grad + N(0, (z·C)²)`` per coordinate, the adaptive
    clipping multiplier honoured, the processed flags checked and set. One keystream
    draw covers every parameter (vectorised: no per-tensor overhead).
    """

    keystream: SecureNoise

    def add_noise(self) -> None:
        z = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = float(z) * float(self.max_grad_norm)  # type: ignore[arg-type]
        sums = [p.summed_grad for p in self.params]
        for g in sums:
            _check_processed_flag(g)
        flat = None
        if std > 0:
            total = sum(g.numel() for g in sums)
            flat = torch.from_numpy(self.keystream.standard_normal_f32(total))
        offset = 0
        for p, g in zip(self.params, sums, strict=True):
            if flat is None:
                noised = g.clone()
            else:
                part = flat[offset : offset + g.numel()].view(g.shape)
                offset += g.numel()
                noised = g + part.to(device=g.device, dtype=g.dtype).mul_(std)
            p.grad = noised.view_as(p)
            _mark_as_processed(g)


_KEYSTREAM_CLASSES: dict[type, type] = {}
_INV_2_53 = 1.0 / float(1 << 53)


def _use_keystream_noise(optimizer: DPOptimizer, source: SecureNoise) -> None:
    """Make ``optimizer`` (of whatever DPOptimizer class Opacus picked) draw its noise
    from ``source``: its class becomes a subclass with :class:`_KeystreamNoise` first."""
    cls = type(optimizer)
    sub = _KEYSTREAM_CLASSES.get(cls)
    if sub is None:
        sub = type(f"Keystream{cls.__name__}", (_KeystreamNoise, cls), {})
        _KEYSTREAM_CLASSES[cls] = sub
    optimizer.__class__ = sub
    optimizer.keystream = source


class _PrivateTrainer:
    """Opacus objects for one training call; :meth:`close` makes the model plain again.

    Used by :func:`train_dpsgd` and by ``scripts/bench_dpsgd.py`` (so the benchmark
    times the very step training runs).
    """

    def __init__(
        self,
        model: nn.Module,
        xt: torch.Tensor,
        yt: torch.Tensor,
        cfg: ClientTrainConfig,
        dp: DpSgdSettings,
        mode: str,
        *,
        sampling_generator: torch.Generator | None,
        noise_generator: torch.Generator | None,
        proximal_mu: float = 0.0,
        engine: PrivacyEngine | None = None,
        keystreams: tuple[SecureNoise, SecureNoise] | None = None,
    ) -> None:
        """``keystreams=(sampling, noise)`` replaces both generators (secure mode)."""
        self.model = model
        self.mode = mode
        self.engine = engine if engine is not None else _new_privacy_engine()
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.mu = float(proximal_mu)
        self.global_params = [p.detach().clone() for p in params] if self.mu > 0 else []
        loader = DataLoader(
            TensorDataset(xt, yt), batch_size=int(cfg.batch_size), generator=sampling_generator
        )
        kwargs: dict[str, object] = {}
        if mode == GradSampleMode.ghost.value:
            kwargs["criterion"] = nn.CrossEntropyLoss(reduction="mean")
        out = self.engine.make_private(
            module=model,
            optimizer=make_optimizer(params, cfg),
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            loss_reduction="mean",
            poisson_sampling=True,
            noise_generator=noise_generator,
            grad_sample_mode=mode,
            wrap_model=False,  # hooks on `model` itself: no wrapper, no `_module.` keys
            **kwargs,
        )
        if mode == GradSampleMode.ghost.value:
            self.hooks, self.optimizer, self.criterion, self.loader = out
        else:
            self.hooks, self.optimizer, self.loader = out
            self.criterion = None
        n = int(yt.shape[0])
        self.optimizer.expected_batch_size = _expected_batch_size(n, int(cfg.batch_size))
        self._sampler: Iterable[list[int]] = self.loader.batch_sampler
        if keystreams is not None:
            sampling, noise = keystreams
            opacus_sampler = self.loader.batch_sampler
            self._sampler = KeystreamPoissonSampler(
                num_samples=opacus_sampler.num_samples,
                sample_rate=opacus_sampler.sample_rate,
                steps=opacus_sampler.steps,
                source=sampling,
            )
            _use_keystream_noise(self.optimizer, noise)
        self.closed = False

    @property
    def batch_sampler(self) -> Iterable[list[int]]:
        """The Poisson batch sampler (Opacus', or its keystream twin): indices per step."""
        return self._sampler

    def _noise_only_gradients(self) -> None:
        # A zero clipped sum: the DP optimizer then adds noise and counts the step.
        if isinstance(self.optimizer, DPOptimizerFastGradientClipping):
            for p in self.optimizer.params:
                p.grad = torch.zeros_like(p)
        else:
            for p in self.optimizer.params:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, int, int]:
        """Take one DP-SGD step on a sampled batch (possibly empty).

        Returns
        -------
        tuple
            ``(ce_sum, correct, batch_size)`` of the forward pass (zeros when empty).
        """
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        bs = int(yb.shape[0])
        ce_sum = 0.0
        correct = 0
        if bs == 0:
            self._noise_only_gradients()
        else:
            logits = self.model(xb)
            if self.criterion is not None:
                loss = self.criterion(logits, yb)
            else:
                loss = nn.functional.cross_entropy(logits, yb, reduction="mean")
            loss.backward()
            with torch.no_grad():
                ce_sum = float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
                correct = int((logits.argmax(dim=1) == yb).sum())
        # DPOptimizer.step is pre_step (clip, noise, scale, count) + the inner step;
        # split so the data-independent proximal gradient joins after the noise.
        if not optimizer.pre_step():
            raise RuntimeError("Opacus skipped a DP-SGD step; gradient accumulation is not used")
        if self.mu > 0:
            with torch.no_grad():
                for p, g in zip(self.params, self.global_params, strict=True):
                    if p.grad is None:
                        raise RuntimeError("the DP optimizer left a parameter without gradient")
                    p.grad.add_(p.detach() - g, alpha=self.mu)
        optimizer.original_optimizer.step()
        return ce_sum, correct, bs

    def steps_counted_by_opacus(self) -> int:
        """Steps Opacus' accountant recorded (a cross-check only)."""
        return sum(int(n) for _, _, n in self.engine.accountant.history)

    def close(self) -> None:
        """Remove every hook and Opacus attribute; leave ``.grad`` unset."""
        if self.closed:
            return
        self.closed = True
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.cleanup()
        for p in self.model.parameters():
            for attr in _PARAM_ATTRS + _PARAM_ATTRS_GHOST:
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
        for sub in self.model.modules():
            for attr in _MODULE_ATTRS:
                if attr in sub.__dict__:
                    delattr(sub, attr)


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
