"""Gradient inversion of one client's update, as a server without SecAgg sees it.

Attack: "Inverting Gradients" (Geiping, Bauermeister, Dröge & Moeller 2020, NeurIPS):
optimise dummy inputs ``x̂`` so that the gradient they induce on the global model has
maximal cosine similarity with the observed update, plus a total-variation prior,
with Adam and step decay, and keep the best of a few random restarts (chosen by the
attacker's own objective, never by the true records). Labels are inferred from the
sign of the last layer's bias gradient (iDLG: Zhao, Mopuri & Bilen 2020): exact for a
batch of one, a heuristic (the ``B`` most negative entries) for larger batches; the
share inferred correctly is reported.

What the server observes (:func:`observed_update`), one local step on a batch of
``B`` records from the global model ``w``:

``none``
    plain SGD, ``Δ = −η·∇L`` (a scaled gradient: the attack matches directions,
    so the learning rate is irrelevant; momentum's first step equals plain SGD).
``clip``
    ``Δ`` clipped to L2 norm ``C`` (client-level clipping without noise, e.g. central
    DP where the server itself is trusted): direction unchanged, so no protection
    against this attack, which is the point of showing it.
``dpsgd``
    one DP-SGD step of :func:`fl_app.privacy.dpsgd.train_dpsgd` on the ``B`` records
    (``q = 1``): per-record clip to ``C``, Gaussian noise ``z·C`` on the sum.
``local_dp``
    ``Δ`` clipped to ``C`` plus Gaussian noise of std ``z·C`` on every coordinate
    (client-level local DP).

With secure aggregation the server sees only the sum over the cohort, never ``Δ``;
these numbers describe a server without it (the run's SecAgg setting is reported
beside them).

Trust assumptions: the attacker is the server, knows the global model it sent and
the architecture, and sees the client's update of a single step (the easiest case;
several local epochs average many steps and make inversion harder).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from fl_app.config.schema import ClientTrainConfig, OptimizerName
from fl_app.privacy.clipping import clip_l2
from fl_app.privacy.dpsgd import train_dpsgd
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy.noise import SeededNoise
from fl_app.privacy_audit.metrics import mse, psnr
from fl_app.training import train_local
from fl_app.weights import model_to_ndarrays

__all__ = [
    "InversionResult",
    "InversionSettings",
    "Protection",
    "infer_labels",
    "invert_update",
    "observed_update",
    "run_inversion",
]


class Protection(str, Enum):
    """What the client applies to its update before the server sees it."""

    none = "none"
    clip = "clip"
    dpsgd = "dpsgd"
    local_dp = "local_dp"


@dataclass(frozen=True)
class InversionSettings:
    """Attack hyper-parameters (Geiping et al. 2020, scaled down to small images).

    Attributes
    ----------
    iterations : int
        Adam steps per restart; the learning rate drops 10x at 3/8, 5/8 and 7/8.
    restarts : int
        Random initialisations; the one with the lowest attack objective is kept.
    lr : float
        Adam learning rate on the pixels.
    tv_weight : float
        Weight of the total-variation prior.
    seed : int
        Seeds the initialisations.
    """

    iterations: int = 300
    restarts: int = 2
    lr: float = 0.1
    tv_weight: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.iterations) < 1:
            raise ValueError(f"iterations must be >= 1, found {self.iterations!r}")
        if int(self.restarts) < 1:
            raise ValueError(f"restarts must be >= 1, found {self.restarts!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be finite and > 0, found {self.lr!r}")
        if not (math.isfinite(self.tv_weight) and self.tv_weight >= 0):
            raise ValueError(f"tv_weight must be finite and >= 0, found {self.tv_weight!r}")


def _step_cfg(lr: float, batch_size: int) -> ClientTrainConfig:
    return ClientTrainConfig(
        local_epochs=1,
        batch_size=int(batch_size),
        lr=float(lr),
        momentum=0.0,
        weight_decay=0.0,
        optimizer=OptimizerName.sgd,
    )


def observed_update(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    protection: Protection | str,
    *,
    lr: float,
    clip: float,
    noise_multiplier: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """The update ``w_after − w`` one client step on ``(x, y)`` sends, as the server sees it.

    ``model`` is not modified (a copy is trained). See the module docstring for the
    protections.
    """
    mode = Protection(protection)
    start = model_to_ndarrays(model)
    work = _clone(model)
    gen = torch.Generator().manual_seed(int(seed))
    cfg = _step_cfg(lr, len(y))
    if mode is Protection.dpsgd:
        dp = DpSgdSettings(noise_multiplier=noise_multiplier, max_grad_norm=clip)
        train_dpsgd(work, x, y, cfg, dp, generator=gen)
    else:
        train_local(work, x, y, cfg, generator=gen)
    after = model_to_ndarrays(work)
    update = {k: (after[k].astype(np.float64) - start[k]) for k in start}
    if mode in (Protection.clip, Protection.local_dp):
        update = clip_l2(update, clip).arrays
    if mode is Protection.local_dp:
        noise = SeededNoise(int(seed), (0x1D7,))
        update = {
            k: v + noise.normal(noise_multiplier * clip, v.size).reshape(v.shape)
            for k, v in update.items()
        }
    return update


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _last_bias_name(model: nn.Module, num_classes: int) -> str:
    name = None
    for n, p in model.named_parameters():
        if p.ndim == 1 and p.shape[0] == num_classes:
            name = n
    if name is None:
        raise ValueError("model has no output bias of size num_classes: cannot infer labels")
    return name


def infer_labels(
    model: nn.Module, update: dict[str, np.ndarray], batch_size: int, num_classes: int
) -> np.ndarray:
    """Labels from the output bias gradient (iDLG; exact for ``batch_size == 1``).

    For cross-entropy the bias gradient is the batch mean of ``softmax − onehot(y)``,
    negative only at classes present; the gradient is ``−update / η``.
    """
    grad = -np.asarray(update[_last_bias_name(model, num_classes)], dtype=np.float64)
    order = np.argsort(grad, kind="stable")
    return np.asarray(order[np.arange(int(batch_size)) % num_classes], dtype=np.int64)


def _tv(x: torch.Tensor) -> torch.Tensor:
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def invert_update(
    model: nn.Module,
    update: dict[str, np.ndarray],
    labels: np.ndarray,
    input_shape: tuple[int, ...],
    settings: InversionSettings,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, float]:
    """Reconstruct inputs whose gradient points along ``−update`` (Geiping et al. 2020).

    Parameters
    ----------
    model : torch.nn.Module
        The global model the client started from (not modified).
    update : dict[str, numpy.ndarray]
        The observed update, keyed like the model's parameters.
    labels : numpy.ndarray
        ``[B]`` labels to reconstruct with (inferred or known).
    input_shape : tuple of int
        Shape of one record.
    settings : InversionSettings
    bounds : tuple of float
        Pixel range; the reconstruction is projected onto it after every step.

    Returns
    -------
    tuple
        ``(x_hat [B, *input_shape], objective)``: the best restart's reconstruction
        and its final ``1 − cos`` gradient distance.
    """
    net = _clone(model)
    net.eval()  # deterministic forward: the attacker controls the dummy's pass
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    target = torch.cat(
        [torch.from_numpy(-np.asarray(update[n], dtype=np.float32)).ravel() for n in names]
    )
    tnorm = target.norm() + 1e-12
    yt = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    lo, hi = bounds
    gen = torch.Generator().manual_seed(int(settings.seed))
    best: tuple[float, torch.Tensor] | None = None
    its = int(settings.iterations)
    milestones = [int(its * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    for _ in range(int(settings.restarts)):
        xh = (torch.rand((len(yt), *input_shape), generator=gen) * (hi - lo) + lo).requires_grad_(
            True
        )
        opt = torch.optim.Adam([xh], lr=settings.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        dist = torch.tensor(1.0)
        for _ in range(its):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(xh), yt)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            g = torch.cat([gr.ravel() for gr in grads])
            dist = 1.0 - (g @ target) / (g.norm() * tnorm + 1e-12)
            obj = dist + settings.tv_weight * _tv(xh)
            obj.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                xh.clamp_(lo, hi)
        final = float(dist.detach())
        if best is None or final < best[0]:
            best = (final, xh.detach().clone())
    assert best is not None
    for p in params:
        p.grad = None
    return best[1].numpy(), best[0]


@dataclass(frozen=True)
class InversionResult:
    """One inversion experiment: what the server saw and how well it was inverted.

    ``reconstruction`` and ``true`` (the client's records) are kept for the demo plot
    only and are never written to JSON.
    """

    protection: str
    batch_size: int
    mse: float
    psnr_db: float
    mse_per_record: list[float]
    label_accuracy: float
    labels_known: bool
    gradient_distance: float
    noise_multiplier: float | None
    clip: float | None
    reconstruction: np.ndarray = dataclasses.field(repr=False)
    true: np.ndarray = dataclasses.field(repr=False)

    def to_json(self) -> dict[str, object]:
        """Numbers only (no pixels, no labels)."""
        return {
            "protection": self.protection,
            "batch_size": self.batch_size,
            "mse": self.mse,
            "psnr_db": self.psnr_db,
            "mse_per_record": list(self.mse_per_record),
            "label_accuracy": self.label_accuracy,
            "labels": "known to the attacker" if self.labels_known else "inferred (iDLG)",
            "gradient_distance": self.gradient_distance,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
        }


def run_inversion(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    protection: Protection | str,
    settings: InversionSettings,
    *,
    lr: float,
    clip: float,
    noise_multiplier: float,
    num_classes: int,
    known_labels: bool = False,
    data_range: float = 1.0,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> InversionResult:
    """Compute the observed update of ``(x, y)``, invert it, and score the reconstruction.

    Labels are inferred (:func:`infer_labels`) unless ``known_labels`` hands the
    attacker the true ones (the usual assumption for batches larger than one, where
    bias-sign inference fails on confidently classified records). Reconstructions are
    matched to true records by the assignment minimising total MSE (the batch order is
    not observable). PSNR uses ``data_range``.
    """
    mode = Protection(protection)
    update = observed_update(
        model, x, y, mode, lr=lr, clip=clip, noise_multiplier=noise_multiplier, seed=settings.seed
    )
    if known_labels:
        labels = np.asarray(y, dtype=np.int64)
    else:
        labels = infer_labels(model, update, len(y), num_classes)
    xh, dist = invert_update(model, update, labels, tuple(x.shape[1:]), settings, bounds)
    cost = np.array(
        [[float(mse(xh[i : i + 1], x[j : j + 1])[0]) for j in range(len(y))] for i in range(len(y))]
    )
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(y), dtype=np.int64)
    order[cols] = rows
    matched = xh[order]
    errs = mse(matched, x)
    label_acc = float(np.mean(np.sort(labels) == np.sort(np.asarray(y))))
    mean_mse = float(errs.mean())
    noisy = mode in (Protection.dpsgd, Protection.local_dp)
    return InversionResult(
        protection=mode.value,
        batch_size=len(y),
        mse=mean_mse,
        psnr_db=psnr(mean_mse, data_range),
        mse_per_record=[float(e) for e in errs],
        label_accuracy=label_acc,
        labels_known=bool(known_labels),
        gradient_distance=dist,
        noise_multiplier=float(noise_multiplier) if noisy else None,
        clip=float(clip) if mode is not Protection.none else None,
        reconstruction=matched,
        true=np.asarray(x),
    )
