"""Secure aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) without messaging.

Pure building blocks a Flower driver wires onto messages; nothing here imports torch
or flwr, so key-exchange stages stay cheap in a fresh ClientApp process.

* :mod:`~fl_app.secagg.shamir`: Shamir sharing of 32-byte secrets over GF(2**521 - 1);
* :mod:`~fl_app.secagg.crypto`: X25519, HKDF-SHA256, ChaCha20-Poly1305, AES-128-CTR mask PRG;
* :mod:`~fl_app.secagg.encoding`: fixed-point codec into Z_{2**bits} that cannot wrap;
* :mod:`~fl_app.secagg.graph`: complete / Harary neighbour graphs and derived (k, t);
* :mod:`~fl_app.secagg.protocol`: :class:`ClientSession` and :class:`ServerSession`.
"""

from fl_app.secagg.encoding import FixedPointCodec, FixedPointConfigError
from fl_app.secagg.graph import (
    GraphMode,
    SecAggConfigError,
    SecAggParams,
    build_graph,
    custom_params,
    derive_params,
)
from fl_app.secagg.protocol import (
    AggregateResult,
    ClientRefusal,
    ClientSession,
    PublicKeys,
    Rejection,
    RoundAbandoned,
    ServerSession,
    Stage,
    StageOrderError,
    UnmaskReply,
    UnmaskRequest,
    round_context,
)

__all__ = [
    "AggregateResult",
    "ClientRefusal",
    "ClientSession",
    "FixedPointCodec",
    "FixedPointConfigError",
    "GraphMode",
    "PublicKeys",
    "Rejection",
    "RoundAbandoned",
    "SecAggConfigError",
    "SecAggParams",
    "ServerSession",
    "Stage",
    "StageOrderError",
    "UnmaskReply",
    "UnmaskRequest",
    "build_graph",
    "custom_params",
    "derive_params",
    "round_context",
]
