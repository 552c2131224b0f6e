"""Where a DP-SGD client keeps its privacy state between rounds and across restarts.

The accountant history is the only thing standing between an institution and an
under-counted epsilon, so it lives in two places (docs/architecture.md, Privacy accounting):

* the node's memory (:class:`StateMemory`; the ClientApp's is a ``Context.state``
  record, ``fl-app.dpsgd``, :mod:`fl_app.client.state`): survives rounds while the
  SuperNode (or simulation) process lives;
* a JSON file in the client's state directory (``--node-config dp-state-dir=...``, or
  the run directory's ``client-state/`` in simulation): survives a SuperNode restart.

Rules, checked before every round (:meth:`ClientPrivacyState.load`):

* file present: it is the truth; an in-memory copy must agree with it;
* in-memory state present but file missing: refuse (someone deleted it);
* the server has seen this client spend more steps than the file records: refuse
  (a lost or replaced state file must never restart accounting from zero);
* neither: a fresh start (nothing spent yet).

The new state is written *before* training, so a crash mid-round over-counts at
worst, never under-counts. JSON only: the file is an artifact an auditor may read.

Local DP (``privacy.mode=local``) keeps its release count the same way
(:class:`LocalDpStore`, ``localdp-<run key>-<site identity>.json`` in the same state
directory, ``fl-app.local-dp`` in ``Context.state``), under the same rules, with the
server's count of the releases it received from this site (``fl-app.local-releases-seen``)
in place of the DP-SGD steps it saw. Kept in ``Context.state`` alone, the count was reset
by a restarted SuperNode, a resumed run or a rollback (4 releases were made against a
budget that allowed 2).

Both are per run: their files are named by the run key from the server's spec, so a
server that renames the run gets a fresh count. The site's own cap (policy
``max_epsilon``) must not rewind with it, so every release is also appended, before it
is made, to the site's budget ledger (:class:`SiteBudgetLedger`,
``site-budget-<site identity>.jsonl`` in the same state directory): one line per release
with the run key, the kind and the run's epsilon and delta after it. The site's total is
the sum over runs of each run's latest epsilon (and delta): basic composition, a valid
upper bound whatever the runs were (Dwork and Roth 2014, Thm 3.16). A run with both
kinds (DP-SGD updates then locally noised) counts the larger: its releases are single
updates, each covered by either guarantee (the local noise is post-processing of the
DP-SGD output, and an update-level bound covers every record in it).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fl_app.atomic import write_atomic
from fl_app.privacy.history import PrivacyHistory

__all__ = [
    "LOCAL_RELEASES_SEEN_KEY",
    "ROUNDS_SEEN_KEY",
    "STEPS_SEEN_KEY",
    "SYNTH_KIND",
    "ClientPrivacyState",
    "DpSgdState",
    "LocalDpState",
    "LocalDpStore",
    "PrivacyStateError",
    "SiteBudgetLedger",
    "SiteSpend",
    "StateMemory",
]

# Per-node instruction config: DP-SGD steps the server has seen this node report.
STEPS_SEEN_KEY = "fl-app.dp-steps-seen"
# Per-node instruction config: DP-SGD rounds the server has seen this node train, where it
# must not see the steps (they reveal the record count): secure aggregation, local DP.
ROUNDS_SEEN_KEY = "fl-app.dp-rounds-seen"
# Per-node instruction config: local-DP releases the server has received from this site.
LOCAL_RELEASES_SEEN_KEY = "fl-app.local-releases-seen"
_VERSION = 1
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SAFE_SITE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,79}")


class PrivacyStateError(Exception):
    """The stored privacy state is missing, corrupt or inconsistent: do not train."""


@dataclass(frozen=True)
class DpSgdState:
    history: PrivacyHistory
    # z, calibrated once (from a target epsilon) or configured, then kept fixed.
    noise_multiplier: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "noise_multiplier": self.noise_multiplier,
                "history": json.loads(self.history.to_json()),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> DpSgdState:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise PrivacyStateError(f"privacy state is not valid JSON: {err}") from err
        if not isinstance(raw, dict) or raw.get("version") != _VERSION:
            raise PrivacyStateError(f"privacy state has an unknown version: {raw!r:.80}")
        z = raw.get("noise_multiplier")
        if z is not None and (
            isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0
        ):
            raise PrivacyStateError(f"privacy state field noise_multiplier is invalid: {z!r}")
        try:
            history = PrivacyHistory.from_json(json.dumps(raw.get("history")))
        except ValueError as err:
            raise PrivacyStateError(f"privacy state history is invalid: {err}") from err
        return cls(history=history, noise_multiplier=None if z is None else float(z))


def _state_path(state_dir: str | os.PathLike[str], kind: str, run_key: str, site: str) -> Path:
    """``<state_dir>/<kind>-<run key>-<site>.json``, both parts checked as safe names."""
    if not _SAFE_KEY.fullmatch(run_key or ""):
        raise PrivacyStateError(f"run key {run_key!r} is not a safe file-name component")
    if not _SAFE_SITE.fullmatch(site or ""):
        raise PrivacyStateError(f"site identity {site!r} is not a safe file-name component")
    return Path(state_dir) / f"{kind}-{run_key}-{site}.json"


class StateMemory(Protocol):
    """The node's in-memory copy of one state file, kept while its process lives.

    The ClientApp's is a ``Context.state`` record (:class:`fl_app.client.state.ContextMemory`);
    this module stays free of Flower so the rules above are testable on their own.
    """

    def get(self) -> str | None:
        """The copy saved last in this process, or None (nothing saved, or unreadable)."""
        ...

    def put(self, text: str) -> None:
        """Keep ``text`` as the copy."""
        ...


class ClientPrivacyState:
    """Load and save one client's :class:`DpSgdState` for one run."""

    def __init__(
        self,
        memory: StateMemory,
        state_dir: str | os.PathLike[str],
        run_key: str,
        site: str | int,
    ) -> None:
        """``site``: the site identity (:func:`fl_app.client.identity.site_identity`:
        ``site-<name>``, ``data-<hash>``, ``partition-<id>``), or a simulated partition
        id. Deployed sites all have partition id 0 and may share a state directory, so
        the file is named by the identity: ``dpsgd-<run key>-<site>.json``."""
        name = f"partition-{int(site)}" if isinstance(site, int) else site
        self.memory = memory
        self.path = _state_path(state_dir, "dpsgd", run_key, name)

    def load(self, steps_seen_by_server: int = 0) -> DpSgdState:
        memory = self.memory.get()
        if self.path.is_file():
            state = DpSgdState.from_json(self.path.read_text())
            if memory is not None and DpSgdState.from_json(memory) != state:
                raise PrivacyStateError(
                    f"privacy state file {self.path} disagrees with this node's in-memory "
                    "state: refusing to train until an operator resolves it"
                )
        elif memory is not None:
            raise PrivacyStateError(
                f"privacy state file {self.path} is missing although this node has spent "
                "privacy budget in this run: refusing to restart accounting from zero"
            )
        else:
            state = DpSgdState(history=PrivacyHistory())
        if state.history.total_steps < steps_seen_by_server:
            raise PrivacyStateError(
                # No step counts: this text goes to the server, and steps give the site's
                # record count (hidden under secure aggregation and local DP).
                f"the server saw this client take more DP-SGD steps than the state at "
                f"{self.path} records: the state file was lost or replaced; refusing to train"
            )
        return state

    def save(self, state: DpSgdState) -> None:
        text = state.to_json()
        write_atomic(self.path, text.encode())
        self.memory.put(text)


@dataclass(frozen=True)
class LocalDpState:
    """A local-DP client's releases in one run, and the ``z`` they were noised with.

    ``z`` is stored so that a run whose noise changes under the same run key (which a
    resumed run must not do) is refused instead of composed with the wrong events.
    """

    releases: int
    noise_multiplier: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "kind": "local-dp",
                "releases": self.releases,
                "noise_multiplier": self.noise_multiplier,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> LocalDpState:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise PrivacyStateError(f"local DP state is not valid JSON: {err}") from err
        if (
            not isinstance(raw, dict)
            or raw.get("version") != _VERSION
            or raw.get("kind") != "local-dp"
        ):
            raise PrivacyStateError(f"local DP state has an unknown format: {raw!r:.80}")
        n, z = raw.get("releases"), raw.get("noise_multiplier")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PrivacyStateError(f"local DP state field releases is invalid: {n!r}")
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
            raise PrivacyStateError(f"local DP state field noise_multiplier is invalid: {z!r}")
        return cls(releases=n, noise_multiplier=float(z))


class LocalDpStore:
    """Load and save one local-DP client's :class:`LocalDpState` for one run.

    The same rules as :class:`ClientPrivacyState` (module docstring): the file is the
    truth, memory must agree with it, a missing file after a release refuses, and so
    does a file that records fewer releases than the server received from this site.
    """

    def __init__(
        self, memory: StateMemory, state_dir: str | os.PathLike[str], run_key: str, site: str
    ) -> None:
        self.memory = memory
        # Named by the site identity (``site-<name>``, ``data-<hash>``, ``partition-<id>``):
        # deployed sites all have partition id 0 and may share a state directory.
        self.path = _state_path(state_dir, "localdp", run_key, site)

    def load(self, noise_multiplier: float, releases_seen_by_server: int = 0) -> LocalDpState:
        memory = self.memory.get()
        if self.path.is_file():
            state = LocalDpState.from_json(self.path.read_text())
            if memory is not None and LocalDpState.from_json(memory) != state:
                raise PrivacyStateError(
                    f"local DP state file {self.path} disagrees with this node's in-memory "
                    "state: refusing to release until an operator resolves it"
                )
            if state.noise_multiplier != noise_multiplier:
                raise PrivacyStateError(
                    f"local DP state file {self.path} was written for noise multiplier "
                    f"{state.noise_multiplier:g}, this run asks for {noise_multiplier:g}: the "
                    "releases would be accounted with the wrong noise; refusing"
                )
        elif memory is not None:
            raise PrivacyStateError(
                f"local DP state file {self.path} is missing although this node has released "
                "updates in this run: refusing to restart accounting from zero"
            )
        else:
            state = LocalDpState(releases=0, noise_multiplier=noise_multiplier)
        if state.releases < releases_seen_by_server:
            raise PrivacyStateError(
                f"the server received {releases_seen_by_server} local-DP releases from this "
                f"site but the state at {self.path} records {state.releases}: the state file "
                "was lost or replaced; refusing to release"
            )
        return state

    def save(self, state: LocalDpState) -> None:
        text = state.to_json()
        write_atomic(self.path, text.encode())
        self.memory.put(text)


# The kinds of epsilon a site's ledger composes: DP-SGD's record-level epsilon and local
# DP's (an update-level epsilon, which also bounds every record in the update), and a DP
# synthetic surrogate's (record-level, `fl-app synth`, each under its own release key).
SYNTH_KIND = "synthetic data"
SITE_SPEND_KINDS = ("record-level", "local DP", SYNTH_KIND)


@dataclass(frozen=True)
class SiteSpend:
    """One line of the site's budget ledger: a run's epsilon and delta after a release."""

    run_key: str
    kind: str
    epsilon: float
    delta: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "run_key": self.run_key,
                "kind": self.kind,
                "epsilon": self.epsilon,
                "delta": self.delta,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SiteSpend:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise PrivacyStateError(f"not valid JSON: {err}") from err
        if not isinstance(raw, dict) or raw.get("version") != _VERSION:
            raise PrivacyStateError(f"unknown format: {raw!r:.80}")
        run_key, kind = raw.get("run_key"), raw.get("kind")
        eps, delta = raw.get("epsilon"), raw.get("delta")
        if not isinstance(run_key, str) or not _SAFE_KEY.fullmatch(run_key):
            raise PrivacyStateError(f"field run_key is invalid: {run_key!r}")
        if kind not in SITE_SPEND_KINDS:
            raise PrivacyStateError(f"field kind is {kind!r}, not one of {SITE_SPEND_KINDS}")
        for name, value in (("epsilon", eps), ("delta", delta)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise PrivacyStateError(f"field {name} is invalid: {value!r}")
        assert isinstance(eps, (int, float)) and isinstance(delta, (int, float))
        return cls(run_key=run_key, kind=str(kind), epsilon=float(eps), delta=float(delta))


class SiteBudgetLedger:
    """The site's append-only record of every release it made on its data, all runs.

    The per-run files (:class:`ClientPrivacyState`, :class:`LocalDpStore`) are named by
    the server's run key; this one is named by the site identity alone (``site-<name>``
    from the site's own node config, ``data-<hash of its data file>``, or
    ``partition-<id>``), which the server does not choose, so a renamed run composes with
    the runs before it instead of starting the site's budget from zero. It is keyed by the
    site identity rather than by a hash of the loaded arrays on purpose: what the client
    loads depends on server-chosen spec fields (seed, split), and a key the server can
    change is a budget it can reset.

    Written before each release (after the per-run checks, before the per-run state), so
    a crash can only over-count. A line that does not parse refuses: the ledger is the
    only memory of earlier runs' spend.
    """

    def __init__(self, state_dir: str | os.PathLike[str], site: str) -> None:
        if not _SAFE_SITE.fullmatch(site or ""):
            raise PrivacyStateError(f"site identity {site!r} is not a safe file-name component")
        self.path = Path(state_dir) / f"site-budget-{site}.jsonl"

    def entries(self) -> list[SiteSpend]:
        if not self.path.is_file():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                out.append(SiteSpend.from_json(line))
            except PrivacyStateError as err:
                raise PrivacyStateError(
                    f"site budget ledger {self.path} line {number}: {err}; it is the only "
                    "record of this site's spend in earlier runs: refusing until an operator "
                    "repairs it"
                ) from err
        return out

    def total(self, run_key: str, kind: str, epsilon: float, delta: float) -> tuple[float, float]:
        """The site's epsilon and delta if this run's ``kind`` reaches ``epsilon``/``delta``:
        the sum over run keys of each run's largest recorded epsilon (and delta) over its
        kinds, with this run's replaced by the new values (a run's epsilon only grows)."""
        latest: dict[tuple[str, str], tuple[float, float]] = {}
        for entry in self.entries():
            key = (entry.run_key, entry.kind)
            eps0, delta0 = latest.get(key, (0.0, 0.0))
            latest[key] = (max(eps0, entry.epsilon), max(delta0, entry.delta))
        eps0, delta0 = latest.get((run_key, kind), (0.0, 0.0))
        latest[(run_key, kind)] = (max(eps0, epsilon), max(delta0, delta))
        per_run: dict[str, tuple[float, float]] = {}
        for (run, _kind), (eps_k, delta_k) in latest.items():
            eps0, delta0 = per_run.get(run, (0.0, 0.0))
            per_run[run] = (max(eps0, eps_k), max(delta0, delta_k))
        return (
            math.fsum(e for e, _ in per_run.values()),
            math.fsum(d for _, d in per_run.values()),
        )

    def check_recorded(self, run_key: str, kind: str, spent: bool) -> None:
        """Refuse when this run's state records a release the ledger does not (it was
        deleted or replaced): the earlier runs' spend it held would be forgotten too."""
        if spent and not any(e.run_key == run_key and e.kind == kind for e in self.entries()):
            raise PrivacyStateError(
                f"this run's {kind} state records releases but the site budget ledger "
                f"{self.path} has none for run {run_key!r}: the ledger was lost or replaced; "
                "refusing to release until an operator restores it"
            )

    def record(self, spend: SiteSpend) -> None:
        """Append one line, fsynced before the release it accounts is made."""
        if spend.kind not in SITE_SPEND_KINDS:
            raise PrivacyStateError(f"kind {spend.kind!r} is not one of {SITE_SPEND_KINDS}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(spend.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
