"""DP-SGD's Opacus wiring: the objects of one training call, and our randomness in them.

:class:`_PrivateTrainer` attaches Opacus' hooks to the model in place (no
``GradSampleModule`` wrapper), builds its DP optimizer and Poisson loader, takes one
step per batch (a pure-noise step for an empty batch) and makes the model plain again
on :meth:`~_PrivateTrainer.close`. In ``secure_mode`` Opacus' two random draws are
replaced (docs/architecture.md, Rules: who holds the randomness): the batches by
:class:`KeystreamPoissonSampler` and the noise by :class:`_KeystreamNoise`, each from
a ChaCha20 keystream (:class:`fl_app.privacy.noise.SecureNoise`); Opacus still clips,
sums, scales and counts. :func:`fl_app.privacy.dpsgd.train_dpsgd` is the entry point
and its module docstring the full account; ``_batches_per_epoch`` and
``_expected_batch_size`` repeat Opacus' own arithmetic so the plan matches the loader.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_app.config.schema import ClientTrainConfig
from fl_app.privacy.dpsgd_settings import DpSgdSettings, GradSampleMode
from fl_app.privacy.ghost_norms import (
    CLIPPED_SUM_ATTR,
    backward_targets,
    ghost_backward,
    needs_second_pass,
)
from fl_app.privacy.noise import SecureNoise
from fl_app.training import make_optimizer

__all__ = ["KeystreamPoissonSampler"]

# Attributes Opacus' hooks and DP optimizer leave on parameters and modules; removed
# after training so the model is a plain module again (picklable, hook-free).
_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")
_PARAM_ATTRS_GHOST = ("_norm_sample", CLIPPED_SUM_ATTR)
_MODULE_ATTRS = ("activations", "max_batch_len")


def _batches_per_epoch(num_examples: int, batch_size: int) -> int:
    # len(DataLoader(dataset, batch_size)) with drop_last=False.
    return -(-num_examples // batch_size)


def _expected_batch_size(num_examples: int, batch_size: int) -> int:
    # Opacus computes int(N * (1 / k)), which floating point truncates to N // k - 1
    # for some (N, k), e.g. to 0 for N=49, B=1 (then it divides the gradient by 0).
    # N // k is the value it intends; it only rescales signal and noise together.
    return num_examples // _batches_per_epoch(num_examples, batch_size)


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
            # Drawn on the CPU (torch has no CSPRNG on a GPU), copied to the device once
            # a step (no copy on the CPU); fl_app.privacy.dpsgd: who holds the randomness.
            flat = flat.to(sums[0].device)
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
        # Ghost mode also returns Opacus' loss wrapper: unused, the step is book-kept.
        self.hooks, self.optimizer, self.loader = out[0], out[1], out[-1]
        self.ghost = mode == GradSampleMode.ghost.value
        self.second_pass = needs_second_pass(model)
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
        elif self.ghost:
            # Ghost: one backward pass towards the first layers' outputs, clipped sums
            # book-kept (fl_app.privacy.ghost_norms); gradients equal to hooks mode's.
            with backward_targets(self.model) as targets:
                logits = self.model(xb)
            per_sample = nn.functional.cross_entropy(logits, yb, reduction="none")
            ghost_backward(
                self.hooks, self.params, per_sample, targets, second_pass=self.second_pass
            )
        else:
            logits = self.model(xb)
            nn.functional.cross_entropy(logits, yb, reduction="mean").backward()
        if bs > 0:
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
