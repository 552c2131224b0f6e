"""Secure-aggregation parameters as data: graph mode, server model, the derived degree
and threshold with their bounds (:class:`SecAggParams`), and the consistency quorum.

A leaf: the type that the stages, sessions and drivers pass around, with no derivation
in it. :mod:`fl_app.secagg.derive` builds and checks it (its docstring states how
``(k, t)`` follow from the dropout and collusion bounds under each server model) and
:mod:`fl_app.secagg.graph` draws the neighbour graph; docs/architecture.md, Secure
aggregation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

__all__ = [
    "DEFAULT_CORRECTNESS_BITS",
    "DEFAULT_SECURITY_BITS",
    "MIN_CORRUPT_CLIENTS",
    "GraphMode",
    "SecAggConfigError",
    "SecAggParams",
    "ServerModel",
    "check_fraction",
    "check_int",
    "consistency_quorum",
]

DEFAULT_SECURITY_BITS = 40
DEFAULT_CORRECTNESS_BITS = 20
#: Colluding clients assumed at least, whatever ``corrupt_fraction * n`` rounds down to.
MIN_CORRUPT_CLIENTS = 1


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
    """Derived secure-aggregation parameters.

    Built by :func:`fl_app.secagg.derive.derive_params` (or ``custom_params``) and rebuilt
    from a received :meth:`to_config` by :func:`fl_app.secagg.derive.params_from_config`,
    which re-derives them; this module holds the type alone so that every stage, session
    and driver can name it without the derivation.

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


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in ``[0, 1)``, else :class:`SecAggConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SecAggConfigError(f"{name} must be a float in [0, 1), got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise SecAggConfigError(f"{name} must be in [0, 1), got {v}")
    return v


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int ``>= low`` (never a bool), else :class:`SecAggConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SecAggConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


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
