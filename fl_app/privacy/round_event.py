"""One round of client-level DP as it ran (:class:`RoundEvent`), and which dp-accounting
event it is; :mod:`fl_app.privacy.ledger` keeps the rounds, :mod:`fl_app.privacy.composition`
composes them into ε.

Client-level DP (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", ICLR) treats each *client* as the unit of privacy: per round the
server (or, under secure aggregation, the protocol) sums the cohort's updates, each
clipped to L2 norm ``C``, adds ``N(0, (z·C)²)`` to the sum and divides by the
expected cohort size. A :class:`RoundEvent` records one such round exactly as it ran
(sampling, population, cohort, effective ``z``, the clip norm used); the ledger is
the immutable tuple of them, persisted every round, and ε is always recomputed from
the whole ledger (house rule 5, docs/architecture.md).

Which dp-accounting event a round is (the accountant must describe the sampling that
actually happened):

* Poisson sampling with rate ``q`` (``strategy.sampling=poisson``), and full
  participation (every client every round, ``q = 1``): neighbouring federations
  differ by *adding or removing one client*; the sum's sensitivity is ``C``, so the
  round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. ε by dp-accounting PLD
  (default; the tightest), Opacus PRV or RDP, through
  :func:`fl_app.privacy.accounting.epsilon` (a Poisson round *is* one DP-SGD step
  with clients as records).
* Fixed-size sampling of ``m`` of ``N`` clients without replacement
  (``strategy.sampling=fixed``, ``m < N``): the cohort size is fixed, so the
  neighbouring relation is *replace one client*; two clipped updates differ by up to
  ``2C``, so the round is ``SampledWithoutReplacementDpEvent(N, m,
  GaussianDpEvent(z/2))`` under dp-accounting's RDP accountant with
  ``NeighboringRelation.REPLACE_ONE`` (Wang, Balle & Kasiviswanathan 2019,
  "Subsampled Rényi Differential Privacy and Analytical Moments Accountant",
  AISTATS). dp-accounting's PLD does not support this event, so only ``rdp`` is
  accepted for it (the config validator says so before the run).

Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping", NeurIPS) releases two noised sums per round: the
updates with ``N(0, (z_Δ·C_t)²)`` and the count of unclipped clients with
``N(0, σ_b²)`` (each client adds ``b_i − ½``, sensitivity ½). Together they are one
Gaussian mechanism with ``z^{-2} = z_Δ^{-2} + (2σ_b)^{-2}`` (Andrew et al. §3.2); the
event records that effective ``z`` and its two parts.

Local DP (``privacy.mode=local``) is accounted per client: each participation is a
Gaussian mechanism on the client's own clipped update, whose sensitivity is ``2C``
(any two updates of norm ≤ C), so ``GaussianDpEvent(z/2)`` composed over its rounds,
with no sampling amplification (the server knows who took part).

Trust assumptions: the clipping, noise and sampling happened as recorded (the server
runs them under ``trusted_server``); the sampling randomness is hidden from whoever
the guarantee is stated against; the ledger is complete (a round is recorded before
its model leaves the server, even when it turned out to have too few replies); every
branch of a round releases what its event describes (docs/privacy-branches.md), a
cohort-size gate under Poisson sampling being accounted as the event's ``branch_delta``.
Against the server, which knows the cohorts, ε is the unamplified composition of each
client's rounds (``participation``,
:func:`fl_app.privacy.composition.unsampled_epsilon`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, NamedTuple

import dp_accounting

from fl_app.privacy.history import AccountingError

__all__ = ["AccountingKey", "RoundEvent", "SamplingScheme", "fixed_cohort_size"]


class SamplingScheme(str, Enum):
    poisson = "poisson"
    fixed = "fixed"


class AccountingKey(NamedTuple):
    """What the accountant sees of one round (:meth:`RoundEvent.accounting_key`).

    ``kind``: ``"poisson"`` (Poisson sampling or full participation, add/remove),
    ``"wor"`` (fixed-size sampling without replacement, replace-one: ``population``
    and ``cohort``; ``rate`` unused), ``"ddg"`` (the distributed discrete Gaussian:
    ``ddg_tau`` and ``ddg_dimension``) or ``"noop"`` (a round that raises no client's
    loss above the worst case already accounted: a once-per-tree DP-FTRL round whose
    position is not a power of two). Equal keys compose as one block.
    """

    kind: str
    rate: float
    noise_multiplier: float
    population: int = 0
    cohort: int = 0
    ddg_tau: float = 0.0
    ddg_dimension: int = 0


def fixed_cohort_size(fraction: float, population: int) -> int:
    """The cohort of fixed-size sampling: ``round(fraction * population)``, in ``[1, N]``.

    The one definition the sampler (:class:`strategies.sampling.FixedSizeSampler`), the
    plan and the accounting share: the ledger's replace-one event is only right if it
    counts the cohort the sampler draws.
    """
    return min(population, max(1, round(fraction * population)))


def _positive(name: str, value: object, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, found {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0) or (upper is not None and v > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be finite, > 0{bound}; found {value!r}")
    return v


@dataclass(frozen=True)
class RoundEvent:
    """One round of the client-level Gaussian mechanism, as it ran.

    Parameters
    ----------
    round
        Server round (>= 1).
    sampling
        ``poisson`` or ``fixed`` (see the module docstring for the accounting).
    population
        ``N``: clients eligible for sampling this round.
    sample_rate
        Poisson: ``q``. Fixed-size: ``m / N`` (informational).
    cohort
        Fixed-size: ``m``. Poisson: the expected cohort ``q·N`` (the divisor).
    noise_multiplier
        Effective ``z`` of the whole round (add/remove sensitivity ``C``).
    clip
        ``C`` used this round.
    update_noise_multiplier
        ``z_Δ``: the updates' noise std is ``z_Δ·C``. Equals ``z`` with fixed clipping.
    clipped_count_std
        ``σ_b`` of adaptive clipping's noised count, or ``None``.
    mechanism
        ``gaussian`` (central DP: continuous Gaussian noise added to the sum) or ``ddg``
        (distributed DP: the sum of clients' discrete Gaussian shares,
        :mod:`fl_app.privacy.distributed`; ``noise_multiplier`` is then in rounded
        units, ``Δ₂/σ = 1/z``) or ``tree`` (DP-FTRL: the round's released tree
        node, :mod:`fl_app.privacy.tree`; ``update_noise_multiplier`` is the node's ``z``,
        ``noise_multiplier`` is ``z / 2^l`` for a node summing ``2^l`` rounds, rate 1)
        or ``tree_once`` (DP-FTRL with each client at most once per tree:
        ``noise_multiplier`` is the node's ``z``; the round is ``GaussianDpEvent(z)``
        when ``tree_position`` is a power of two, else a no-op, see
        :func:`fl_app.privacy.tree.ftrl_round_event`).
    ddg_tau, ddg_dimension
        ``ddg`` only: the bound ``τ`` and the padded dimension ``d'`` of the RDP bound.
    branch_delta
        ``η``: probability that one client's presence flips the round between released
        and abandoned (a cohort-size gate under Poisson sampling, e.g. secure
        aggregation's minimum cohort or distributed DP's largest ring). When the gate
        flips, the two neighbouring runs differ by more than one clipped update, so the
        round is ``(ε, δ_r + η)``-DP against outsiders: the ledger reports ε at
        ``δ − Σ η`` (docs/privacy-branches.md). 0 when no gate depends on sampling.
    encoding_slack
        How far secure aggregation's fixed-point encoding can move one clipped update
        (``√d`` quantisation steps): the sum's sensitivity is ``clip + encoding_slack``
        and central noise is calibrated to it. 0 without fixed-point encoding.
    tree_position
        ``tree_once`` only: the round's position (1-based) in its tree.
    """

    round: int
    sampling: SamplingScheme
    population: int
    sample_rate: float
    cohort: float
    noise_multiplier: float
    clip: float
    update_noise_multiplier: float
    clipped_count_std: float | None = None
    mechanism: str = "gaussian"
    ddg_tau: float | None = None
    ddg_dimension: int | None = None
    branch_delta: float = 0.0
    encoding_slack: float = 0.0
    tree_position: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 1:
            raise ValueError(f"round must be an integer >= 1, found {self.round!r}")
        object.__setattr__(self, "sampling", SamplingScheme(self.sampling))
        if (
            isinstance(self.population, bool)
            or not isinstance(self.population, int)
            or self.population < 1
        ):
            raise ValueError(f"population must be an integer >= 1, found {self.population!r}")
        object.__setattr__(self, "sample_rate", _positive("sample_rate", self.sample_rate, upper=1))
        object.__setattr__(self, "cohort", _positive("cohort", self.cohort))
        if self.sampling is SamplingScheme.fixed and (
            float(self.cohort) != int(self.cohort) or self.cohort > self.population
        ):
            raise ValueError(
                f"fixed-size cohort must be an integer <= population {self.population}, "
                f"found {self.cohort!r}"
            )
        for name in ("noise_multiplier", "clip", "update_noise_multiplier"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        if self.clipped_count_std is not None:
            object.__setattr__(
                self, "clipped_count_std", _positive("clipped_count_std", self.clipped_count_std)
            )
        for name in ("branch_delta", "encoding_slack"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, found {v!r}")
            if v < 0 or (name == "branch_delta" and v > 1):
                bound = "lie in [0, 1]" if name == "branch_delta" else "be >= 0"
                raise ValueError(f"{name} must {bound}, found {v!r}")
            object.__setattr__(self, name, float(v))
        if self.mechanism not in ("gaussian", "ddg", "tree", "tree_once"):
            raise ValueError(
                "mechanism must be 'gaussian', 'ddg', 'tree' or 'tree_once', "
                f"found {self.mechanism!r}"
            )
        self._check_tree_position()
        if (self.mechanism == "ddg") != (
            self.ddg_tau is not None and self.ddg_dimension is not None
        ):
            raise ValueError("ddg_tau and ddg_dimension are set exactly for mechanism='ddg'")
        if self.mechanism == "ddg":
            tau, dim = self.ddg_tau, self.ddg_dimension
            if (
                isinstance(tau, bool)
                or not isinstance(tau, (int, float))
                or not (math.isfinite(tau) and tau >= 0)
            ):
                raise ValueError(f"ddg_tau must be a finite number >= 0, found {tau!r}")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"ddg_dimension must be an int >= 1, found {dim!r}")
            object.__setattr__(self, "ddg_tau", float(tau))
            if self.sampling is SamplingScheme.fixed and int(self.cohort) < self.population:
                raise ValueError(
                    "distributed DP is accounted for Poisson sampling or full participation only"
                )

    def _check_tree_position(self) -> None:
        """``tree_position`` is set exactly for once-per-tree DP-FTRL rounds."""
        pos = self.tree_position
        if (self.mechanism == "tree_once") != (pos is not None) or (
            pos is not None and (isinstance(pos, bool) or not isinstance(pos, int) or pos < 1)
        ):
            raise ValueError(
                f"tree_position is an int >= 1 exactly for mechanism='tree_once', found {pos!r}"
            )

    @property
    def replace_one(self) -> bool:
        """Whether this round is accounted under replace-one (fixed-size subsampling)."""
        return self.sampling is SamplingScheme.fixed and int(self.cohort) < self.population

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the sum the noise protects: ``clip + encoding_slack``."""
        return self.clip + self.encoding_slack

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the *sum* of clipped updates."""
        return self.update_noise_multiplier * self.sensitivity

    def accounting_key(self) -> AccountingKey:
        """What the accountant sees; equal keys compose as one self-composed block."""
        if self.replace_one:
            return AccountingKey(
                "wor", 0.0, self.noise_multiplier, self.population, int(self.cohort)
            )
        rate = self.sample_rate if self.sampling is SamplingScheme.poisson else 1.0
        if self.tree_position is not None and self.tree_position & (self.tree_position - 1):
            # Once per tree: only positions 2^j add a level to the worst client's nodes.
            return AccountingKey("noop", 1.0, self.noise_multiplier)
        if self.mechanism == "ddg":
            assert self.ddg_tau is not None and self.ddg_dimension is not None
            return AccountingKey(
                "ddg",
                rate,
                self.noise_multiplier,
                ddg_tau=self.ddg_tau,
                ddg_dimension=self.ddg_dimension,
            )
        return AccountingKey("poisson", rate, self.noise_multiplier)

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event for this round (see the module docstring)."""
        key = self.accounting_key()
        if key.kind == "noop":
            return dp_accounting.NoOpDpEvent()
        if key.kind == "ddg":
            raise AccountingError(
                "dp-accounting has no event for the distributed discrete Gaussian; "
                "its RDP bound is computed by fl_app.privacy.distributed.ddg_epsilon"
            )
        if key.kind == "wor":
            # Replace-one: a changed record moves the sum by up to 2C, hence z/2.
            return dp_accounting.SampledWithoutReplacementDpEvent(
                key.population,
                key.cohort,
                dp_accounting.GaussianDpEvent(key.noise_multiplier / 2.0),
            )
        return dp_accounting.PoissonSampledDpEvent(
            key.rate, dp_accounting.GaussianDpEvent(key.noise_multiplier)
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sampling"] = self.sampling.value
        if self.tree_position is None:  # ledgers of other mechanisms stay as they were
            del out["tree_position"]
        return out
