"""Local DP on the client (``privacy.mode=local``): the mechanism and its accounting.

Each client clips its update to L2 norm ``C`` and adds ``N(0, (z·C)²)`` to every
coordinate before the update leaves the site, so the server (trusted with nothing
un-noised from this client) receives a Gaussian-mechanism release. Each release is
accounted as ``GaussianDpEvent(z/2)`` (:func:`fl_app.privacy.composition.local_epsilon`;
replace-one sensitivity ``2C``) and composed over the client's releases in the run.

Trust assumptions: the noise comes from this client's own CSPRNG
(:class:`~fl_app.privacy.noise.SecureNoise`, a fresh OS key per round), never from a
seed the server knows; the release count lives in a state file on the site's disk
(:class:`~fl_app.privacy.state.LocalDpStore`) that is written *before* the release,
so neither a crash, a restarted SuperNode, a resumed run nor a rollback can rewind it
(a crash can only over-count). The server's own count of the releases it received
(``fl-app.local-releases-seen``) must not exceed the file's, or the client refuses.

The ClientApp handler (:mod:`fl_app.client.dp_stages`) decodes the instruction, checks the
site policy, opens the store and calls :func:`begin_release`; this module has no
Flower imports. Refusals are :class:`~fl_app.privacy.refusal.PrivacyRefusal`, whose
text goes back to the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal
from fl_app.privacy.state import LocalDpState, PrivacyStateError

__all__ = [
    "LocalRelease",
    "ReleaseStore",
    "add_gaussian_noise",
    "begin_release",
    "releases_seen",
]

log = logging.getLogger("fl_app.client")


class ReleaseStore(Protocol):
    """Where a client keeps its release count (:class:`~fl_app.privacy.state.LocalDpStore`)."""

    def load(self, noise_multiplier: float, releases_seen_by_server: int = 0) -> LocalDpState:
        """The state so far; raises ``PrivacyStateError`` if it was lost or disagrees."""
        ...

    def save(self, state: LocalDpState) -> None:
        """Persist ``state`` (file first, then memory)."""
        ...


def releases_seen(value: object, key: str) -> int:
    """The server's count of releases it received from this site, checked.

    ``key`` names the instruction field in the refusal.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyRefusal(f"'{key}' must be an integer >= 0, got {value!r}")
    return value


def add_gaussian_noise(
    update: Mapping[str, np.ndarray], std: float, normal: Callable[[float, int], np.ndarray]
) -> dict[str, np.ndarray]:
    """``update + N(0, std²)`` per coordinate, added in float64, cast back to each dtype.

    ``normal(std, n)`` draws ``n`` samples (the caller's source: a CSPRNG in production).
    """
    return {
        k: (v.astype(np.float64) + normal(std, v.size).reshape(v.shape)).astype(v.dtype)
        for k, v in update.items()
    }


@dataclass(frozen=True)
class LocalRelease:
    """One accounted local-DP release of this client: persisted before it is made."""

    noise_multiplier: float
    clip_norm: float
    #: ε after this release (this client's releases in the run, composed).
    epsilon: float
    #: This client's releases in the run, this one included.
    releases: int

    @property
    def noise_std(self) -> float:
        """``z·C``: the Gaussian mechanism's standard deviation per coordinate."""
        return self.noise_multiplier * self.clip_norm

    def noise_stage(self) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """The pipeline's noise stage for this release.

        Always a CSPRNG under a fresh key: noise from a seed the server knows would
        protect nothing from it.
        """
        from fl_app.privacy.noise import SecureNoise

        source = SecureNoise()
        std = self.noise_std

        def noise(update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return add_gaussian_noise(update, std, source.normal)

        return noise

    def public_metrics(self, partition_id: int) -> dict[str, float]:
        """What the reply tells the server: public by design (README, model card).

        ε and the release count follow from the rounds the server sent and received;
        the partition id keys the server's per-site guard.
        """
        return {
            "dp-local-epsilon": self.epsilon,
            "dp-local-releases": self.releases,
            "dp-partition-id": partition_id,
        }


def begin_release(
    open_store: Callable[[], ReleaseStore],
    *,
    noise_multiplier: float,
    clip_norm: float,
    delta: float,
    accountant: str,
    max_epsilon: float | None,
    seen_by_server: int,
    account_site: Callable[[float, bool], None],
) -> LocalRelease:
    """Account this round's release and persist it, before anything is trained.

    In this order: load the state (refusing a lost or replaced one), compute ε after
    one more release, refuse past ``max_epsilon`` (:class:`BudgetRefusal`), let the
    site check and record its own budget (``account_site(ε, spent_before)``, which may
    raise its own refusal), then save the new count. Nothing is saved on a refusal.

    Parameters
    ----------
    open_store
        Opens the client's :class:`ReleaseStore` (its errors are refusals too).
    accountant
        A :class:`~fl_app.privacy.history.AccountantName` value (``pld``, ``rdp``, ``prv``).
    seen_by_server
        The releases the server received from this site (:func:`releases_seen`).
    """
    from fl_app.privacy.composition import local_epsilon

    z = float(noise_multiplier)
    try:
        store = open_store()
        state = store.load(z, releases_seen_by_server=seen_by_server)
    except PrivacyStateError as err:
        raise PrivacyRefusal(f"local DP state: {err}") from err
    releases = state.releases + 1
    try:
        eps_after = local_epsilon(z, releases, delta, accountant)
    except (ValueError, RuntimeError) as err:
        raise PrivacyRefusal(f"local DP accounting: {err}") from err
    if max_epsilon is not None and eps_after > max_epsilon:
        raise BudgetRefusal(
            f"local DP budget exhausted: epsilon would reach {eps_after:.4g} after this "
            f"round (budget {max_epsilon:g}, delta {delta:g}, {releases - 1} releases)"
        )
    account_site(eps_after, state.releases > 0)
    store.save(LocalDpState(releases=releases, noise_multiplier=z))  # before any release
    return LocalRelease(
        noise_multiplier=z, clip_norm=float(clip_norm), epsilon=eps_after, releases=releases
    )
