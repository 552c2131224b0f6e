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
unmasks only after :func:`~fl_app.secagg.params.consistency_quorum` signatures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fl_app.secagg.params import (
    DEFAULT_CORRECTNESS_BITS,
    DEFAULT_SECURITY_BITS,
    MIN_CORRUPT_CLIENTS,
    GraphMode,
    SecAggConfigError,
    SecAggParams,
    ServerModel,
    check_fraction,
    check_int,
)
from fl_app.secagg.sparse import sparse_params, sparse_search

__all__ = ["custom_params", "derive_params", "federation_min_corrupt", "params_from_config"]

_EPS = 1e-12  # keeps floor(fraction * n) from losing one to float rounding


def federation_min_corrupt(corrupt_fraction: float, federation_size: int) -> int:
    """Colluders assumed over a federation of ``federation_size`` sites under the
    malicious server model: ``max(floor(corrupt_fraction * N), MIN_CORRUPT_CLIENTS)``.

    A site's own check at share-keys counts the same bound (fraction of the roster, not
    of the cohort the server picked); passed as ``min_corrupt`` to :func:`derive_params`
    it makes the server's thresholds satisfy it. ``federation_size=0``: unknown, the
    cohort's fraction then (only ``MIN_CORRUPT_CLIENTS`` here).
    """
    corrupt = check_fraction("corrupt_fraction", corrupt_fraction)
    size = check_int("federation_size", federation_size, 0)
    return max(math.floor(corrupt * size + _EPS), MIN_CORRUPT_CLIENTS)


def _complete_bounds(model: ServerModel, n: int, c: int) -> tuple[int, str, str, str]:
    """Smallest threshold on the complete graph for ``model``, with the texts that state
    the condition (``need``), the fix when none fits and why it is secure."""
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
    return t_min, need, fix, why


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
    t_min, need, fix, why = _complete_bounds(model, n, c)
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
    n = check_int("num_clients", num_clients, 3)
    try:
        graph_mode = GraphMode(mode)
    except ValueError as exc:
        raise SecAggConfigError(
            f"mode must be one of {[m.value for m in GraphMode]}, got {mode!r}"
        ) from exc
    model = _server_model(server_model)
    drop = check_fraction("dropout_tolerance", dropout_tolerance)
    corrupt = check_fraction("corrupt_fraction", corrupt_fraction)
    sec = check_int("security_bits", security_bits, 1)
    cor = check_int("correctness_bits", correctness_bits, 1)
    d = math.floor(drop * n + _EPS)
    c = max(math.floor(corrupt * n + _EPS), check_int("min_corrupt", min_corrupt, 0))
    if n - d - c < 2:
        raise SecAggConfigError(
            f"num_clients={n} with D={d} dropouts and C={c} corrupt clients leaves "
            f"{n - d - c} honest survivor(s); a sum must mix at least 2 honest inputs. "
            "Lower dropout_tolerance or corrupt_fraction, or enlarge the cohort"
        )
    if graph_mode is GraphMode.secagg:
        return _complete(graph_mode, n, d, c, drop, corrupt, sec, cor, "", model)

    found = sparse_search(n, d, c, sec, cor, model)
    if found is not None:
        return sparse_params(graph_mode, n, d, c, drop, corrupt, sec, cor, model, found)
    reason = f"no sparse degree k < n-1={n - 1} meets 2^-{sec}/2^-{cor} for n={n}; "
    return _complete(graph_mode, n, d, c, drop, corrupt, sec, cor, reason, model)


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
    n = check_int("num_clients", num_clients, 3)
    graph_mode = GraphMode(mode)
    k = check_int("degree", degree, 2)
    t = check_int("threshold", threshold, 2)
    d = check_int("max_dropouts", max_dropouts, 0)
    c = check_int("max_corrupt", max_corrupt, 0)
    model = _server_model(server_model)
    _check_custom(graph_mode, n, k, t, d, c, model)
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


def _check_custom(
    graph_mode: GraphMode, n: int, k: int, t: int, d: int, c: int, model: ServerModel
) -> None:
    """The deterministic conditions :func:`custom_params` lists, each failure named."""
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


def params_from_config(config: Mapping[str, object]) -> SecAggParams:
    """Rebuild :class:`SecAggParams` from its ``to_config``, re-deriving to check nothing
    was altered (a client never takes a server's thresholds on trust).

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
