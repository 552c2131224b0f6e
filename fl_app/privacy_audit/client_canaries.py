"""Client-level canaries: a one-run lower bound on a client-level ε, from two views.

``fl-app audit-privacy <run dir> --client-canaries K`` (:mod:`fl_app.cli.audit_privacy`)
audits the client-level mechanism a run *recorded* (``privacy=central``,
``distributed`` or ``local``; a run without DP is audited as a plain mean), following
Steinke, Nasr & Jagielski (NeurIPS 2023) with the canary clients of Andrew et al.
("One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024):

1. **Canary clients.** ``K`` unit vectors ``u_i`` drawn uniformly on the sphere of the
   model's parameter space; canary ``i`` is *included* with probability ½. An included
   canary's update is ``C_t·u_i`` (a fixed direction at the round's clip norm ``C_t``:
   the largest update clipping lets through), an excluded canary's is zero.
2. **Replay.** Every round of the run's ledger (``privacy_ledger.json``) is replayed
   with its own clip norm, noise standard deviation, divisor (the expected cohort) and
   sampling rate: each canary joins a round's cohort with the round's sampling
   probability, independently of its inclusion bit (fixed-size cohorts: ``m/N``,
   the marginal of fixed-size sampling; the joint draw is then Poisson-like, not the
   fixed-size one the ledger accounted). The other clients contribute
   nothing: DP must hold for every dataset, so fixing them is the strongest audit (the
   audit proves what the *mechanism* leaks; the record-level ``--canaries`` re-run
   audits training end to end).
3. **Two views.** *Released model*: score ``<u_i, Δ>`` with ``Δ`` the sum of the
   released rounds (final minus initial model, FedAvg with server learning rate 1;
   a server optimizer's scaling does not change the ranking). *Server view*: what the
   server receives, by mode: central DP, the clipped sum *before* the server adds its
   noise; distributed DP, the unmasked sum, which carries the clients' noise shares;
   local DP, each client's own noised update; no DP, the plain sum. The server knows
   who is in each cohort, so its score sums ``<u_i, view_t>`` over the rounds
   canary ``i`` was in.
4. **Guesses and bound.** The ``K/4`` highest scores guessed "in", the ``K/4`` lowest
   "out" (fixed in advance), and :mod:`~fl_app.privacy_audit.one_run` turns them into
   a lower bound at the run's δ with 95 % confidence.

Compared against: the released-model bound against ``privacy.epsilon`` (the ε against
outsiders, with the sampling the replay reproduces); the server-view bound against
distributed DP's ε against the server (``epsilon_planned_worst_case``: a client in
every round, an upper bound on any canary's participation) and, under local DP, the
ε of a client releasing in every round; under central DP the server is trusted
(it adds the noise after seeing the sum), so its view is reported, never compared.
Distributed DP's discrete Gaussian shares are replayed as a continuous Gaussian of the
recorded standard deviation (the ledger's DDG bound is looser than the Gaussian's, so
the comparison stays sound). Local DP replays ``z·C`` noise on every canary's update
in every round.

Randomness: one explicit generator seeded by the audit seed (as in
:mod:`~fl_app.privacy_audit.canaries`: the audit is reproducible from ``audit.json``).
See docs/privacy-audit.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.privacy_audit.one_run import OneRunBound, guess_from_scores

__all__ = [
    "CanaryScores",
    "ClientCanaries",
    "NoiseSite",
    "RoundMechanism",
    "client_canary_audit",
    "draw_client_canaries",
    "replay_rounds",
    "rounds_from_run",
]

CONFIDENCE = 0.95
_DEFAULT_DELTA = 1e-5
_SEED_TAG = 0xC11E


class NoiseSite(str, Enum):
    """Where a round's noise is added, which decides what the server sees."""

    server = "server"  # central DP: on the sum, after the server saw it
    clients = "clients"  # distributed DP: shares inside the sum the server unmasks
    each_client = "each_client"  # local DP: on every update before it is sent
    none = "none"  # no DP


@dataclass(frozen=True)
class RoundMechanism:
    """One round as replayed: clip ``C``, noise std, divisor, sampling rate, site.

    ``noise_std`` is the std of the noise on the *sum* (server, clients) or on each
    client's update (each_client).
    """

    clip: float
    noise_std: float
    divisor: float
    participation: float
    noise_site: NoiseSite

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.divisor > 0 and self.noise_std >= 0):
            raise ValueError(
                f"a replayed round needs clip > 0, divisor > 0 and noise_std >= 0, found "
                f"{self.clip}, {self.divisor}, {self.noise_std}: check privacy_ledger.json"
            )
        if not 0 < self.participation <= 1:
            raise ValueError(f"participation must lie in (0, 1], found {self.participation}")


@dataclass(frozen=True)
class ClientCanaries:
    """``K`` unit directions (rows) and which canary clients are included."""

    directions: np.ndarray
    included: np.ndarray

    def __len__(self) -> int:
        return len(self.included)


def draw_client_canaries(k: int, dim: int, rng: np.random.Generator) -> ClientCanaries:
    """``k`` directions uniform on the unit sphere of R^dim, each included w.p. ½."""
    if k < 4:
        raise ValueError(
            f"--client-canaries needs at least 4 canaries (K/4 guesses each way), found {k}"
        )
    if dim < 1:
        raise ValueError(f"the model has no parameters to place canaries in (dim={dim})")
    g = rng.standard_normal((k, dim))
    directions = g / np.linalg.norm(g, axis=1, keepdims=True)
    return ClientCanaries(directions=directions, included=rng.random(k) < 0.5)


@dataclass(frozen=True)
class CanaryScores:
    """Membership scores of every canary: from the released model, from the server."""

    released: np.ndarray
    server: np.ndarray


def replay_rounds(
    canaries: ClientCanaries, rounds: Sequence[RoundMechanism], rng: np.random.Generator
) -> CanaryScores:
    """Run the canary clients through ``rounds`` and score both views (module doc)."""
    u = canaries.directions
    k, dim = u.shape
    inc = canaries.included.astype(np.float64)
    delta = np.zeros(dim)
    server = np.zeros(k)
    for r in rounds:
        cohort = rng.random(size=k) < r.participation
        weights = r.clip * inc * cohort  # update of canary i: weights[i] * u_i
        clipped_sum = weights @ u
        if r.noise_site is NoiseSite.each_client:
            noise = rng.standard_normal((int(np.count_nonzero(cohort)), dim)) * r.noise_std
            sent = weights[cohort, None] * u[cohort] + noise
            server[cohort] += np.einsum("ij,ij->i", u[cohort], sent)
            delta += sent.sum(axis=0) / r.divisor
            continue
        sum_noise = rng.standard_normal(dim) * r.noise_std if r.noise_std > 0 else 0.0
        if r.noise_site is NoiseSite.server:
            view = clipped_sum
            delta += (clipped_sum + sum_noise) / r.divisor
        else:
            view = clipped_sum + sum_noise
            delta += view / r.divisor
        server[cohort] += u[cohort] @ view
    return CanaryScores(released=u @ delta, server=server)


def _local_rounds(
    summary: dict[str, Any], ledger: dict[str, Any], num_rounds: int
) -> list[RoundMechanism]:
    z = ledger.get("local_noise_multiplier")
    clip = ((summary.get("privacy") or {}).get("client_level") or {}).get("clip")
    if z is None or clip is None:
        raise ValueError(
            "privacy.mode=local: the ledger has no local_noise_multiplier or summary.json "
            "no privacy.client_level.clip; audit a run written by this release"
        )
    std = float(z) * float(clip)
    return [RoundMechanism(float(clip), std, 1.0, 1.0, NoiseSite.each_client)] * num_rounds


def rounds_from_run(
    summary: dict[str, Any], ledger: dict[str, Any] | None, num_rounds: int
) -> list[RoundMechanism]:
    """The rounds a run recorded, as :func:`replay_rounds` replays them.

    Central and distributed DP: one per ledger event (its clip, ``noise_std``, expected
    cohort and sampling rate). Local DP: ``num_rounds`` rounds, every canary in each,
    ``z·C`` noise on its update. No DP: ``num_rounds`` plain sums, unit clip.
    """
    mode = str((summary.get("privacy") or {}).get("mode") or "none")
    if mode in ("none", "local") and num_rounds < 1:
        raise ValueError(f"summary.json records {num_rounds} rounds: nothing to audit")
    if mode == "none":
        return [RoundMechanism(1.0, 0.0, 1.0, 1.0, NoiseSite.none)] * num_rounds
    if ledger is None:
        raise ValueError(f"privacy.mode={mode}: the run directory has no privacy_ledger.json")
    if mode == "local":
        return _local_rounds(summary, ledger, num_rounds)
    site = NoiseSite.clients if mode == "distributed" else NoiseSite.server
    out = []
    for e in ledger.get("events") or []:
        clip = float(e["clip"])
        std = float(e["update_noise_multiplier"]) * (clip + float(e.get("encoding_slack", 0.0)))
        rate = (
            float(e["sample_rate"])
            if e["sampling"] == "poisson"
            else (float(e["cohort"]) / int(e["population"]))
        )
        out.append(RoundMechanism(clip, std, float(e["cohort"]), rate, site))
    if not out:
        raise ValueError("the run's privacy_ledger.json records no round: nothing to audit")
    return out


def _accounted(
    summary: dict[str, Any], ledger: dict[str, Any] | None, rounds: int
) -> dict[str, float | None]:
    """The ε each view is compared against (module doc), and the run's δ."""
    p = summary.get("privacy") or {}
    mode = str(p.get("mode") or "none")
    delta = float(p.get("delta") or _DEFAULT_DELTA)
    if mode == "none":
        return {"released": None, "server": None, "delta": delta}
    if mode == "local":
        from fl_app.privacy.composition import local_epsilon

        assert ledger is not None
        cl = p.get("client_level") or {}
        eps = local_epsilon(
            float(ledger["local_noise_multiplier"]), rounds, delta, str(cl.get("accountant"))
        )
        return {"released": eps, "server": eps, "delta": delta}
    against = (p.get("client_level") or {}).get("against_server") or {}
    server = against.get("epsilon_planned_worst_case") if mode == "distributed" else None
    released = p.get("epsilon")
    return {
        "released": None if released is None else float(released),
        "server": None if server is None else float(server),
        "delta": delta,
    }


def _model_dim(run_dir: Path, summary: dict[str, Any]) -> int:
    from fl_app.server.layout import MODEL_FILE
    from fl_app.weights import load_safetensors

    arrays, _ = load_safetensors(run_dir / str(summary.get("model_file") or MODEL_FILE))
    return int(sum(np.asarray(a).size for a in arrays.values()))


def client_canary_audit(
    run_dir: Path, k: int, seed: int
) -> tuple[dict[str, OneRunBound], dict[str, Any]]:
    """Audit ``run_dir``'s recorded client-level mechanism with ``k`` canary clients.

    Returns the two bounds (``released_model``, ``server_view``) and ``audit.json``'s
    ``client_one_run`` section. The caller checks each bound against its accounted ε
    once the section is written (:func:`~fl_app.privacy_audit.one_run.
    check_against_accounted`; the server view under central DP carries ``None``).
    """
    from fl_app.server.layout import LEDGER_FILE, SUMMARY_FILE

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    ledger_path = run_dir / LEDGER_FILE
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else None
    num_rounds = int(summary.get("rounds") or 0)
    rounds = rounds_from_run(summary, ledger, num_rounds)
    acc = _accounted(summary, ledger, len(rounds))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SEED_TAG]))
    canaries = draw_client_canaries(int(k), _model_dim(run_dir, summary), rng)
    scores = replay_rounds(canaries, rounds, rng)
    delta = float(acc["delta"] or _DEFAULT_DELTA)
    bounds = {
        view: OneRunBound.of(
            guess_from_scores(s, canaries.included, k // 4, k // 4), delta, CONFIDENCE, acc[key]
        )
        for view, key, s in (
            ("released_model", "released", scores.released),
            ("server_view", "server", scores.server),
        )
    }
    section = {
        **{view: b.to_json() for view, b in bounds.items()},
        "canaries": int(k),
        "included": int(canaries.included.sum()),
        "dimension": int(canaries.directions.shape[1]),
        "rounds_replayed": len(rounds),
        "mode": str((summary.get("privacy") or {}).get("mode") or "none"),
        "server_sees": _SERVER_SEES[rounds[0].noise_site],
        "canary_clients": "unit directions uniform on the parameter sphere, update "
        "C_t * u_i if included (probability 1/2), else zero; other clients contribute nothing",
        "guess_rule": "top K//4 of <u_i, view> guessed in, bottom K//4 out, rest abstain",
        "reference": "Steinke, Nasr & Jagielski, NeurIPS 2023; Andrew et al., ICLR 2024",
    }
    return bounds, section


_SERVER_SEES = {
    NoiseSite.server: "the clipped sum before the server's own noise (central DP: the "
    "server is trusted, its view is not compared with epsilon)",
    NoiseSite.clients: "the unmasked sum, carrying the clients' noise shares",
    NoiseSite.each_client: "each client's locally noised update",
    NoiseSite.none: "the plain sum (no DP)",
}
