"""Pure scoring math of the privacy audit: ROC summaries, LiRA scores, image errors.

Nothing here trains or reads files; every function maps arrays to numbers, so the
attacks in :mod:`~fl_app.privacy_audit.membership` and
:mod:`~fl_app.privacy_audit.inversion` stay thin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "DEFAULT_FPRS",
    "RocSummary",
    "balanced_keep_matrix",
    "lira_offline_scores",
    "lira_online_scores",
    "logit_scaled_confidence",
    "mse",
    "psnr",
    "roc_summary",
    "tpr_at_fpr",
]

DEFAULT_FPRS: tuple[float, ...] = (0.001, 0.01)
"""False-positive rates at which every membership attack reports its TPR."""

# Floor on a fitted standard deviation: shadows can agree exactly (e.g. saturated
# confidences), and a zero variance would turn the likelihood ratio into +-inf.
_MIN_STD = 1e-6


@dataclass(frozen=True)
class RocSummary:
    """How well a membership score separates members from non-members.

    Attributes
    ----------
    auc : float
        Area under the ROC curve (0.5 = chance).
    tpr_at_fpr : dict[str, float]
        TPR at each requested FPR (keys like ``"0.001"``), read off the ROC curve's
        upper envelope with linear interpolation between its points (the TPR a
        randomised choice between two neighbouring thresholds achieves).
    n_members, n_nonmembers : int
        Sample sizes.
    fpr_resolution : float
        ``1 / n_nonmembers``: the smallest non-zero FPR the sample can show; a TPR
        at an FPR below it is an interpolation towards the ``FPR = 0`` point.
    fpr, tpr : numpy.ndarray
        The ROC curve (for plots; not written to JSON).
    """

    auc: float
    tpr_at_fpr: dict[str, float]
    n_members: int
    n_nonmembers: int
    fpr_resolution: float
    fpr: np.ndarray
    tpr: np.ndarray

    def to_json(self) -> dict[str, object]:
        """The numbers, without the curve."""
        return {
            "auc": self.auc,
            "tpr_at_fpr": dict(self.tpr_at_fpr),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "fpr_resolution": self.fpr_resolution,
        }


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at false-positive rate ``target`` on a ROC curve, linearly interpolated.

    Parameters
    ----------
    fpr, tpr : numpy.ndarray
        A ROC curve as :func:`sklearn.metrics.roc_curve` returns it (non-decreasing
        ``fpr``, possibly repeated).
    target : float
        FPR in ``[0, 1]``.

    Returns
    -------
    float
        The upper envelope's TPR at ``target``: for repeated FPR values the largest
        TPR counts, and between points the line joining them.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target FPR must lie in [0, 1], found {target!r}")
    f = np.asarray(fpr, dtype=np.float64)
    t = np.asarray(tpr, dtype=np.float64)
    uf, inverse = np.unique(f, return_inverse=True)
    ut = np.full(uf.shape, -np.inf)
    np.maximum.at(ut, inverse, t)
    return float(np.interp(target, uf, ut))


def roc_summary(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> RocSummary:
    """AUC and TPR at fixed FPRs of a membership score (higher = more likely member).

    Parameters
    ----------
    member_scores, nonmember_scores : numpy.ndarray
        One finite score per example.
    fprs : sequence of float
        FPRs to report the TPR at.

    Returns
    -------
    RocSummary

    Raises
    ------
    ValueError
        If either side is empty or a score is not finite.
    """
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise ValueError(
            f"need members and non-members, found {m.size} members and {n.size} non-members"
        )
    scores = np.concatenate([m, n])
    if not np.all(np.isfinite(scores)):
        raise ValueError("membership scores must be finite (NaN or Inf found)")
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return RocSummary(
        auc=float(roc_auc_score(labels, scores)),
        tpr_at_fpr={f"{f:g}": tpr_at_fpr(fpr, tpr, float(f)) for f in fprs},
        n_members=int(m.size),
        n_nonmembers=int(n.size),
        fpr_resolution=1.0 / n.size,
        fpr=fpr,
        tpr=tpr,
    )


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``φ = log(p_y / (1 − p_y))`` of the true class, computed stably from logits.

    LiRA's statistic (Carlini et al. 2022, §4.1): the softmax confidence ``p_y`` is
    logit-scaled so that its distribution over training runs is close to Gaussian.
    ``log p_y − log(1 − p_y) = z_y − logsumexp_{j≠y} z_j`` avoids cancellation when
    ``p_y`` is within float precision of 1.

    Parameters
    ----------
    logits : numpy.ndarray
        ``[N, num_classes]``.
    labels : numpy.ndarray
        ``[N]`` integer classes.

    Returns
    -------
    numpy.ndarray
        ``[N]`` float64.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need logits [N, C] and labels [N], found {z.shape} and {y.shape}")
    if z.shape[1] < 2:
        raise ValueError(f"need at least 2 classes, found {z.shape[1]}")
    rows = np.arange(z.shape[0])
    true = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    top = others.max(axis=1)
    lse = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    return np.asarray(true - lse)


def balanced_keep_matrix(
    num_shadows: int, num_examples: int, rng: np.random.Generator
) -> np.ndarray:
    """Which pool examples each shadow model trains on, each IN for exactly half.

    Carlini et al.'s construction: for every example, a uniformly random half of the
    ``num_shadows`` shadows include it, so every example has ``num_shadows / 2`` IN
    and OUT models (none is left without one side, however small the count); each
    shadow then trains on about half of the pool.

    Parameters
    ----------
    num_shadows : int
        Even number ``>= 2``.
    num_examples : int
        Pool size.
    rng : numpy.random.Generator
        Source of the assignment.

    Returns
    -------
    numpy.ndarray
        Boolean ``[num_shadows, num_examples]``; ``keep[k, i]`` = example ``i`` is in
        shadow ``k``'s training set.
    """
    k = int(num_shadows)
    if k < 2 or k % 2:
        raise ValueError(f"num_shadows must be even and >= 2, found {num_shadows!r}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, found {num_examples!r}")
    order = rng.random((k, int(num_examples))).argsort(axis=0)
    return np.asarray(order < k // 2)


def _fit(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-example means of ``phi`` over the masked shadows, and one pooled std."""
    counts = mask.sum(axis=0)
    if np.any(counts == 0):
        raise ValueError(
            "every example needs at least one shadow on this side (use balanced_keep_matrix)"
        )
    means = np.where(mask, phi, 0.0).sum(axis=0) / counts
    resid = np.where(mask, phi - means, 0.0)
    dof = max(int(mask.sum()) - mask.shape[1], 1)
    std = math.sqrt(float((resid**2).sum()) / dof)
    return means, max(std, _MIN_STD)


def _gauss_logpdf(x: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    return np.asarray(-0.5 * ((x - mean) / std) ** 2 - math.log(std))


def lira_online_scores(
    target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray
) -> np.ndarray:
    """Online LiRA score: log-likelihood ratio of IN vs OUT Gaussians per example.

    Carlini et al. 2022, "Membership Inference Attacks From First Principles" (IEEE
    S&P), Algorithm 1, with the *global-variance* variant the paper recommends for few
    shadow models (§VI-B): each example gets its own IN and OUT means, but one pooled
    IN and one pooled OUT standard deviation.

    Parameters
    ----------
    target_phi : numpy.ndarray
        ``[N]`` logit-scaled confidences of the attacked model.
    shadow_phi : numpy.ndarray
        ``[K, N]`` the same statistic for each shadow model.
    keep : numpy.ndarray
        ``[K, N]`` boolean: example ``i`` was in shadow ``k``'s training set.

    Returns
    -------
    numpy.ndarray
        ``[N]`` scores; higher = more likely a member.
    """
    phi, t, kp = _check_lira(target_phi, shadow_phi, keep)
    mu_in, sd_in = _fit(phi, kp)
    mu_out, sd_out = _fit(phi, ~kp)
    return _gauss_logpdf(t, mu_in, sd_in) - _gauss_logpdf(t, mu_out, sd_out)


def lira_offline_scores(
    target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray
) -> np.ndarray:
    """Offline LiRA score: how far above the OUT distribution the target's φ lies.

    The one-sided test of Carlini et al. 2022 (§VI-C) uses only OUT shadows, so it
    needs no shadow trained on the example; ``(φ − μ_out) / σ_out`` orders examples
    exactly as the one-sided Gaussian p-value does.
    """
    phi, t, kp = _check_lira(target_phi, shadow_phi, keep)
    mu_out, sd_out = _fit(phi, ~kp)
    return np.asarray((t - mu_out) / sd_out)


def _check_lira(
    target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    phi = np.asarray(shadow_phi, dtype=np.float64)
    t = np.asarray(target_phi, dtype=np.float64)
    kp = np.asarray(keep, dtype=bool)
    if phi.ndim != 2 or kp.shape != phi.shape or t.shape != (phi.shape[1],):
        raise ValueError(
            f"need shadow_phi [K, N], keep [K, N] and target_phi [N], found {phi.shape}, "
            f"{kp.shape} and {t.shape}"
        )
    return phi, t, kp


def mse(reconstructed: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean squared error per record (all axes but the first)."""
    a = np.asarray(reconstructed, dtype=np.float64)
    b = np.asarray(true, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return np.asarray(((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1))


def psnr(mse_value: float, data_range: float) -> float:
    """Peak signal-to-noise ratio ``10·log10(range² / MSE)`` in dB (inf when MSE is 0)."""
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, found {data_range!r}")
    if mse_value <= 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse_value)
