"""Secure aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020): its one home.

The core is pure building blocks a Flower driver wires onto messages; nothing in it
imports torch or flwr, so key-exchange stages stay cheap in a fresh ClientApp process.
The client's Flower-facing stage handlers are the :mod:`~fl_app.secagg.client`
sub-package (flwr, no torch); the server's are :mod:`strategies.secagg`. Both speak
:mod:`~fl_app.secagg.wire`.

* :mod:`~fl_app.secagg.shamir`: Shamir sharing of 32-byte secrets over GF(2**521 - 1);
* :mod:`~fl_app.secagg.crypto`: X25519, HKDF-SHA256, ChaCha20-Poly1305, seed commitments;
* :mod:`~fl_app.secagg.masks`: the AES-128-CTR mask PRG and the fused mask accumulator;
* :mod:`~fl_app.secagg.encoding`: fixed-point codec into Z_{2**bits} that cannot wrap;
* :mod:`~fl_app.secagg.params` (the type), :mod:`~fl_app.secagg.derive` (derivation of
  (k, t), sparse bounds in :mod:`~fl_app.secagg.sparse`), :mod:`~fl_app.secagg.graph`
  (complete / Harary neighbour graphs);
* :mod:`~fl_app.secagg.protocol`: the stages, shared types, share encryption;
* :mod:`~fl_app.secagg.client_session`: :class:`ClientSession`, the client's state machine;
* :mod:`~fl_app.secagg.server_session`: :class:`ServerSession`, the server's state machine;
* :mod:`~fl_app.secagg.vector`: what one client's masked vector holds (layout, weight);
* :mod:`~fl_app.secagg.signing`: Ed25519 identities and rosters (malicious server model);
* :mod:`~fl_app.secagg.wire`: message and record keys, bit-packing of ring vectors;
* :mod:`~fl_app.secagg.client`: the ClientApp's stage handlers (Flower-facing).
"""

from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.derive import custom_params, derive_params
from fl_app.secagg.encoding import FixedPointCodec, FixedPointConfigError
from fl_app.secagg.graph import build_graph
from fl_app.secagg.params import GraphMode, SecAggConfigError, SecAggParams
from fl_app.secagg.protocol import (
    AggregateResult,
    ClientRefusal,
    PublicKeys,
    Rejection,
    RoundAbandoned,
    Stage,
    StageOrderError,
    UnmaskReply,
    UnmaskRequest,
    round_context,
)
from fl_app.secagg.server_session import ServerSession

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
