"""DP-FTRL's tree aggregation: noisy prefix sums of clipped update sums, and what
each round releases about one client.

Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML (DP-FTRL). Instead of noising each
round's sum (DP-FedAvg, whose ε relies on amplification by the secret sample), the
server releases noisy *prefix sums* ``P̃_t ≈ Σ_{r≤t} s_r`` of the rounds' sums of
clipped updates ``s_r``, and the model is ``θ_t = θ_0 + P̃_t / m`` (FTRL with the
expected cohort ``m``; updates point downhill, so ``+``). The online tree algorithm
(a binary counter, Dwork et al. 2010; Chan, Shi & Song 2011) keeps one noisy node
per set bit of ``t``: round ``t`` completes the dyadic node ``[t − 2^l + 1, t]`` with
``l`` the number of trailing zero bits of ``t``; that node's sum gets one draw of
``N(0, σ²)``, ``σ = z·C``, and ``P̃_t`` is the sum of the noisy nodes of ``t``'s
binary decomposition. So ``P̃_t − P_t`` is the sum of at most ``⌈log2(t+1)⌉`` node
noises, never ``t`` of them. Restarts (``privacy.ftrl.restart_every = k``) start a
fresh tree every ``k`` rounds from the current model (``θ_0`` becomes that model).

What one client can change (add/remove-one-client, the same relation as DP-FedAvg's).
Round ``t`` releases only its new node, a Gaussian mechanism on that node's sum, so the
run is an adaptive composition of Gaussian mechanisms, one per released node:
``ρ = Σ_nodes s_n² / (2σ²)`` in RDP (and exactly that composition under PLD).

* **Arbitrary participation** (what a run accounts): nothing is assumed about who is
  in which cohort. The node of level ``l`` sums ``2^l`` rounds, so one client can
  move it by ``2^l·C``: round ``t`` is ``GaussianDpEvent(z / 2^l)``. Over a tree of
  ``k = 2^L`` rounds, ``Σ_t 4^{l(t)} = 2^{L−1}(2^L − 1) + 4^L``
  (:func:`tree_sensitivity_sq`). No sampling amplification anywhere: the ε holds even
  against the party that chooses the cohorts (the server).
* **At most once per tree** (the paper's Theorem/Appendix D; dp-accounting's
  ``SingleEpochTreeAggregationDpEvent``): a client's one round lies in at most one
  released node per level, ``h = ⌈log2(k+1)⌉`` nodes, so the tree's sensitivity² is
  ``h·C²``. A run uses it only with ``privacy.ftrl.participation=once_per_tree``,
  where the server enforces the cap by cohort selection (``strategies/ftrl_cap.py``).
  Its per-round ledger events must bound the loss after *every* round, not only at the
  tree's end: after ``t`` rounds of a tree, the most released nodes one client's round
  lies in is the number of levels with a completed node, ``⌊log2 t⌋ + 1``, which grows
  by one exactly when ``t`` is a power of two. So round ``t`` is
  ``GaussianDpEvent(z)`` when ``t = 2^j`` and a no-op otherwise; a tree of ``r``
  rounds composes to ``⌈log2(r+1)⌉`` Gaussians of ``z``, dp-accounting's
  ``SingleEpochTreeAggregationDpEvent(z, r)`` (a client can be in every tree: trees
  compose).

Noise randomness: each node's draw comes from the source the caller passes (the
server's CSPRNG keystream under ``privacy.secure_mode``, docs/architecture.md, Rules),
drawn once, when the node completes, and kept in memory for the prefix sums that use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from fl_app.privacy.round_event import RoundEvent, SamplingScheme

__all__ = [
    "PARTICIPATION",
    "TreeAggregator",
    "ftrl_round_event",
    "node_level",
    "tree_height",
    "tree_position",
    "tree_sensitivity_sq",
]

PARTICIPATION = ("arbitrary", "once")

NormalSource = Callable[[float, int], np.ndarray]


def node_level(position: int) -> int:
    """``l``: trailing zero bits of ``position`` (the level of the node it completes)."""
    if isinstance(position, bool) or not isinstance(position, int) or position < 1:
        raise ValueError(f"tree position must be an int >= 1, found {position!r}")
    return (position & -position).bit_length() - 1


def tree_height(rounds: int) -> int:
    """``h = ⌈log2(k+1)⌉``: the most released nodes one round of a ``k``-round tree
    lies in (Kairouz et al. 2021, Appendix D)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"tree rounds must be an int >= 1, found {rounds!r}")
    return math.ceil(math.log2(rounds + 1))


def tree_position(rnd: int, restart_every: int) -> int:
    """Position of server round ``rnd`` (1-based) in its tree when trees restart every
    ``restart_every`` rounds (the plan's positions; a resumed run starts a new tree)."""
    return (rnd - 1) % restart_every + 1


def tree_sensitivity_sq(rounds: int, participation: str) -> int:
    """One client's L2 sensitivity², in units of ``C²``, over the released nodes of a
    ``rounds``-round tree: ``Σ_t 4^{l(t)}`` (arbitrary) or ``h`` (at most once per tree)."""
    if participation == "once":
        return tree_height(rounds)
    if participation != "arbitrary":
        raise ValueError(f"participation must be one of {PARTICIPATION}, found {participation!r}")
    tree_height(rounds)  # validates rounds
    return sum(4 ** node_level(t) for t in range(1, rounds + 1))


def ftrl_round_event(
    base: RoundEvent, position: int, population: int, participation: str = "arbitrary"
) -> RoundEvent:
    """Round ``position`` of a tree as the ledger's event.

    ``base`` carries the node noise multiplier ``z`` (as ``update_noise_multiplier``: the
    node's noise std is ``z·C``), ``C`` and the divisor. Arbitrary participation: the
    released node's Gaussian mechanism at rate 1 (no amplification), effective ``z / 2^l``
    with respect to sensitivity ``C``, ``mechanism="tree"``. Once per tree:
    ``mechanism="tree_once"`` at the node's ``z`` with ``tree_position``, which the
    accountant counts only at powers of two (module doc).
    """
    z = base.update_noise_multiplier
    level = node_level(position)  # validates position
    if participation not in PARTICIPATION:
        raise ValueError(f"participation must be one of {PARTICIPATION}, found {participation!r}")
    once = participation == "once"
    return replace(
        base,
        sampling=SamplingScheme.poisson,
        population=population,
        sample_rate=1.0,
        noise_multiplier=z if once else z / 2**level,
        mechanism="tree_once" if once else "tree",
        branch_delta=0.0,
        tree_position=position if once else None,
    )


@dataclass
class _Node:
    level: int
    true: dict[str, np.ndarray]
    noise: dict[str, np.ndarray]


@dataclass
class TreeAggregator:
    """The online tree of one restart period: add each round's sum, get ``P̃_t``.

    ``noise_std`` is ``σ = z·C`` per node. :meth:`add` draws exactly one node's noise
    (``normal(σ, size)`` per array, in the arrays' order) and returns the noisy prefix
    sum; :attr:`rounds` is how many leaves the tree has.
    """

    noise_std: float
    rounds: int = 0
    _stack: list[_Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_std) and self.noise_std > 0):
            raise ValueError(f"noise_std must be finite and > 0, found {self.noise_std!r}")

    def add(self, leaf: Mapping[str, np.ndarray], normal: NormalSource) -> dict[str, np.ndarray]:
        """Append round ``t = rounds + 1``'s sum; returns ``P̃_t`` (float64 arrays)."""
        true = {k: np.array(v, dtype=np.float64) for k, v in leaf.items()}
        level = 0
        # Merge the completed lower nodes into the new one (their noises are dropped:
        # no later prefix sum uses them, and they were released only inside P̃_{t-1}).
        while self._stack and self._stack[-1].level == level:
            lower = self._stack.pop()
            true = {k: true[k] + lower.true[k] for k in true}
            level += 1
        noise = {
            k: normal(self.noise_std, v.size).reshape(v.shape).astype(np.float64)
            for k, v in true.items()
        }
        self._stack.append(_Node(level, true, noise))
        self.rounds += 1
        return self.prefix()

    def prefix(self) -> dict[str, np.ndarray]:
        """``P̃_t``: the sum of the noisy nodes of ``t``'s binary decomposition."""
        if not self._stack:
            raise ValueError("an empty tree has no prefix sum")
        out = {k: np.zeros_like(v) for k, v in self._stack[0].true.items()}
        for node in self._stack:
            for k in out:
                out[k] += node.true[k] + node.noise[k]
        return out
