"""Distributed DP: the distributed discrete Gaussian mechanism under secure aggregation.

With central DP the server sees the exact sum of the cohort's clipped updates before it
adds noise. Here every client adds a small *discrete* Gaussian share to its own
integer-encoded update before masking, so the sum the server unmasks is already
differentially private (Kairouz, Liu & Steinke, ICML 2021, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation"; arXiv 2102.06387,
cited below as [KLS] with the arXiv numbering). No maintained library ships this (TFF
removed its ``DistributedDpSumFactory`` in January 2026), so it is written here from
the paper; every random bit comes from the ``cryptography`` package's ChaCha20.

Client, per round ([KLS] Algorithm 1), after clipping ``Δ`` to L2 norm ``c``:

1. **rotate**: pad to ``d' = 2^⌈log2 d⌉`` and apply the randomized Hadamard transform
   ``x ↦ H·D·x/√d'`` (``D`` random signs from a public per-round seed, so the server can
   invert it). The rotation keeps the L2 norm and makes every coordinate small
   (about ``c/√d'``), which is what lets a few bits per coordinate hold the sum;
2. **scale** by ``1/γ`` (so the norm is at most ``A = c/γ``) and **round** each
   coordinate to an integer with unbiased randomized rounding, *conditionally*:
   redraw until the rounded vector's norm is at most ``Δ₂`` ([KLS] Theorem 1 with
   ``β``; one draw succeeds with probability at least ``1 − β``);
3. **noise**: add ``N_Z(0, σ_l²)`` per coordinate, the discrete Gaussian of Canonne,
   Kamath & Steinke (NeurIPS 2020, Algorithm 3, in floating point as TFF did),
   ``σ_l² = σ²/n_min`` so that any ``n_min`` survivors' shares sum to variance ``σ²``;
4. reduce modulo ``2^bits``; secure aggregation masks the result.

Server: the modular sum, mapped back to signed integers (*modular clipping*: values
``≥ 2^(bits−1)`` are negative), times ``γ``, rotated back (``H`` is its own inverse),
truncated to ``d``. That is ``Σ clip(Δ_i) + noise`` up to rounding. Those steps, the
sampler and :class:`~fl_app.privacy.ddg_encoding.DdpRound` (one round's parameters, with
``encode`` and ``decode``) are :mod:`fl_app.privacy.ddg_encoding`; this module plans
them and accounts for them.

Parameters (:class:`DdpPlan`, one source of truth for server, clients and accountant):

* sensitivity in integer units ([KLS] Theorem 1, as in the paper's code)
  ``Δ₂² = min{(A + √d')², A² + d'/4 + √(2 ln(1/β))·(A + √d'/2)}``;
* ``σ = z·Δ₂``: ``z`` is the noise multiplier *in rounded units*, so the accountant
  sees ``Δ₂/σ = 1/z`` exactly and the rounding inflation ``Δ₂/A > 1`` costs accuracy,
  never privacy (the noise in model units is ``z·γ·Δ₂ = z·c·(Δ₂/A)``);
* ``γ`` is the finest step for which the sum of a full cohort cannot wrap. Per
  coordinate the signed sum is signal + rounding error + noise. The rounding errors add
  to at most ``n`` (each ``< 1``); the signal ``(H·D·Σ clip(Δ_i))_j/γ`` is a Rademacher
  sum, sub-Gaussian with variance proxy ``‖Σ clip(Δ_i)‖²/(γ²d') ≤ n²A²/d'`` (worst case:
  all updates aligned); the discrete Gaussian noise is sub-Gaussian with proxy ``σ_l²``
  per share (Canonne et al., Proposition 19). So with
  ``s² = n²A²/d' + σ²·n/n_min`` and ``k = √(2 ln(2d'/p))``, a wrap anywhere in the vector
  has probability at most ``p`` (``privacy.distributed.overflow_probability``) when
  ``n + k·s ≤ 2^(bits−1) − 1``. ``A`` is the largest value meeting this for every
  cohort size up to ``max_cohort``; if none does, the bit width is refused at build
  time, naming the fewest bits that work.

Accounting ([KLS] Proposition 14 / Eq. (17), the L2 branch, as the paper's code): one
round without sampling is ``(α, ε(α))``-RDP with
``ε(α) = min{α·l²/2 + τ·d', (α/2)·(l + τ·√d')²}``, ``l = Δ₂/σ = 1/z`` and
``τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ_l²·k/(k+1))`` (the distance of a sum of ``n`` discrete
Gaussians from one; ``τ`` grows with ``n`` and shrinks with ``σ_l``, so the ledger
records the bound at ``max_cohort`` and the smallest share). dp-accounting has no
event for this mechanism; Poisson subsampling amplifies it by Zhu & Wang (ICML 2019,
"Poisson Subsampled Rényi Differential Privacy", Theorem 5, the general upper bound;
the paper's code uses the same):
``(α−1)·ε_q(α) ≤ log[(1−q)^{α−1}(αq−q+1) + C(α,2)q²(1−q)^{α−2}e^{ε(2)}
+ 3·Σ_{l=3}^{α} C(α,l)q^l(1−q)^{α−l}e^{(l−1)ε(l)}]`` at integer orders (and never above
``ε(α)``). RDP adds over rounds and is converted to ``(ε, δ)`` by dp-accounting's
``rdp.compute_epsilon``. This bound is looser than the exact subsampled-Gaussian
analysis central DP gets, so at the same ε distributed DP needs somewhat more noise.

Trust assumptions. The ε the server's ledger reports holds for the configured ``z`` and
``n_min``; the server sends them (with ``γ``) each round. A client checks them against
the round (vector, cohort, clip) and against its own floor, which applies with safe
defaults even without a policy file (:meth:`fl_app.client.policy.SitePolicy.check_ddp`,
at stage 3): ``n_min >= ⌈(1 − secagg_max_dropout_tolerance)·n⌉`` (default tolerance
0.5: half the cohort) and the sum's multiplier ``share_std·√n_min/Δ₂ >=
ddp_min_noise_multiplier`` (default 0.25). The floor stops a server from switching the
noise off; it does not make a server that sends a ``z`` between the floor and the
configured one keep the reported ε (a site that wants its ε sets the ``z`` it means as
its floor; the client does not account ε itself under distributed DP). Clients run this
code honestly (a client can skew but not reveal the sum, and one that aligns its update
with the public rotation can make coordinates wrap, which only damages the model). The
noise is not calibrated for colluders: the reported ε assumes all ``n_min`` shares of a
round come from honest clients; with ``f`` survivors colluding with the server (which
knows their shares) the noise it cannot remove is ``σ²·(n_min − f)/n_min``
(``secagg.corrupt_fraction`` sizes the masking thresholds, not the noise). The rotation
seed is public and the rounding and noise bits are not (ChaCha20 under a fresh
OS-random key per encoding).
Floating point: the discrete Gaussian sampler uses IEEE ``exp``/``log`` (Canonne et al.
give an exact rational sampler; it is orders of magnitude slower in Python), so its
probabilities are exact only to ~2^-52 relative.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fl_app.privacy.ddg_encoding import DdpConfigError, DdpRound, padded_dimension
from fl_app.secagg.crypto import MAX_BITS, MIN_BITS

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_OVERFLOW_PROBABILITY",
    "RDP_ORDERS",
    "DdpPlan",
    "ddg_epsilon",
    "ddg_round_rdp",
    "sensitivity",
    "subsampled_rdp",
]

#: [KLS]'s default conditional-rounding parameter (TFF used the same).
DEFAULT_BETA = math.exp(-0.5)
#: Probability that any coordinate of a round's sum wraps around (modular clipping).
DEFAULT_OVERFLOW_PROBABILITY = 1e-9
#: Integer RDP orders (Zhu & Wang's bound is stated at integer orders).
RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 128, 160, 192, 256)


def sensitivity(scaled_norm: float, padded: int, beta: float) -> float:
    """``Δ₂``: L2 norm bound of one client's rounded vector ([KLS] Theorem 1).

    ``scaled_norm`` is ``A = c/γ``; ``beta = 0`` means unconditional rounding.
    """
    a, d = float(scaled_norm), float(padded)
    plain = (a + math.sqrt(d)) ** 2
    if beta <= 0:
        return math.sqrt(plain)
    conditional = a * a + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (a + math.sqrt(d) / 2)
    return math.sqrt(min(plain, conditional))


# ------------------------------------------------------------------------------ plan
def _min_survivors(n: int, dropout_tolerance: float) -> int:
    return max(1, min(n, math.ceil((1.0 - dropout_tolerance) * n - 1e-9)))


@dataclass(frozen=True)
class DdpPlan:
    """The run's distributed-DP parameters, derived once when the run is built.

    Parameters
    ----------
    clip
        ``c``: L2 bound of every client's update.
    dim
        ``d``: number of model parameters.
    bits
        Ring ``Z_{2^bits}`` of the masked sum (``secagg.bits``).
    noise_multiplier
        ``z`` in rounded units: the sum's noise std is ``σ = z·Δ₂``.
    max_cohort
        Largest cohort the ring must hold (bigger cohorts are abandoned, not wrapped).
    dropout_tolerance
        Shares are calibrated for ``n_min = ⌈(1 − tolerance)·n⌉`` survivors of ``n``.
    beta, overflow_probability
        Conditional rounding's ``β`` and the bound ``p`` on a wrap per round.
    """

    clip: float
    dim: int
    bits: int
    noise_multiplier: float
    max_cohort: int
    dropout_tolerance: float
    beta: float = DEFAULT_BETA
    overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise DdpConfigError(f"clip must be finite and > 0, found {self.clip!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise DdpConfigError(f"noise_multiplier must be > 0, found {self.noise_multiplier!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise DdpConfigError(
                f"secagg.bits must lie in [{MIN_BITS}, {MAX_BITS}], found {self.bits}"
            )
        if self.max_cohort < 1 or self.dim < 1:
            raise DdpConfigError("max_cohort and dim must be >= 1")
        if not 0 <= self.dropout_tolerance < 1:
            raise DdpConfigError("dropout_tolerance must lie in [0, 1)")
        if not 0 <= self.beta < 1:
            raise DdpConfigError(f"privacy.distributed.beta must lie in [0, 1), found {self.beta}")
        if not 0 < self.overflow_probability < 1:
            raise DdpConfigError("privacy.distributed.overflow_probability must lie in (0, 1)")
        self.scaled_norm  # noqa: B018 - derive now so an impossible plan fails at build time

    @property
    def padded(self) -> int:
        return padded_dimension(self.dim)

    @property
    def overflow_stddevs(self) -> float:
        """``k = √(2 ln(2d'/p))``: sub-Gaussian tail multiple for a wrap anywhere."""
        return math.sqrt(2.0 * math.log(2.0 * self.padded / self.overflow_probability))

    @functools.cached_property
    def noise_ratio(self) -> float:
        """``max_n n/n_min(n)``: how much more than ``σ²`` a full cohort's shares add up to."""
        return max(
            n / _min_survivors(n, self.dropout_tolerance) for n in range(1, self.max_cohort + 1)
        )

    def _fits(self, a: float) -> bool:
        n = self.max_cohort
        sigma = self.noise_multiplier * sensitivity(a, self.padded, self.beta)
        s = math.sqrt(n * n * a * a / self.padded + sigma * sigma * self.noise_ratio)
        return n + self.overflow_stddevs * s <= 2.0 ** (self.bits - 1) - 1

    @functools.cached_property
    def scaled_norm(self) -> float:
        """``A = c/γ``: the largest scaled clip whose full-cohort sum cannot wrap."""
        if not self._fits(0.0):
            raise DdpConfigError(
                f"secagg.bits={self.bits} cannot hold the noised sum of {self.max_cohort} "
                f"clients for a model of {self.dim} parameters at noise_multiplier "
                f"{self.noise_multiplier:g}; use secagg.bits >= {self.min_bits()} "
                "(or a smaller cohort)"
            )
        low, high = 0.0, 1.0
        while self._fits(high):
            low, high = high, high * 2.0
            if high > 2.0**62:
                break
        for _ in range(200):
            mid = (low + high) / 2
            if self._fits(mid):
                low = mid
            else:
                high = mid
        return low

    def min_bits(self) -> int:
        """The fewest ring bits for which this plan is feasible (at most 64)."""
        for bits in range(8, 65):
            probe = object.__new__(DdpPlan)
            for name, value in asdict(self).items():
                object.__setattr__(probe, name, value)
            object.__setattr__(probe, "bits", bits)
            if probe._fits(0.0):
                return bits
        return 65

    @property
    def gamma(self) -> float:
        """``γ``: the quantisation step in model units."""
        return self.clip / self.scaled_norm

    @property
    def bound(self) -> float:
        """``Δ₂`` in rounded units (the L2 sensitivity of one client's contribution)."""
        return sensitivity(self.scaled_norm, self.padded, self.beta)

    @property
    def sigma(self) -> float:
        """``σ = z·Δ₂``: std of the noise on the sum in rounded units (``n_min`` shares)."""
        return self.noise_multiplier * self.bound

    @property
    def inflation(self) -> float:
        """``Δ₂/A``: noise in model units relative to central DP at the same ``z`` and ``c``."""
        return self.bound / self.scaled_norm

    def min_survivors(self, cohort: int) -> int:
        return _min_survivors(cohort, self.dropout_tolerance)

    def at(self, z: float) -> DdpPlan:
        """This plan at noise multiplier ``z`` (a noise schedule's round: ``γ``, ``Δ₂`` and
        ``τ`` follow ``z``; the ring's size stays); itself at its own ``z``."""
        if z == self.noise_multiplier:
            return self
        return replace(self, noise_multiplier=float(z))

    def round(self, cohort: int) -> DdpRound:
        """The parameters of a round with ``cohort`` sampled clients."""
        if not 1 <= cohort <= self.max_cohort:
            raise DdpConfigError(
                f"a cohort of {cohort} exceeds the {self.max_cohort} clients the ring was sized for"
            )
        n_min = self.min_survivors(cohort)
        return DdpRound(
            clip=float(self.clip),
            dim=self.dim,
            padded=self.padded,
            bits=self.bits,
            gamma=self.gamma,
            bound=self.bound,
            share_std=self.sigma / math.sqrt(n_min),
            min_survivors=n_min,
            cohort=cohort,
        )

    @property
    def tau(self) -> float:
        """[KLS] Theorem 1's ``τ`` for the worst round (``max_cohort`` shares, smallest σ_l)."""
        n = self.max_cohort
        share_var = self.sigma**2 / self.min_survivors(n)
        return 10.0 * sum(
            math.exp(-2.0 * math.pi**2 * share_var * k / (k + 1)) for k in range(1, n)
        )

    def bandwidth_bytes(self) -> int:
        """Bytes of one client's masked vector on the wire (``bits`` per coordinate)."""
        return -(-self.padded * self.bits // 8)

    def describe(self) -> dict[str, Any]:
        return {
            "clip": self.clip,
            "dimension": self.dim,
            "padded_dimension": self.padded,
            "bits": self.bits,
            "noise_multiplier": self.noise_multiplier,
            "max_cohort": self.max_cohort,
            "dropout_tolerance": self.dropout_tolerance,
            "beta": self.beta,
            "overflow_probability": self.overflow_probability,
            "gamma": self.gamma,
            "sensitivity_rounded": self.bound,
            "noise_std_sum_rounded": self.sigma,
            "noise_inflation_vs_central": self.inflation,
            "tau": self.tau,
        }


# ------------------------------------------------------------------------ accounting
def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def ddg_round_rdp(order: int, l2_scale: float, tau: float, dim: int) -> float:
    """RDP of one unsampled DDG sum ([KLS] Proposition 14 / Eq. (17), L2 branch)."""
    first = order * l2_scale**2 / 2.0 + tau * dim
    second = (order / 2.0) * (l2_scale + math.sqrt(dim) * tau) ** 2
    return min(first, second)


def subsampled_rdp(order: int, q: float, eps: Callable[[int], float]) -> float:
    """Zhu & Wang (2019) Theorem 5: RDP at integer ``order`` of a Poisson-``q`` sample."""
    if order < 2 or int(order) != order:
        raise ValueError(f"order must be an integer >= 2, found {order!r}")
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], found {q!r}")
    a = int(order)
    if q == 1.0:
        return eps(a)
    terms = [
        (a - 1) * math.log1p(-q) + math.log(a * q - q + 1),
        _log_comb(a, 2) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + eps(2),
    ]
    terms += [
        math.log(3.0)
        + _log_comb(a, j)
        + j * math.log(q)
        + (a - j) * math.log1p(-q)
        + (j - 1) * eps(j)
        for j in range(3, a + 1)
    ]
    peak = max(terms)
    bound = (peak + math.log(sum(math.exp(t - peak) for t in terms))) / (a - 1)
    return min(bound, eps(a))


@functools.lru_cache(maxsize=256)
def _round_rdp_vector(q: float, noise_multiplier: float, tau: float, dim: int) -> tuple[float, ...]:
    l2 = 1.0 / noise_multiplier

    def eps(order: int) -> float:
        return ddg_round_rdp(order, l2, tau, dim)

    return tuple(subsampled_rdp(o, q, eps) for o in RDP_ORDERS)


def ddg_epsilon(blocks: Sequence[tuple[float, float, float, int, int]], delta: float) -> float:
    """ε at ``delta`` of composed DDG rounds.

    ``blocks`` holds ``(q, z, τ, d', rounds)``: ``rounds`` rounds sampled at rate ``q``
    (1 = everyone) with noise multiplier ``z`` (rounded units), ``τ`` and padded
    dimension ``d'``.
    """
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    total = np.zeros(len(RDP_ORDERS))
    for q, z, tau, dim, count in blocks:
        total += count * np.asarray(_round_rdp_vector(float(q), float(z), float(tau), int(dim)))
    if not total.any():
        return 0.0
    eps, _ = compute_epsilon(list(RDP_ORDERS), list(total), delta)
    return float(eps)
