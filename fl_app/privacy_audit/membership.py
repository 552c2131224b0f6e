"""Membership inference on a released model: loss threshold and LiRA.

Two attacks, both scored by :func:`~fl_app.privacy_audit.metrics.roc_summary`:

* **Loss threshold** (Yeom et al. 2018, "Privacy Risk in Machine Learning", CSF):
  score ``−ℓ(f(x), y)``; members tend to have lower loss.
* **LiRA** (Carlini et al. 2022, "Membership Inference Attacks From First
  Principles", IEEE S&P): train ``K`` shadow models on random halves of a pool that
  contains the attacked examples, fit Gaussians to the logit-scaled true-class
  confidence of IN and OUT shadows, and score the target's confidence by the
  likelihood ratio (online) or by its distance above OUT (offline).

Approximation made here, stated in the audit JSON: the shadows are trained
*centrally* (one optimizer over the shadow's half of the pool, the run's model,
optimizer and batch size, for as many epochs as each record saw in the federation),
not by re-running the federation. When the run used record-level DP-SGD the shadows
use DP-SGD with the same ``z`` and ``C`` (the attacker knows the training
algorithm); client-level noise added at aggregation is not simulated. The attacker's
threat model is the strongest one the release allows: white-box access to the final
weights, knowledge of the data distribution and of most of the pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl_app.config.schema import ClientTrainConfig, ModelConfig
from fl_app.models import build_model
from fl_app.privacy.dpsgd import train_dpsgd
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy_audit.metrics import (
    DEFAULT_FPRS,
    RocSummary,
    balanced_keep_matrix,
    lira_offline_scores,
    lira_online_scores,
    logit_scaled_confidence,
    roc_summary,
)
from fl_app.training import as_tensors, train_local

__all__ = [
    "LiraResult",
    "ShadowSettings",
    "lira_attack",
    "loss_threshold_attack",
    "model_logits",
    "per_example_loss",
    "train_shadow_phis",
]


@torch.no_grad()
def model_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits ``[N, num_classes]`` of ``model`` in eval mode (its mode is restored)."""
    xt, _ = as_tensors(x, np.zeros(len(x), dtype=np.int64))
    was_training = model.training
    model.eval()
    try:
        parts = [model(xt[i : i + batch_size]).double() for i in range(0, len(xt), batch_size)]
    finally:
        model.train(was_training)
    if not parts:
        return np.zeros((0, 0))
    return torch.cat(parts).numpy()


def per_example_loss(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of every example, float64 ``[N]``."""
    logits = torch.from_numpy(model_logits(model, x))
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    return nn.functional.cross_entropy(logits, yt, reduction="none").numpy()


def loss_threshold_attack(
    model: nn.Module,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    fprs: tuple[float, ...] = DEFAULT_FPRS,
) -> RocSummary:
    """Loss-threshold membership inference (Yeom et al. 2018): score ``−loss``.

    Parameters
    ----------
    model : torch.nn.Module
        The attacked (released) model.
    members, nonmembers : tuple of numpy.ndarray
        ``(x, y)`` of examples the model was / was not trained on.
    fprs : tuple of float
        FPRs to report TPR at.

    Returns
    -------
    RocSummary
    """
    m = -per_example_loss(model, *members)
    n = -per_example_loss(model, *nonmembers)
    return roc_summary(m, n, fprs)


@dataclass(frozen=True)
class ShadowSettings:
    """How LiRA's shadow models are trained.

    Attributes
    ----------
    num_shadows : int
        ``K``, even and ``>= 2``; each pool example is IN for exactly ``K/2``.
    epochs : int
        Passes over the shadow's training half (the target's passes per record).
    train : ClientTrainConfig
        Optimizer, learning rate, momentum, batch size (``local_epochs`` is replaced
        by ``epochs``).
    dpsgd : DpSgdSettings or None
        When set, shadows are trained with DP-SGD (:func:`train_dpsgd`) like the
        target's clients.
    seed : int
        Seeds the IN/OUT assignment, initialisations and shuffling.
    target_accuracy : float or None
        When set, a shadow stops after the first epoch at which its accuracy on its
        own OUT examples reaches this value (the released model's test accuracy, which
        the run publishes), so shadows resemble the target in fit, not only in
        epochs: central training overfits far faster than federated averaging.
    """

    num_shadows: int
    epochs: int
    train: ClientTrainConfig
    dpsgd: DpSgdSettings | None = None
    seed: int = 0
    target_accuracy: float | None = None

    def __post_init__(self) -> None:
        k = int(self.num_shadows)
        if k < 2 or k % 2:
            raise ValueError(f"num_shadows must be even and >= 2, found {self.num_shadows!r}")
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, found {self.epochs!r}")

    def to_json(self) -> dict[str, object]:
        """Settings as JSON-ready values."""
        return {
            "num_shadows": int(self.num_shadows),
            "epochs": int(self.epochs),
            "optimizer": str(getattr(self.train.optimizer, "value", self.train.optimizer)),
            "lr": float(self.train.lr),
            "momentum": float(self.train.momentum),
            "batch_size": int(self.train.batch_size),
            "training": "dpsgd" if self.dpsgd is not None else "plain",
            "noise_multiplier": None if self.dpsgd is None else self.dpsgd.noise_multiplier,
            "max_grad_norm": None if self.dpsgd is None else self.dpsgd.max_grad_norm,
            "seed": int(self.seed),
            "stop_at_heldout_accuracy": self.target_accuracy,
            "trained": "centrally on a random half of the pool (not federated)",
        }


ModelFactory = Callable[[int], nn.Module]
"""``seed -> fresh model`` with the attacked model's architecture."""


def model_factory(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> ModelFactory:
    """A :data:`ModelFactory` building ``cfg`` with a given init seed."""

    def build(seed: int) -> nn.Module:
        return build_model(cfg, input_shape, num_classes, seed=seed)

    return build


def train_shadow_phis(
    factory: ModelFactory,
    pool: tuple[np.ndarray, np.ndarray],
    settings: ShadowSettings,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Train the shadow models and return their φ on the whole pool.

    Parameters
    ----------
    factory : ModelFactory
        Builds an untrained model from an init seed.
    pool : tuple of numpy.ndarray
        ``(x, y)`` of every example a shadow may train on.
    settings : ShadowSettings

    Returns
    -------
    tuple
        ``(phi [K, N], keep [K, N], epochs)``: ``epochs[k]`` is how many epochs shadow
        ``k`` trained (fewer than ``settings.epochs`` when it met ``target_accuracy``).

    Notes
    -----
    With ``target_accuracy`` epochs run one at a time (one trainer call each; for
    DP-SGD each call re-attaches Opacus, which does not change the mechanism but costs
    time); without it, all epochs run in one call.
    """
    x, y = pool
    n = len(y)
    ss = np.random.SeedSequence([int(settings.seed), 0x5AD0])
    keep_rng, *shadow_seqs = ss.spawn(1 + int(settings.num_shadows))
    keep = balanced_keep_matrix(settings.num_shadows, n, np.random.default_rng(keep_rng))
    one_epoch = dataclasses.replace(settings.train, local_epochs=1)
    all_epochs = dataclasses.replace(settings.train, local_epochs=int(settings.epochs))
    phis = np.empty((settings.num_shadows, n))
    epochs_run = []
    for k, seq in enumerate(shadow_seqs):
        init_seed, gen_seed = (int(s) for s in seq.generate_state(2))
        model = factory(init_seed)
        gen = torch.Generator().manual_seed(gen_seed)
        xk, yk = x[keep[k]], y[keep[k]]
        # Without an accuracy target all epochs run in one call (one Opacus attach).
        step = one_epoch if settings.target_accuracy is not None else all_epochs
        epoch = 0
        while epoch < int(settings.epochs):
            if settings.dpsgd is None:
                train_local(model, xk, yk, step, generator=gen)
            else:
                train_dpsgd(model, xk, yk, step, settings.dpsgd, generator=gen)
            epoch += int(step.local_epochs)
            if settings.target_accuracy is not None:
                out = ~keep[k]
                acc = float(np.mean(model_logits(model, x[out]).argmax(axis=1) == y[out]))
                if acc >= settings.target_accuracy:
                    break
        epochs_run.append(epoch)
        phis[k] = logit_scaled_confidence(model_logits(model, x), y)
    return phis, keep, epochs_run


@dataclass(frozen=True)
class LiraResult:
    """Online and offline LiRA on the same shadows."""

    online: RocSummary
    offline: RocSummary
    shadow_epochs: list[int]


def lira_attack(
    model: nn.Module,
    factory: ModelFactory,
    pool: tuple[np.ndarray, np.ndarray],
    is_member: np.ndarray,
    scored: np.ndarray,
    settings: ShadowSettings,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
) -> LiraResult:
    """LiRA (Carlini et al. 2022) against ``model`` on the ``scored`` pool examples.

    Parameters
    ----------
    model : torch.nn.Module
        The attacked model.
    factory : ModelFactory
        Builds shadow models of the same architecture.
    pool : tuple of numpy.ndarray
        ``(x, y)``: members and non-members of the target, the shadows' data.
    is_member : numpy.ndarray
        ``[N]`` bool: pool example ``i`` was in the target's training set.
    scored : numpy.ndarray
        ``[N]`` bool: the examples whose membership is attacked (a balanced sample).
    settings : ShadowSettings

    Returns
    -------
    LiraResult
    """
    x, y = pool
    member = np.asarray(is_member, dtype=bool)
    sel = np.asarray(scored, dtype=bool)
    if member.shape != (len(y),) or sel.shape != (len(y),):
        raise ValueError("is_member and scored need one flag per pool example")
    phis, keep, epochs = train_shadow_phis(factory, pool, settings)
    target = logit_scaled_confidence(model_logits(model, x[sel]), y[sel])
    on = lira_online_scores(target, phis[:, sel], keep[:, sel])
    off = lira_offline_scores(target, phis[:, sel], keep[:, sel])
    m = member[sel]
    return LiraResult(
        online=roc_summary(on[m], on[~m], fprs),
        offline=roc_summary(off[m], off[~m], fprs),
        shadow_epochs=epochs,
    )
