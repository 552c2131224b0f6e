"""The federation's privacy ledger: the immutable tuple of its client-level DP rounds
(:class:`fl_app.privacy.round_event.RoundEvent`), local-DP release and cohort counts,
persisted every round as strict JSON.

ε is always recomputed from the whole ledger (house rule 5, docs/architecture.md,
Privacy accounting) by :mod:`fl_app.privacy.composition`. Trust assumption: the ledger
is complete (a round is recorded before its model leaves the server, even when it
turned out to have too few replies).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fl_app.privacy.composition import _epsilon_of, local_epsilon, unsampled_epsilon
from fl_app.privacy.history import AccountantName
from fl_app.privacy.round_event import RoundEvent, _positive
from fl_app.strict_json import reject_duplicate_keys

__all__ = ["LEDGER_VERSION", "FederationLedger", "LedgerError"]

LEDGER_VERSION = 1


class LedgerError(ValueError):
    """A serialised ledger is malformed; the message names the field."""


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
        of, each at sampling rate 1 (:func:`unsampled_epsilon` of the ledger's least
        noised event, the last of equals: the counts do not say which rounds a client
        was in, and under a noise schedule rounds differ in ``z``, so every round is
        taken at the smallest ``z``, an upper bound). Empty before any round.
        """
        if not self.events:
            return {}
        last = min(reversed(self.events), key=lambda e: e.noise_multiplier)
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
        optional = {
            "mechanism",
            "ddg_tau",
            "ddg_dimension",
            "branch_delta",
            "encoding_slack",
            "tree_position",  # only once-per-tree DP-FTRL rounds carry it
        }
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
