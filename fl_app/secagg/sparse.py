"""The sparse (Harary graph) half of the ``(k, t)`` derivation: hypergeometric tails and
the search for the smallest even degree that meets every bound.

The bounds and why they hold are the docstring of :mod:`fl_app.secagg.derive`, which
calls :func:`sparse_search` and falls back to the complete graph when it finds nothing
(docs/architecture.md, Secure aggregation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fl_app.secagg.params import GraphMode, SecAggParams, ServerModel

__all__ = ["Sparse", "sparse_params", "sparse_search"]


class _LogFactorials:
    """``log(m!)`` for m = 0..n, vectorised hypergeometric tails on top of it."""

    def __init__(self, n: int) -> None:
        self.table = np.array([math.lgamma(m + 1) for m in range(n + 1)])

    def log_comb(self, a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray:
        a_arr = np.asarray(a)
        b_arr = np.asarray(b)
        return self.table[a_arr] - self.table[b_arr] - self.table[a_arr - b_arr]

    def log2_sf(self, population: int, bad: int, draws: int, at_least: int) -> float:
        """log2 P[X >= at_least] for X ~ Hypergeometric(population, bad, draws)."""
        lo = max(at_least, 0, draws - (population - bad))
        hi = min(bad, draws)
        if lo > hi:
            return -math.inf
        i = np.arange(lo, hi + 1)
        log_terms = (
            self.log_comb(bad, i)
            + self.log_comb(population - bad, draws - i)
            - self.log_comb(population, draws)
        )
        peak = float(np.max(log_terms))
        return (peak + math.log(float(np.sum(np.exp(log_terms - peak))))) / math.log(2)


_CORRUPT_WHY = {
    ServerModel.malicious: "2t-k-1: a split view plus them reveals its input",
    ServerModel.honest_but_curious: "t: their shares alone rebuild its secrets; 2t > k+1",
}


class Sparse(NamedTuple):
    """The smallest qualifying even degree ``k`` with its threshold and bounds (log2)."""

    k: int
    t: int
    at_least: int
    log2_disconnect: float
    log2_cor: float
    log2_corrupt: float
    log2_sec: float


def _log2_disconnect(lf: _LogFactorials, n: int, k: int, bad: int) -> float:
    """log2 of the union bound on the honest survivors' subgraph disconnecting: two
    disjoint runs of ``k/2`` bad nodes, ``n(n-k-1)/2 * C(bad, k)/C(n, k)``."""
    if k > bad:
        return -math.inf
    return (
        math.log2(n)
        + math.log2(max(n - k - 1, 1))
        - 1
        + float(lf.log_comb(bad, k) - lf.log_comb(n, k)) / math.log(2)
    )


def _largest_t(lf: _LogFactorials, n: int, d: int, k: int, cor: int) -> tuple[int, float]:
    """Largest t with n * P[dropped neighbours > k - t] <= 2**-cor (``(0, inf)``: none)."""
    for t in range(k + 1, 0, -1):
        tail = math.log2(n) + lf.log2_sf(n - 1, d, k, k - t + 1)
        if tail <= -cor:
            return t, tail
    return 0, math.inf


def sparse_search(n: int, d: int, c: int, sec: int, cor: int, model: ServerModel) -> Sparse | None:
    """The smallest even ``k < n - 1`` meeting every bound that the docstring of
    :mod:`fl_app.secagg.derive` states, or ``None`` (the caller then falls back to the
    complete graph)."""
    lf = _LogFactorials(n)
    log2_n = math.log2(n)
    for k in range(2, n - 1, 2):
        # Connectivity of the honest survivors (two disjoint runs of k/2 bad nodes).
        log2_disconnect = _log2_disconnect(lf, n, k, d + c)
        if log2_disconnect > -(sec + 1):
            continue
        t_cor, log2_cor = _largest_t(lf, n, d, k, cor)
        if model is ServerModel.malicious:
            # Split view plus Y corrupt neighbours: safe iff 2t > k + 1 + Y, so bound
            # P[Y >= 2t - k - 1] (probability 1 when 2t <= k + 1); implies t > Y.
            at_least = 2 * t_cor - k - 1
        else:
            # Semi-honest: the corrupt neighbours alone must stay below t (P[Y >= t]),
            # and 2t > k + 1 so two disjoint honest sets cannot both reach t.
            if 2 * t_cor <= k + 1:
                continue
            at_least = t_cor
        if at_least > min(c, k):
            log2_corrupt = -math.inf  # Y <= C always: deterministic
        elif k > n - d - 1:
            log2_corrupt = 0.0  # no hypergeometric over fewer others than k: no bound
        else:
            log2_corrupt = log2_n + lf.log2_sf(n - d - 1, c, k, at_least)
        if log2_corrupt > -(sec + 1):
            continue
        log2_sec = (
            math.log2(2.0**log2_corrupt + 2.0**log2_disconnect)
            if max(log2_corrupt, log2_disconnect) > -1000
            else max(log2_corrupt, log2_disconnect) + 1
        )
        return Sparse(k, t_cor, at_least, log2_disconnect, log2_cor, log2_corrupt, log2_sec)
    return None


def sparse_params(
    graph_mode: GraphMode,
    n: int,
    d: int,
    c: int,
    drop: float,
    corrupt: float,
    sec: int,
    cor: int,
    model: ServerModel,
    s: Sparse,
) -> SecAggParams:
    """:class:`SecAggParams` of a sparse degree found by :func:`sparse_search`."""
    explanation = (
        f"Harary graph H(k={s.k}, n={n}) on a random permutation (Bell et al. 2020); "
        f"D=floor({drop}*{n})={d} dropouts, C={c} (floor({corrupt}*{n}) or the assumed "
        "minimum) corrupt. "
        f"k is the smallest even degree with: P[honest survivors disconnected] "
        f"<= 2^{s.log2_disconnect:.1f}; t={s.t} is the largest threshold with "
        f"P[some node keeps < t surviving holders] <= 2^{s.log2_cor:.1f} "
        f"(target 2^-{cor}); P[some node has >= {s.at_least} corrupt neighbours "
        f"({_CORRUPT_WHY[model]})] <= "
        f"2^{s.log2_corrupt:.1f}. Total security failure <= 2^{s.log2_sec:.1f} "
        f"(target 2^-{sec}). Rounds with fewer than {n - d} survivors are abandoned."
    )
    return SecAggParams(
        mode=graph_mode,
        num_clients=n,
        degree=s.k,
        threshold=s.t,
        max_dropouts=d,
        max_corrupt=c,
        min_survivors=n - d,
        dropout_tolerance=drop,
        corrupt_fraction=corrupt,
        security_bits=sec,
        correctness_bits=cor,
        log2_security_failure=s.log2_sec,
        log2_correctness_failure=s.log2_cor,
        explanation=explanation,
        server_model=model,
    )
