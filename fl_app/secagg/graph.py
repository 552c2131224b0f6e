"""Neighbour graphs for secure aggregation: the complete graph (Bonawitz et al., CCS
2017) or a ``k``-regular Harary graph on a random permutation (Bell et al., CCS 2020).

The degree ``k`` comes from :func:`fl_app.secagg.derive.derive_params`, whose docstring
states why a uniformly permuted Harary graph gives each node a uniform ``k``-subset of
neighbours (the hypergeometric bounds rest on it). Trust assumption: the graph is drawn
honestly from an unpredictable seed; docs/architecture.md, Secure aggregation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from fl_app.secagg.crypto import check_node_id
from fl_app.secagg.params import SecAggConfigError, check_int

__all__ = ["GRAPH_SEED_BYTES", "build_graph"]

GRAPH_SEED_BYTES = 32


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
    k = check_int("degree", degree, 1)
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
