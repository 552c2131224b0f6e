"""The federation's privacy ledger: client-level DP events, one per round, and their ε.

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
client's rounds (``participation``, :func:`unsampled_epsilon`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any, NamedTuple

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fl_app.privacy.accounting import (
    AccountantName,
    AccountingError,
    DpSgdEvent,
    PrivacyHistory,
    calibrate_noise_multiplier,
    epsilon,
)
from fl_app.strict_json import reject_duplicate_keys

__all__ = [
    "LEDGER_VERSION",
    "AccountingKey",
    "FederationLedger",
    "LedgerError",
    "RoundEvent",
    "SamplingScheme",
    "branch_delta_total",
    "calibrate_round_noise",
    "fixed_cohort_size",
    "local_epsilon",
    "unsampled_epsilon",
]

LEDGER_VERSION = 1


class LedgerError(ValueError):
    """A serialised ledger is malformed; the message names the field."""


class SamplingScheme(str, Enum):
    poisson = "poisson"
    fixed = "fixed"


class AccountingKey(NamedTuple):
    """What the accountant sees of one round (:meth:`RoundEvent.accounting_key`).

    ``kind``: ``"poisson"`` (Poisson sampling or full participation, add/remove),
    ``"wor"`` (fixed-size sampling without replacement, replace-one: ``population``
    and ``cohort``; ``rate`` unused) or ``"ddg"`` (the distributed discrete Gaussian:
    ``ddg_tau`` and ``ddg_dimension``). Equal keys compose as one block.
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
        units, ``Δ₂/σ = 1/z``).
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
        if self.mechanism not in ("gaussian", "ddg"):
            raise ValueError(f"mechanism must be 'gaussian' or 'ddg', found {self.mechanism!r}")
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
        return out


class _Block(NamedTuple):
    """``rounds`` consecutive events with one accounting ``key``; ``first`` is the first."""

    key: AccountingKey
    rounds: int
    first: RoundEvent


def _blocks(events: Sequence[RoundEvent]) -> list[_Block]:
    """Consecutive events with the same accounting key, as blocks."""
    blocks: list[_Block] = []
    for e in events:
        key = e.accounting_key()
        if blocks and blocks[-1].key == key:
            blocks[-1] = blocks[-1]._replace(rounds=blocks[-1].rounds + 1)
        else:
            blocks.append(_Block(key, 1, e))
    return blocks


def branch_delta_total(events: Sequence[RoundEvent]) -> float:
    """``Σ η``: the part of δ the rounds' sampling-dependent branches take (see RoundEvent)."""
    return math.fsum(e.branch_delta for e in events)


def _epsilon_of(events: Sequence[RoundEvent], delta: float, accountant: AccountantName) -> float:
    """ε at ``delta`` of ``events`` against outsiders.

    A round whose release/abandon decision depends on the Poisson cohort's size is
    ``(ε_r, δ_r + η_r)``-DP (docs/privacy-branches.md), so the mechanisms are composed at
    ``δ − Σ η``; ``inf`` when the branches alone use up ``δ``.
    """
    if not events:
        return 0.0
    eta = branch_delta_total(events)
    if eta >= delta:
        return math.inf
    return _mechanism_epsilon(events, delta - eta, accountant)


def _mechanism_epsilon(
    events: Sequence[RoundEvent], delta: float, accountant: AccountantName
) -> float:
    blocks = _blocks(events)
    kinds = {b.key.kind for b in blocks}
    if kinds == {"poisson"}:
        # A Poisson round is one DP-SGD step with clients as records.
        history = PrivacyHistory(
            tuple(DpSgdEvent(b.key.noise_multiplier, b.key.rate, b.rounds) for b in blocks)
        )
        return epsilon(history, delta, accountant)
    if "ddg" in kinds:
        if kinds != {"ddg"}:
            raise AccountingError(
                "the ledger mixes distributed-DP rounds with central-DP rounds; no accountant "
                "composes the two here. Keep privacy.mode fixed within a run"
            )
        if accountant is not AccountantName.rdp:
            raise AccountingError(
                "distributed DP is accounted only by the RDP bound of Kairouz et al. "
                f"(not {accountant.value!r}); set privacy.accountant=rdp"
            )
        from fl_app.privacy.distributed import ddg_epsilon

        return ddg_epsilon(
            [
                (b.key.rate, b.key.noise_multiplier, b.key.ddg_tau, b.key.ddg_dimension, b.rounds)
                for b in blocks
            ],
            delta,
        )
    if kinds != {"wor"}:
        raise AccountingError(
            "the ledger mixes fixed-size rounds (replace-one) with Poisson/full-participation "
            "rounds (add/remove); no accountant composes the two relations. Keep "
            "strategy.sampling and strategy.fraction_train fixed within a run"
        )
    if accountant is not AccountantName.rdp:
        raise AccountingError(
            f"fixed-size sampling without replacement is supported only by dp-accounting's "
            f"RDP accountant, not {accountant.value!r}; set privacy.accountant=rdp or "
            "strategy.sampling=poisson"
        )
    acc = _replace_one_rdp()
    for b in blocks:
        acc.compose(b.first.dp_event(), b.rounds)
    value = float(acc.get_epsilon(delta))
    if not math.isfinite(value) or value < 0:
        raise AccountingError(f"rdp accountant returned epsilon={value!r} for this ledger")
    return value


@dataclass(frozen=True)
class FederationLedger:
    """Immutable ledger of one run's client-level DP rounds (oldest first).

    ``local`` maps a client key (its partition id or node id, as a string) to the
    number of rounds it released a local-DP update with ``local_noise_multiplier``.
    ``participation`` maps a client key to the number of rounds it was in the cohort:
    against the server, which picks and messages the cohort, a client's rounds are not
    amplified by sampling (:meth:`server_epsilons`). Keys are node ids, which a restarted
    server process (a Ray restart, a SuperNode that reconnects) may not see again, and
    the server cannot key them by site (distributed-DP clients hide their metrics, site
    hash included): ``participation_carried`` is the most cohorts any client was in
    under keys of earlier server processes, added to every client's count now
    (:meth:`new_participation_session`): sound whatever the ids become, loose when they
    stay the same.
    """

    delta: float
    accountant: AccountantName = AccountantName.pld
    events: tuple[RoundEvent, ...] = ()
    local_noise_multiplier: float | None = None
    local: tuple[tuple[str, int], ...] = ()
    participation: tuple[tuple[str, int], ...] = ()
    participation_carried: int = 0

    def __post_init__(self) -> None:
        _positive("delta", self.delta, upper=1.0)
        if self.delta >= 1:
            raise ValueError(f"delta must lie in (0, 1), found {self.delta}")
        object.__setattr__(self, "accountant", AccountantName(self.accountant))
        events = tuple(self.events)
        for i, e in enumerate(events):
            if not isinstance(e, RoundEvent):
                raise TypeError(f"events[{i}]: expected a RoundEvent, found {type(e).__name__}")
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "local", tuple(sorted(dict(self.local).items())))
        object.__setattr__(self, "participation", tuple(sorted(dict(self.participation).items())))
        carried = self.participation_carried
        if isinstance(carried, bool) or not isinstance(carried, int) or carried < 0:
            raise ValueError(f"participation_carried must be an integer >= 0, found {carried!r}")

    # ------------------------------------------------------------- building
    def add(self, event: RoundEvent) -> FederationLedger:
        """A new ledger with ``event`` appended (rounds must increase)."""
        if self.events and event.round <= self.events[-1].round:
            raise ValueError(
                f"round {event.round} is not after the ledger's last round "
                f"{self.events[-1].round}: the ledger is append-only"
            )
        return replace(self, events=(*self.events, event))

    def add_local(self, clients: Sequence[str]) -> FederationLedger:
        """A new ledger counting one more local-DP release for each of ``clients``."""
        if self.local_noise_multiplier is None:
            raise ValueError("this ledger has no local_noise_multiplier (privacy.mode!=local)")
        counts = dict(self.local)
        for c in clients:
            counts[str(c)] = counts.get(str(c), 0) + 1
        return replace(self, local=tuple(counts.items()))

    def add_participation(self, clients: Sequence[str]) -> FederationLedger:
        """A new ledger counting one more round in the cohort for each of ``clients``."""
        counts = dict(self.participation)
        for c in clients:
            counts[str(c)] = counts.get(str(c), 0) + 1
        return replace(self, participation=tuple(counts.items()))

    def new_participation_session(self) -> FederationLedger:
        """The ledger for a new server process: the counts so far become a bound.

        Node ids of the earlier process cannot be matched to the new one's, so every
        client is taken to have been in as many cohorts as the most-counted key
        (``participation_carried`` grows by that maximum) and counting restarts.
        """
        most = max((n for _, n in self.participation), default=0)
        return replace(
            self, participation=(), participation_carried=self.participation_carried + most
        )

    def most_participation(self) -> int:
        """The most cohorts any one client may have been in (carried bound included)."""
        return self.participation_carried + max((n for _, n in self.participation), default=0)

    # ------------------------------------------------------------ accounting
    def server_epsilons(self) -> dict[str, float]:
        """Each client's ε against a party that knows the cohort (the server), by key.

        No amplification: the composition of the rounds the client was in the cohort
        of, each at sampling rate 1 (:func:`unsampled_epsilon` of the ledger's last
        event). Empty before any round.
        """
        if not self.events:
            return {}
        last = self.events[-1]
        # Counts repeat (thousands of clients, a few distinct counts): one ε per count.
        carried = self.participation_carried
        by_count = {
            n: unsampled_epsilon(last, carried + n, self.delta, self.accountant)
            for n in {n for _, n in self.participation}
        }
        out = {c: by_count[n] for c, n in self.participation}
        if carried and not out:
            # A new process before its first cohort: the earlier processes' bound.
            out["(earlier processes)"] = unsampled_epsilon(
                last, carried, self.delta, self.accountant
            )
        return out

    def epsilon(self, accountant: AccountantName | str | None = None) -> float:
        """ε of the whole federation (central events) at this ledger's δ."""
        name = AccountantName(accountant) if accountant is not None else self.accountant
        return _epsilon_of(self.events, self.delta, name)

    def project(
        self, planned: Sequence[RoundEvent], accountant: AccountantName | str | None = None
    ) -> float:
        """ε after ``planned`` more rounds (the budget guard asks before each round)."""
        name = AccountantName(accountant) if accountant is not None else self.accountant
        return _epsilon_of((*self.events, *planned), self.delta, name)

    def local_epsilons(self) -> dict[str, float]:
        """Each local-DP client's ε (its own releases only), by client key."""
        if self.local_noise_multiplier is None:
            return {}
        return {
            client: local_epsilon(self.local_noise_multiplier, n, self.delta, self.accountant)
            for client, n in self.local
        }

    # --------------------------------------------------------- persistence
    def to_json(self) -> str:
        payload = {
            "version": LEDGER_VERSION,
            "delta": self.delta,
            "accountant": self.accountant.value,
            "events": [e.to_dict() for e in self.events],
            "local_noise_multiplier": self.local_noise_multiplier,
            "local": dict(self.local),
            "participation": dict(self.participation),
        }
        if self.participation_carried:
            payload["participation_carried"] = self.participation_carried
        return json.dumps(payload, sort_keys=True, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> FederationLedger:
        """Parse :meth:`to_json` output strictly (JSON only; unknown keys refused)."""
        try:
            raw = json.loads(text, object_pairs_hook=reject_duplicate_keys(LedgerError, "ledger: "))
        except LedgerError:
            raise
        except (TypeError, ValueError) as err:
            raise LedgerError(f"ledger: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise LedgerError("ledger: expected a JSON object")
        keys = {"version", "delta", "accountant", "events", "local_noise_multiplier", "local"}
        # "participation" is absent in older ledgers (read as: nobody counted yet).
        if not keys <= set(raw) <= keys | {"participation", "participation_carried"}:
            raise LedgerError(f"ledger: expected keys {sorted(keys)}, found {sorted(raw)}")
        participation = raw.get("participation", {})
        if not isinstance(participation, dict):
            raise LedgerError("participation must be an object")
        for k, v in participation.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LedgerError(f"participation[{k!r}]: expected a count >= 0, found {v!r}")
        if raw["version"] != LEDGER_VERSION:
            raise LedgerError(f"version: unsupported ledger version {raw['version']!r}")
        if not isinstance(raw["events"], list) or not isinstance(raw["local"], dict):
            raise LedgerError("events must be a list and local an object")
        fields = set(RoundEvent.__dataclass_fields__)
        # Absent in older ledgers.
        optional = {"mechanism", "ddg_tau", "ddg_dimension", "branch_delta", "encoding_slack"}
        events = []
        for i, item in enumerate(raw["events"]):
            if not isinstance(item, dict) or not (fields - optional <= set(item) <= fields):
                raise LedgerError(f"events[{i}]: expected an object with keys {sorted(fields)}")
            try:
                events.append(RoundEvent(**item))
            except (TypeError, ValueError) as err:
                raise LedgerError(f"events[{i}]: {err}") from None
        local = []
        for k, v in raw["local"].items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LedgerError(f"local[{k!r}]: expected a count >= 0, found {v!r}")
            local.append((k, v))
        try:
            return cls(
                delta=raw["delta"],
                accountant=raw["accountant"],
                events=tuple(events),
                local_noise_multiplier=raw["local_noise_multiplier"],
                local=tuple(local),
                participation=tuple(participation.items()),
                participation_carried=raw.get("participation_carried", 0),
            )
        except (TypeError, ValueError) as err:
            raise LedgerError(f"ledger: {err}") from None


def local_epsilon(
    noise_multiplier: float, releases: int, delta: float, accountant: AccountantName | str
) -> float:
    """ε of ``releases`` local-DP releases of one client (``GaussianDpEvent(z/2)`` each).

    A Gaussian event is a Poisson-sampled one with ``q = 1``, so any of the record-level
    accountants composes it.
    """
    if releases <= 0:
        return 0.0
    z = _positive("noise_multiplier", noise_multiplier)
    history = PrivacyHistory((DpSgdEvent(z / 2.0, 1.0, int(releases)),))
    return epsilon(history, delta, accountant)


def unsampled_epsilon(
    template: RoundEvent, rounds: int, delta: float, accountant: AccountantName | str
) -> float:
    """ε of ``rounds`` rounds like ``template`` for a client known to be in each cohort.

    This is the guarantee against the party that samples the cohort (the server): it
    knows who took part, so sampling amplifies nothing and each round is the bare
    mechanism, ``GaussianDpEvent(z)`` (``z/2`` under replace-one) or the unsampled
    distributed discrete Gaussian (q = 1 in [KLS] Proposition 14). Sampling-dependent
    branches do not apply either (``branch_delta`` is an outsider's uncertainty).
    """
    if rounds <= 0:
        return 0.0
    if template.mechanism == "ddg":
        from fl_app.privacy.distributed import ddg_epsilon

        assert template.ddg_tau is not None and template.ddg_dimension is not None
        return ddg_epsilon(
            [(1.0, template.noise_multiplier, template.ddg_tau, template.ddg_dimension, rounds)],
            delta,
        )
    z = template.noise_multiplier / (2.0 if template.replace_one else 1.0)
    return epsilon(PrivacyHistory((DpSgdEvent(z, 1.0, int(rounds)),)), delta, accountant)


def _replace_one_rdp() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=32)
def calibrate_round_noise(
    target_epsilon: float,
    delta: float,
    template: RoundEvent,
    rounds: int,
    accountant: AccountantName | str,
) -> float:
    """Smallest effective ``z`` whose ``rounds`` rounds like ``template`` stay within budget.

    Poisson and full participation reuse
    :func:`fl_app.privacy.accounting.calibrate_noise_multiplier` (clients as records);
    fixed-size rounds use dp-accounting's ``calibrate_dp_mechanism`` over the
    replace-one RDP accountant. The result is checked: ε(z) <= target. Cached: the
    config validator and the run's builder resolve the same settings (seconds each).
    """
    target = _positive("target_epsilon", target_epsilon)
    name = AccountantName(accountant)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, found {rounds}")
    if not template.replace_one:
        rate = template.sample_rate if template.sampling is SamplingScheme.poisson else 1.0
        return calibrate_noise_multiplier(target, delta, rate, rounds, name)
    if name is not AccountantName.rdp:
        raise AccountingError(
            "fixed-size sampling is accounted only by rdp; set privacy.accountant=rdp"
        )

    def event_of(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                template.population, int(template.cohort), dp_accounting.GaussianDpEvent(z / 2.0)
            ),
            rounds,
        )

    z = float(
        dp_accounting.calibrate_dp_mechanism(
            _replace_one_rdp,
            event_of,
            target,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )
    # calibrate_dp_mechanism's tolerance is on z; make sure the answer is within budget.
    for _ in range(50):
        rounds_at_z = [
            replace(template, round=i + 1, noise_multiplier=z, update_noise_multiplier=z)
            for i in range(rounds)
        ]
        if _epsilon_of(rounds_at_z, delta, name) <= target:
            return z
        z *= 1.001
    raise AccountingError(f"could not calibrate z for target_epsilon={target} (rdp)")
