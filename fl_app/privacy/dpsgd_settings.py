"""DP-SGD's settings for one client, and which per-sample gradient engine Opacus runs.

:class:`DpSgdSettings` (``z``, ``C``, the engine, ``secure_mode``) is what
:func:`fl_app.privacy.dpsgd.train_dpsgd` trains with; :func:`resolve_grad_sample_mode`
turns ``auto`` into the engine for a given model and batch (ghost clipping where every
layer has a norm sampler, Opacus' or :mod:`fl_app.privacy.ghost_norms`' for Conv2d,
GroupNorm and LayerNorm, and the batch is large enough; hooks otherwise). The engine
changes speed and memory, never the mechanism: every engine clips each per-sample
gradient to ``C`` before the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from opacus.grad_sample import GradSampleHooksFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from torch import nn

# Registers fl-app's Conv2d/GroupNorm/LayerNorm norm samplers in Opacus' registry, so
# every ghost_clipping_layers/auto decision and every ghost-mode run sees them.
from fl_app.privacy import ghost_norms  # noqa: F401

__all__ = [
    "GHOST_MIN_ENTRIES",
    "DpSgdSettings",
    "GradSampleMode",
    "ghost_clipping_layers",
    "resolve_grad_sample_mode",
]


class GradSampleMode(str, Enum):
    """How Opacus computes per-sample gradients (or their norms).

    ``hooks``: per-layer closed-form per-sample gradients from forward/backward hooks;
    ``functorch``: ``torch.func.vmap`` over every layer; ``ghost``: fast gradient
    clipping (Lee & Kifer 2021; Li et al. 2022; Bu et al. 2022): per-sample gradient
    *norms* from the layers' norm samplers (``Linear``, ``Embedding`` from Opacus;
    ``Conv2d``, ``GroupNorm``, ``LayerNorm`` from :mod:`fl_app.privacy.ghost_norms`),
    then the clipped sums book-kept in one backward pass (a second one only for layers
    without a clipped-sum function); layers without a norm sampler fall back to
    per-sample gradients. ``auto``: :func:`resolve_grad_sample_mode`.
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
        sampler: ``Linear``, ``Embedding``, ``Conv2d``, ``GroupNorm``, ``LayerNorm``),
        and of the others, whose per-sample gradients ``ghost`` mode materialises.
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
    ghost-clipping norm sampler (``Linear``/``Embedding``/``Conv2d``/``GroupNorm``/
    ``LayerNorm``, see
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
    slower, which is why the rule takes the batch size into account. The CNN rows
    are Opacus 1.6's ghost mode, which has no norm sampler for convolutions or
    GroupNorm; with :mod:`fl_app.privacy.ghost_norms` (issue 21: Conv2d ghost norms
    and the one-backward-pass book-keeping step) the ~1M CNN's ghost step measured
    1.30-1.42x (paired, loaded machine) against hooks' 2.14-2.20x, with 1.07x memory,
    and SmallCNN 1.44-1.49x against 1.60-1.69x, so ``auto`` now picks ghost for
    CNNs too (docs/performance.md, "Ghost norms for convolutions").
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
