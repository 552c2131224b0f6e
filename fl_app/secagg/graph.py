"""Neighbour graphs and Shamir thresholds for secure aggregation.

Two modes (:class:`GraphMode`):

``secagg``
    Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for Privacy-Preserving
    Machine Learning", §4): every client shares its secrets with every other client
    (complete graph, degree ``n - 1``). Guarantees are deterministic.
``secaggplus``
    Bell et al. (CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
    Overhead", §3-4): each client shares only with ``k = O(log n)`` neighbours of a
    random ``k``-regular Harary graph ``H_{k,n}`` (each node joined to the ``k/2``
    nearest nodes on each side of a ring) laid over a uniformly random permutation of
    the clients. Guarantees hold except with probability ``2**-security_bits``
    (security) and ``2**-correctness_bits`` (correctness), over the graph's randomness.

Who holds shares: a node ``u``'s secrets are shared among its *holders*
``H(u) = N(u) ∪ {u}`` (``k + 1`` nodes); ``t`` shares reconstruct a secret.

Parameter derivation (:func:`derive_params`), with ``D = floor(dropout_tolerance*n)``
clients that may drop at any point of the round and
``C = max(floor(corrupt_fraction*n), min_corrupt)`` clients colluding with the server
(``min_corrupt`` defaults to :data:`MIN_CORRUPT_CLIENTS` = 1: ``floor(0.1 * n)`` is 0
below 10 clients, and thresholds that assume no colluder at all let a single sybil
next to the server's split view reveal an input), both fixed independently of the graph:

* correctness: every node that needs reconstruction keeps ``>= t`` surviving holders.
  Complete graph: ``t <= n - D``. Sparse: the number ``X`` of dropped neighbours of a
  node is hypergeometric (``n - 1`` others, ``D`` dropped, ``k`` drawn: a node's
  neighbour set in a Harary graph on a random permutation is a uniform ``k``-subset),
  and ``n * P[X > k - t] <= 2**-correctness_bits`` (union bound over nodes);
* security, corrupt holders: the adversary's own shares never reach ``t``.
  Complete: ``t > C``. Sparse: ``Y`` corrupt neighbours, hypergeometric over the
  ``n - D - 1`` others left after the worst stage-1 dropout (conservative); the
  split-view condition below (``2t > k + 1 + Y``) implies ``t > Y``;
* security, split view with colluders: a server that tells some honest holders of a
  node ``u`` "u survived" (they return b_u shares) and the others "u dropped" (they
  return s_sk_u shares) gets ``t`` shares of *both* secrets, hence u's input, iff the
  holders suffice for both piles. Of u's ``k + 1`` holders, ``Y`` are corrupt and give
  a share to *both* piles; each honest holder gives to one pile only. Both piles reach
  ``t`` iff ``2(t - Y) <= k + 1 - Y``, i.e. ``2t <= k + 1 + Y``. So the condition is
  ``2t > k + 1 + Y`` for the corrupt neighbours ``Y`` of every node (``2t > k + 1``
  alone is the case ``Y = 0``, and it gave ``2t - k = 2`` at every sparse size, so two
  colluding neighbours sufficed). Complete graph: ``Y <= C``, so ``2t > n + C``
  deterministically. Sparse: ``n * P[Y >= 2t - k - 1] <= 2**-(security_bits + 1)``,
  ``Y`` hypergeometric as below; this implies ``t > Y`` (corrupt shares alone) too;
* security, connectivity (sparse only; Bell et al. §3): the honest survivors'
  subgraph must stay connected, otherwise the server learns partial sums of its
  components. Removing bad (dropped or corrupt, ``D + C``) nodes disconnects a Harary
  graph only through two disjoint runs of ``k/2`` consecutive bad nodes on the ring;
  a union bound over the ``n(n - k - 1)/2`` run pairs gives
  ``n(n-k-1)/2 * C(D+C, k)/C(n, k) <= 2**-(security_bits + 1)``;
* the round is abandoned below ``min_survivors = n - D`` and needs
  ``n - D - C >= 2`` so a sum always mixes at least two honest inputs.

The search takes the smallest even ``k`` for which some ``t`` satisfies all of the
above and, among those, the largest ``t`` (the most security margin at the promised
dropout tolerance). The same construction and bounds are used by Google's
``fcp/secagg`` parameter finder for Bell et al.; we keep its 40/20-bit defaults. If
no ``k < n - 1`` qualifies (small cohorts), ``secaggplus`` falls back to the
complete graph and its deterministic conditions. No valid ``(k, t)`` raises
:class:`SecAggConfigError` naming the parameters and the fix.

Server models (:class:`ServerModel`, ``secagg.server_model``). The split-view
conditions above are the ``malicious`` derivation. ``honest_but_curious`` assumes a
server that follows the protocol (it never tells holders different stories about who
dropped), so only the colluders' own shares matter: ``t > Y`` (sparse:
``n * P[Y >= t] <= 2**-(security_bits + 1)``; complete: ``t > C``) plus ``2t > k + 1``,
the semi-honest parameters of Bell et al. (2020), which give a smaller degree (at
``n = 100``, 20 % dropouts, 10 % colluders: ``k = 38, t = 20`` instead of ``k = 52,
t = 32``). The client re-derives ``(k, t)`` for the model the server names and its site
policy decides which models it accepts (:mod:`fl_app.client.policy`).

Trust assumptions: the graph is drawn honestly from a CSPRNG seed; dropouts and
corruptions do not depend on the graph. Under ``honest_but_curious`` a server that
lies about who dropped is out of scope beyond the clients' local checks; under
``malicious`` the thresholds survive a split view with up to the assumed colluders and
the protocol adds signed keys and the consistency-check round
(:mod:`fl_app.secagg.protocol`). A malicious server draws the sparse graph itself and
no client can check it, so the sparse malicious derivation holds only for an honestly
drawn graph: the app runs the malicious model on the complete graph alone (clients
refuse any other neighbourhood, :mod:`fl_app.secagg.client`; ``secaggplus`` with
``malicious`` is a config error), where the conditions are deterministic, and a client
unmasks only after :func:`consistency_quorum` signatures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np

from fl_app.secagg.crypto import check_node_id

__all__ = [
    "DEFAULT_CORRECTNESS_BITS",
    "DEFAULT_SECURITY_BITS",
    "GRAPH_SEED_BYTES",
    "MIN_CORRUPT_CLIENTS",
    "GraphMode",
    "SecAggConfigError",
    "SecAggParams",
    "ServerModel",
    "build_graph",
    "consistency_quorum",
    "custom_params",
    "derive_params",
    "federation_min_corrupt",
]

DEFAULT_SECURITY_BITS = 40
DEFAULT_CORRECTNESS_BITS = 20
GRAPH_SEED_BYTES = 32
#: Colluding clients assumed at least, whatever ``corrupt_fraction * n`` rounds down to.
MIN_CORRUPT_CLIENTS = 1
_EPS = 1e-12  # keeps floor(fraction * n) from losing one to float rounding


class SecAggConfigError(ValueError):
    """No secure and correct (degree, threshold) exists for the requested setting."""


class GraphMode(str, Enum):
    """Neighbour graph: complete (Bonawitz et al.) or sparse Harary (Bell et al.)."""

    secagg = "secagg"
    secaggplus = "secaggplus"


class ServerModel(str, Enum):
    """What the thresholds assume of the server (``secagg.server_model``).

    ``honest_but_curious``: the server follows the protocol and only tries to learn from
    what it legitimately receives (Bonawitz et al. 2017 §6.1; Bell et al. 2020's
    semi-honest parameters): corrupt holders alone never reach ``t`` (``t > Y``) and
    ``2t > k + 1``. ``malicious``: the server may deviate (split views of who dropped,
    substituted keys): ``2t > k + 1 + Y`` (module docstring), with signed keys and the
    consistency-check round in the protocol.
    """

    honest_but_curious = "honest_but_curious"
    malicious = "malicious"


@dataclass(frozen=True)
class SecAggParams:
    """Derived secure-aggregation parameters; build with :func:`derive_params`.

    Attributes
    ----------
    mode
        :class:`GraphMode`.
    num_clients
        ``n``: cohort size the parameters were derived for.
    degree
        ``k``: neighbours per node (``n - 1`` for the complete graph).
    threshold
        ``t``: shares needed out of a node's ``k + 1`` holders (itself included).
    max_dropouts, max_corrupt
        ``D`` and ``C``: clients that may drop / collude with the server.
    min_survivors
        ``n - D``: below this many clients at any stage the round is abandoned.
    dropout_tolerance, corrupt_fraction, security_bits, correctness_bits
        The inputs of the derivation.
    log2_security_failure, log2_correctness_failure
        Upper bounds (log2) on the failure probabilities; ``-inf`` when deterministic.
    explanation
        Human-readable derivation.
    """

    mode: GraphMode
    num_clients: int
    degree: int
    threshold: int
    max_dropouts: int
    max_corrupt: int
    min_survivors: int
    dropout_tolerance: float
    corrupt_fraction: float
    security_bits: int
    correctness_bits: int
    log2_security_failure: float
    log2_correctness_failure: float
    explanation: str
    server_model: ServerModel = ServerModel.malicious

    @property
    def holders(self) -> int:
        """Share holders per node: ``degree + 1``."""
        return self.degree + 1

    @property
    def is_complete(self) -> bool:
        """True when every node neighbours every other node."""
        return self.degree >= self.num_clients - 1

    def to_config(self) -> dict[str, int | float | str]:
        """Scalars for a Flower ConfigRecord (``explanation`` included for logs)."""
        out: dict[str, int | float | str] = {}
        for key, value in asdict(self).items():
            out[key] = value.value if isinstance(value, Enum) else value
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> SecAggParams:
        """Rebuild from :meth:`to_config`, re-deriving to check nothing was altered.

        Raises :class:`SecAggConfigError` if the received values differ from what the
        derivation (or, for custom parameters, the deterministic checks) produces.
        """
        try:
            mode = GraphMode(str(config["mode"]))
            n = int(config["num_clients"])  # type: ignore[call-overload]
            k = int(config["degree"])  # type: ignore[call-overload]
            t = int(config["threshold"])  # type: ignore[call-overload]
            d = int(config["max_dropouts"])  # type: ignore[call-overload]
            c = int(config["max_corrupt"])  # type: ignore[call-overload]
            drop = float(config["dropout_tolerance"])  # type: ignore[arg-type]
            corrupt = float(config["corrupt_fraction"])  # type: ignore[arg-type]
            sec = int(config["security_bits"])  # type: ignore[call-overload]
            cor = int(config["correctness_bits"])  # type: ignore[call-overload]
            # No default: a client re-derives the thresholds for the model it was told.
            model = ServerModel(str(config["server_model"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggConfigError(f"malformed secagg params config: {exc!r}") from exc
        if sec == 0 and cor == 0:
            params = custom_params(
                n, k, t, max_dropouts=d, max_corrupt=c, mode=mode, server_model=model
            )
        else:
            # The server may assume more colluders than the fraction gives, never fewer:
            # re-deriving with min_corrupt=c yields C=c only when c >= floor(corrupt*n).
            params = derive_params(
                n,
                mode=mode,
                dropout_tolerance=drop,
                corrupt_fraction=corrupt,
                security_bits=sec,
                correctness_bits=cor,
                min_corrupt=c,
                server_model=model,
            )
        if (params.degree, params.threshold, params.max_dropouts, params.max_corrupt) != (
            k,
            t,
            d,
            c,
        ):
            raise SecAggConfigError(
                f"received secagg params (k={k}, t={t}, D={d}, C={c}) differ from the "
                f"derivation (k={params.degree}, t={params.threshold}, "
                f"D={params.max_dropouts}, C={params.max_corrupt})"
            )
        return params


def federation_min_corrupt(corrupt_fraction: float, federation_size: int) -> int:
    """Colluders assumed over a federation of ``federation_size`` sites under the
    malicious server model: ``max(floor(corrupt_fraction * N), MIN_CORRUPT_CLIENTS)``.

    A site's own check at share-keys counts the same bound (fraction of the roster, not
    of the cohort the server picked); passed as ``min_corrupt`` to :func:`derive_params`
    it makes the server's thresholds satisfy it. ``federation_size=0``: unknown, the
    cohort's fraction then (only ``MIN_CORRUPT_CLIENTS`` here).
    """
    corrupt = _check_fraction("corrupt_fraction", corrupt_fraction)
    size = _check_int("federation_size", federation_size, 0)
    return max(math.floor(corrupt * size + _EPS), MIN_CORRUPT_CLIENTS)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SecAggConfigError(f"{name} must be a float in [0, 1), got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise SecAggConfigError(f"{name} must be in [0, 1), got {v}")
    return v


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SecAggConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


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


def _complete(
    mode: GraphMode,
    n: int,
    d: int,
    c: int,
    drop: float,
    corrupt: float,
    sec: int,
    cor: int,
    reason: str,
    model: ServerModel,
) -> SecAggParams:
    t_max = n - d
    if model is ServerModel.malicious:
        # Split view with C colluders among a node's n holders: 2t > n + C (module docstring).
        t_min = (n + c) // 2 + 1
        need = f"2t > n + C (a split view plus C colluders), i.e. t >= {t_min}"
        fix = "(n > 2D + C)"
        why = (
            f"2t>n+C={n + c} so neither the corrupt clients nor a split view of the honest "
            f"holders plus the C colluders can yield both secrets of a node"
        )
    else:
        # Semi-honest server: the C colluders alone stay below t, and 2t > n.
        t_min = max(c + 1, n // 2 + 1)
        need = f"t > C and 2t > n, i.e. t >= {t_min}"
        fix = "(roughly D + max(C, n/2) < n)"
        why = (
            f"t>C={c} and 2t>{n} so neither the corrupt clients nor two disjoint honest "
            "sets can yield both secrets of a node (server following the protocol)"
        )
    if t_min > t_max:
        raise SecAggConfigError(
            f"no threshold for the complete graph with num_clients={n}, "
            f"dropout_tolerance={drop} (D={d}) and corrupt_fraction={corrupt} (C={c}): "
            f"correctness needs t <= n - D = {t_max}, security ({model.value} server) "
            f"needs {need}; lower dropout_tolerance or corrupt_fraction {fix}"
        )
    explanation = (
        f"{reason}complete graph over n={n} clients (degree {n - 1}); D=floor({drop}*{n})={d} "
        f"may drop, C={c} (floor({corrupt}*{n}) or the assumed minimum) may collude with "
        "the server. "
        f"t={t_max}=n-D so any {t_max} survivors reconstruct (correctness, deterministic); "
        f"{why} (security, deterministic). "
        f"Rounds with fewer than {n - d} survivors are abandoned."
    )
    return SecAggParams(
        mode=mode,
        num_clients=n,
        degree=n - 1,
        threshold=t_max,
        max_dropouts=d,
        max_corrupt=c,
        min_survivors=n - d,
        dropout_tolerance=drop,
        corrupt_fraction=corrupt,
        security_bits=sec,
        correctness_bits=cor,
        log2_security_failure=-math.inf,
        log2_correctness_failure=-math.inf,
        explanation=explanation,
        server_model=model,
    )


def derive_params(
    num_clients: int,
    *,
    mode: GraphMode | str = GraphMode.secaggplus,
    dropout_tolerance: float = 0.1,
    corrupt_fraction: float = 0.1,
    security_bits: int = DEFAULT_SECURITY_BITS,
    correctness_bits: int = DEFAULT_CORRECTNESS_BITS,
    min_corrupt: int = MIN_CORRUPT_CLIENTS,
    server_model: ServerModel | str = ServerModel.malicious,
) -> SecAggParams:
    """Derive degree ``k`` and threshold ``t`` for a cohort (see the module docstring).

    Parameters
    ----------
    num_clients
        ``n``: the cohort size (clients asked to take part in the round), >= 3.
    mode
        ``"secagg"`` (complete graph) or ``"secaggplus"`` (sparse Harary graph).
    dropout_tolerance
        Fraction of the cohort that may drop at any stage(s) of a round.
    corrupt_fraction
        Fraction of the cohort that may collude with the server.
    security_bits, correctness_bits
        Sparse mode only: failure probabilities ``2**-bits`` of security and
        correctness over the random graph.
    min_corrupt
        Colluders assumed at least: ``C = max(floor(corrupt_fraction * n), min_corrupt)``.
    server_model
        :class:`ServerModel`. ``malicious`` (the default of this function, the stronger
        assumption) bounds a split view plus colluders: ``2t > k + 1 + Y``.
        ``honest_but_curious`` uses the semi-honest conditions ``t > Y`` and
        ``2t > k + 1`` (Bell et al. 2020's semi-honest parameters), a smaller degree.

    Raises
    ------
    SecAggConfigError
        No valid ``(k, t)`` exists; the message names the values and the fix.
    """
    n = _check_int("num_clients", num_clients, 3)
    try:
        graph_mode = GraphMode(mode)
    except ValueError as exc:
        raise SecAggConfigError(
            f"mode must be one of {[m.value for m in GraphMode]}, got {mode!r}"
        ) from exc
    model = _server_model(server_model)
    drop = _check_fraction("dropout_tolerance", dropout_tolerance)
    corrupt = _check_fraction("corrupt_fraction", corrupt_fraction)
    sec = _check_int("security_bits", security_bits, 1)
    cor = _check_int("correctness_bits", correctness_bits, 1)
    d = math.floor(drop * n + _EPS)
    c = max(math.floor(corrupt * n + _EPS), _check_int("min_corrupt", min_corrupt, 0))
    if n - d - c < 2:
        raise SecAggConfigError(
            f"num_clients={n} with D={d} dropouts and C={c} corrupt clients leaves "
            f"{n - d - c} honest survivor(s); a sum must mix at least 2 honest inputs. "
            "Lower dropout_tolerance or corrupt_fraction, or enlarge the cohort"
        )
    if graph_mode is GraphMode.secagg:
        return _complete(graph_mode, n, d, c, drop, corrupt, sec, cor, "", model)

    lf = _LogFactorials(n)
    log2_n = math.log2(n)
    bad = d + c
    for k in range(2, n - 1, 2):
        # Connectivity of the honest survivors (two disjoint runs of k/2 bad nodes).
        if k > bad:
            log2_disconnect = -math.inf
        else:
            log2_disconnect = (
                log2_n
                + math.log2(max(n - k - 1, 1))
                - 1
                + float(lf.log_comb(bad, k) - lf.log_comb(n, k)) / math.log(2)
            )
        if log2_disconnect > -(sec + 1):
            continue
        # Largest t with n * P[dropped neighbours > k - t] <= 2**-cor.
        t_cor = 0
        log2_cor = math.inf
        for t in range(k + 1, 0, -1):
            tail = log2_n + lf.log2_sf(n - 1, d, k, k - t + 1)
            if tail <= -cor:
                t_cor, log2_cor = t, tail
                break
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
        explanation = (
            f"Harary graph H(k={k}, n={n}) on a random permutation (Bell et al. 2020); "
            f"D=floor({drop}*{n})={d} dropouts, C={c} (floor({corrupt}*{n}) or the assumed "
            "minimum) corrupt. "
            f"k is the smallest even degree with: P[honest survivors disconnected] "
            f"<= 2^{log2_disconnect:.1f}; t={t_cor} is the largest threshold with "
            f"P[some node keeps < t surviving holders] <= 2^{log2_cor:.1f} "
            f"(target 2^-{cor}); P[some node has >= {at_least} corrupt neighbours "
            f"({_CORRUPT_WHY[model]})] <= "
            f"2^{log2_corrupt:.1f}. Total security failure <= 2^{log2_sec:.1f} "
            f"(target 2^-{sec}). Rounds with fewer than {n - d} survivors are abandoned."
        )
        return SecAggParams(
            mode=graph_mode,
            num_clients=n,
            degree=k,
            threshold=t_cor,
            max_dropouts=d,
            max_corrupt=c,
            min_survivors=n - d,
            dropout_tolerance=drop,
            corrupt_fraction=corrupt,
            security_bits=sec,
            correctness_bits=cor,
            log2_security_failure=log2_sec,
            log2_correctness_failure=log2_cor,
            explanation=explanation,
            server_model=model,
        )
    reason = f"no sparse degree k < n-1={n - 1} meets 2^-{sec}/2^-{cor} for n={n}; "
    return _complete(graph_mode, n, d, c, drop, corrupt, sec, cor, reason, model)


_CORRUPT_WHY = {
    ServerModel.malicious: "2t-k-1: a split view plus them reveals its input",
    ServerModel.honest_but_curious: "t: their shares alone rebuild its secrets; 2t > k+1",
}


def _server_model(value: object) -> ServerModel:
    try:
        return ServerModel(value)
    except ValueError as exc:
        raise SecAggConfigError(
            f"server_model must be one of {[m.value for m in ServerModel]}, got {value!r}"
        ) from exc


def custom_params(
    num_clients: int,
    degree: int,
    threshold: int,
    *,
    max_dropouts: int,
    max_corrupt: int = 0,
    mode: GraphMode | str = GraphMode.secaggplus,
    server_model: ServerModel | str = ServerModel.malicious,
) -> SecAggParams:
    """Hand-picked ``(k, t)``, checked only against the deterministic conditions.

    For experiments and tests with small cohorts: no probabilistic guarantee is
    claimed (``security_bits = correctness_bits = 0``). Checks: ``k`` even or
    ``n - 1``; ``2t > k + 1 + min(max_corrupt, k)`` for a ``malicious`` server (a split
    view plus every colluder among a node's holders, module docstring), ``2t > k + 1``
    for an ``honest_but_curious`` one, and ``t <= k + 1``; ``t > max_corrupt``;
    ``n - max_dropouts - max_corrupt >= 2``; complete graph: ``t <= n - max_dropouts``.
    """
    n = _check_int("num_clients", num_clients, 3)
    graph_mode = GraphMode(mode)
    k = _check_int("degree", degree, 2)
    t = _check_int("threshold", threshold, 2)
    d = _check_int("max_dropouts", max_dropouts, 0)
    c = _check_int("max_corrupt", max_corrupt, 0)
    model = _server_model(server_model)
    if k > n - 1 or (k % 2 and k != n - 1) or (graph_mode is GraphMode.secagg and k != n - 1):
        raise SecAggConfigError(
            f"degree={k} invalid for num_clients={n} in mode {graph_mode.value}: use an even "
            f"degree below {n - 1} (Harary graph) or {n - 1} (complete graph)"
        )
    # 2t > k + 1 + Y exactly, Y = min(C, k) corrupt holders that answer both piles of a
    # split view (for odd k, k//2 + 1 would admit 2t = k + 1 even with Y = 0); a server
    # following the protocol shows no split view: 2t > k + 1 (Y = 0 here, t > C below).
    y = min(c, k) if model is ServerModel.malicious else 0
    t_min = (k + 1 + y) // 2 + 1
    if not t_min <= t <= k + 1:
        rule = (
            "2t > degree+1+min(max_corrupt, degree)"
            if model is ServerModel.malicious
            else "2t > degree+1"
        )
        raise SecAggConfigError(
            f"threshold={t} must satisfy {rule} ({model.value} server) and "
            f"t <= degree+1, i.e. {t_min} <= t <= {k + 1}"
        )
    if t <= c:
        raise SecAggConfigError(f"threshold={t} must exceed max_corrupt={c}")
    if n - d - c < 2:
        raise SecAggConfigError(
            f"max_dropouts={d} and max_corrupt={c} leave fewer than 2 honest survivors of {n}"
        )
    if k == n - 1 and t > n - d:
        raise SecAggConfigError(
            f"threshold={t} > num_clients - max_dropouts = {n - d}: the round could not "
            "survive the dropouts it promises to tolerate"
        )
    return SecAggParams(
        mode=graph_mode,
        num_clients=n,
        degree=k,
        threshold=t,
        max_dropouts=d,
        max_corrupt=c,
        min_survivors=n - d,
        dropout_tolerance=d / n,
        corrupt_fraction=c / n,
        security_bits=0,
        correctness_bits=0,
        log2_security_failure=0.0,
        log2_correctness_failure=0.0,
        explanation=(
            f"custom parameters: n={n}, k={k}, t={t}, D={d}, C={c}; only deterministic "
            f"checks ({model.value} server), no probabilistic guarantee"
        ),
        server_model=model,
    )


def consistency_quorum(params: SecAggParams, corrupt: int | None = None) -> int:
    """Consistency signatures a client needs before it unmasks (malicious server model).

    ``max(t, floor((n + C) / 2) + 1)`` distinct roster identities of the ``n``-member
    cohort on one survivor set ``U3``: two sets that each gathered more than
    ``(n + C) / 2`` signers share more than ``C`` of them, so at least one honest client
    would have signed both, which it never does (one set per round). Hence at most one
    ``U3`` per round can be unmasked, whatever the server tells whom. ``corrupt``: the
    colluders the client assumes (its own policy's bound when larger than ``params``').
    """
    c = max(params.max_corrupt, corrupt or 0)
    return max(params.threshold, (params.num_clients + c) // 2 + 1)


def build_graph(
    node_ids: Iterable[int], degree: int, seed: bytes | None = None
) -> dict[int, tuple[int, ...]]:
    """Neighbour lists of a Harary graph ``H_{degree, m}`` on a random permutation.

    Parameters
    ----------
    node_ids
        The ``m`` distinct participating nodes (order irrelevant: they are sorted
        before the permutation, so the graph depends only on the set and the seed).
    degree
        ``k``; even, or ``>= m - 1`` for the complete graph.
    seed
        32 bytes; ``os.urandom`` when omitted. The graph is public (every client learns
        its neighbours), so a seeded PCG64 permutation suffices; the seed must merely
        be unpredictable before dropouts/corruptions are fixed.

    Returns
    -------
    dict
        ``node -> sorted tuple of neighbours`` (never containing the node itself).
    """
    ids = sorted({check_node_id("node_ids[i]", x) for x in node_ids})
    m = len(ids)
    k = _check_int("degree", degree, 1)
    if k >= m - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    if k % 2:
        raise SecAggConfigError(f"degree={k} must be even for a Harary graph on {m} nodes")
    if seed is None:
        seed = os.urandom(GRAPH_SEED_BYTES)
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != GRAPH_SEED_BYTES:
        raise SecAggConfigError(f"seed must be {GRAPH_SEED_BYTES} bytes")
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    order = [ids[i] for i in rng.permutation(m)]
    half = k // 2
    graph: dict[int, tuple[int, ...]] = {}
    for pos, u in enumerate(order):
        neighbours = {order[(pos + j) % m] for j in range(-half, half + 1) if j}
        graph[u] = tuple(sorted(neighbours))
    return graph
