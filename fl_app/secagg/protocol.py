"""The secure-aggregation protocol: its stages, shared types and primitives of both sides.

The two pure state machines live beside it:
:class:`~fl_app.secagg.client_session.ClientSession` and
:class:`~fl_app.secagg.server_session.ServerSession`.

Implements the semi-honest protocol of Bonawitz et al. (CCS 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", §4, Fig. 4 without the
consistency-check round), optionally over the sparse neighbour graph of Bell et al.
(CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", §3).
Nothing here sends messages: every stage takes and returns plain values (ints,
bytes, numpy arrays, small frozen dataclasses) that a Flower driver puts into
ConfigRecord / ArrayRecord values.

Stages (server ``S``, client ``u``; ``N(u)`` its neighbours, ``H(u) = N(u) ∪ {u}``):

1. advertise: ``u`` draws X25519 pairs ``(c_sk, c_pk)`` (share encryption) and
   ``(s_sk, s_pk)`` (pairwise masks) and sends both public keys. ``S`` validates them,
   keeps the set ``U1`` and draws the graph over ``U1``. (The pairs may have been drawn
   and advertised in an earlier round, one fresh pair per round: see
   :meth:`~fl_app.secagg.client_session.ClientSession.advertise` and
   :mod:`fl_app.secagg.client`.)
2. share keys: ``u`` draws the self-mask seed ``b_u`` and Shamir-shares ``b_u`` and
   ``s_sk`` over ``H(u)`` with threshold ``t`` (share point ``node_id + 1``), encrypts
   each neighbour's pair with ChaCha20-Poly1305 under HKDF(X25519(c_sk_u, c_pk_v))
   and associated data (round context, sender, recipient). ``S`` routes the
   ciphertexts between nodes that completed the stage (``U2``).
3. masked input: ``u`` decrypts the shares it received and returns
   ``y_u = x_u + PRG(b_u) + sum_{v in N(u) ∩ U2} ±PRG(s_uv) mod 2**bits`` with
   ``s_uv = HKDF(X25519(s_sk_u, s_pk_v))`` and ``+`` iff ``u < v``. ``S`` sums the
   vectors of the nodes that answered (``U3``).
4. unmask: ``S`` sends ``(U3, U2 \\ U3)``; each ``u in U3`` returns its shares of
   ``b_v`` for survivors and of ``s_sk_v`` for dropouts, never both for one node.
   ``S`` reconstructs, removes ``PRG(b_v)`` of every survivor and the dropouts'
   pairwise masks with their surviving neighbours, and obtains exactly
   ``sum_{u in U3} x_u mod 2**bits``.

Dropouts at any stage leave the exact sum of the survivors as long as at least
``params.min_survivors`` clients remain and every node that needs it keeps ``t``
surviving holders; otherwise :class:`RoundAbandoned` is raised (model unchanged).
Invalid client replies never raise on the server: each becomes a :class:`Rejection`
and the node counts as dropped from that stage on. A client refuses (raises
:class:`ClientRefusal`) on anything inconsistent and never runs a stage twice or out
of order (:class:`StageOrderError`).

Trust assumptions: a server following the protocol (``params.server_model`` says which
thresholds were derived; the malicious model's signed keys and consistency check run in
:mod:`fl_app.secagg.client` and :mod:`strategies.secagg` around these sessions, with
:meth:`~fl_app.secagg.client_session.ClientSession.check_lists` shared by both) and at
most ``params.max_corrupt`` colluding clients (see :mod:`fl_app.secagg.derive`);
authenticated channels between each client and the server (Flower's TLS/node auth);
client secrets live only in the session (and in the state it exports between processes,
which must stay on the client): ``b_u``, ``s_sk_u`` and ``c_sk_u`` are dropped as soon
as the masked input is built, the shares held for neighbours after stage 4 or on
:meth:`~fl_app.secagg.client_session.ClientSession.wipe`. Against faulty holders and a
deviating server: each client commits to ``b_u`` at stage 2
(:func:`~fl_app.secagg.crypto.commit_seed`) and the server checks every rebuilt seed and
key, trying other share subsets when one fails
(:func:`~fl_app.secagg.shamir.reconstruct_verified`); a client checks the stage-4 lists
against its cohort and the neighbours that shared with it, and counts survivors against
its own floor.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from fl_app.secagg import crypto, masks, shamir

__all__ = [
    "CIPHERTEXT_BYTES",
    "PLAINTEXT_BYTES",
    "AggregateResult",
    "ClientRefusal",
    "PublicKeys",
    "Rejection",
    "RoundAbandoned",
    "Stage",
    "StageOrderError",
    "UnmaskReply",
    "UnmaskRequest",
    "context_binds",
    "round_context",
    "spec_binding",
]

_VERSION = 1
PLAINTEXT_BYTES = 1 + 2 * shamir.SHARE_BYTES
CIPHERTEXT_BYTES = PLAINTEXT_BYTES + crypto.AEAD_OVERHEAD
_CONTEXT_LABEL = b"fl-app/secagg/round/v1"
_SPEC_LABEL = b"fl-app/secagg/spec/v1|"
SPEC_BINDING_BYTES = 32


class Stage(IntEnum):
    """Protocol stages (wire numbers).

    ``consistency`` runs between ``masked_input`` and ``unmask``, only under the
    malicious server model (Bonawitz et al.'s consistency check,
    :mod:`fl_app.secagg.signing`); it is numbered 5 so the other stages keep theirs.
    """

    advertise = 1
    share_keys = 2
    masked_input = 3
    unmask = 4
    consistency = 5


class StageOrderError(RuntimeError):
    """A stage was called twice, out of order, after a wipe, or after abandonment."""


class ClientRefusal(Exception):
    """A client refuses a stage; the driver replies with a structured error.

    Attributes
    ----------
    stage, reason
        Which stage and why; the reason never contains secrets.
    """

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(f"stage {stage.name}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    """A client reply the server discarded (the node then counts as dropped)."""

    node: int
    stage: Stage
    reason: str


class RoundAbandoned(Exception):
    """The round cannot finish securely and correctly; keep the model unchanged.

    Attributes
    ----------
    stage, reason
        Where and why it was abandoned.
    rejections
        Every rejection recorded so far.
    """

    def __init__(self, stage: Stage, reason: str, rejections: Iterable[Rejection] = ()) -> None:
        super().__init__(f"secure aggregation abandoned at stage {stage.name}: {reason}")
        self.stage = stage
        self.reason = reason
        self.rejections = tuple(rejections)


@dataclass(frozen=True)
class PublicKeys:
    """Stage-1 message: two raw 32-byte X25519 public keys (validated by the receiver).

    Under the malicious server model also the advertiser's roster ``identity`` and its
    Ed25519 ``signature`` over the pair (:func:`fl_app.secagg.signing.key_advert_message`);
    empty otherwise. The server only carries them; each client verifies them.
    """

    c_pk: bytes
    s_pk: bytes
    identity: str = ""
    signature: bytes = b""


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage-4 request: nodes whose masked input arrived, and those that dropped after stage 2."""

    survivors: tuple[int, ...]
    dropouts: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskReply:
    """Stage-4 reply: serialised shares (``shamir.SHARE_BYTES`` each) by node they belong to."""

    self_mask_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class AggregateResult:
    """Outcome of a completed round: ``total = sum of survivors' encoded inputs mod 2**bits``."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropouts: tuple[int, ...]
    rejections: tuple[Rejection, ...] = field(default=())

    @property
    def num_contributors(self) -> int:
        """Number of inputs in ``total`` (pass to ``FixedPointCodec.decode_sum``)."""
        return len(self.survivors)


def spec_binding(spec: str) -> bytes:
    """SHA-256 of the client spec text a round's clients train under (32 bytes).

    Why it goes into the round context: the spec carries everything the server chooses
    about a client's computation (run key and so the sketch and random-k hashes, clip,
    compression sizes, DP parameters). A server that sent one client its own spec could
    otherwise, e.g., give it its own sketch hashes and read its heavy coordinates out of
    the masked sum (docs/compression.md). Bound into the context, a different spec means
    a different context: that client's ciphertexts fail authentication at the others and
    its pairwise masks cancel with nobody's, so its input stays masked; a client whose
    context does not bind the spec it was sent refuses before training
    (:mod:`fl_app.secagg.client.masked_input`).
    """
    if not isinstance(spec, str):
        raise ValueError(f"spec must be the spec's JSON text, got {type(spec).__name__}")
    return hashlib.sha256(_SPEC_LABEL + spec.encode("utf-8")).digest()


def context_binds(context: bytes, binding: bytes) -> bool:
    """Whether ``context`` (a :func:`round_context`) ends with ``binding`` after its
    random nonce of at least 8 bytes."""
    fixed = len(_CONTEXT_LABEL) + 16
    return (
        len(binding) == SPEC_BINDING_BYTES
        and len(context) >= fixed + 8 + SPEC_BINDING_BYTES
        and context.startswith(_CONTEXT_LABEL)
        and context[-SPEC_BINDING_BYTES:] == binding
    )


def round_context(
    run_id: int, server_round: int, nonce: bytes | None = None, bind: bytes | None = None
) -> bytes:
    """Bytes naming one round of one run; every key, ciphertext and mask is bound to it.

    ``nonce`` (16 fresh random bytes by default) makes contexts unique even when a run
    id is reused; the server draws it and sends the context to the clients. ``bind``
    (a :func:`spec_binding`) follows the nonce: the round's client spec.
    """
    if bind is not None and (not isinstance(bind, bytes) or len(bind) != SPEC_BINDING_BYTES):
        raise ValueError(f"bind must be a {SPEC_BINDING_BYTES}-byte spec_binding")
    if isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 <= run_id < 2**64:
        raise ValueError(f"run_id must be a uint64, got {run_id!r}")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"server_round must be an int, got {server_round!r}")
    if not 0 <= server_round < 2**64:
        raise ValueError(f"server_round must be a uint64, got {server_round}")
    nonce = os.urandom(16) if nonce is None else nonce
    if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
        raise ValueError("nonce must be 8..64 bytes")
    return _CONTEXT_LABEL + struct.pack(">QQ", run_id, server_round) + nonce + (bind or b"")


def _point(node: int) -> int:
    # Shamir evaluation point of a node: shifted so node id 0 is usable (x = 0 is the secret).
    return node + 1


def _check_bits_and_length(bits: int, vector_length: int) -> type[np.unsignedinteger]:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int)
        or not crypto.MIN_BITS <= bits <= crypto.MAX_BITS
    ):
        raise ValueError(
            f"bits must be an int in [{crypto.MIN_BITS}, {crypto.MAX_BITS}], got {bits!r}"
        )
    if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
        raise ValueError(f"vector_length must be an int >= 1, got {vector_length!r}")
    return crypto.storage_dtype(bits)


def _vector_problem(y: object, dtype: type, length: int, bits: int) -> str | None:
    """Why ``y`` is not a valid ring vector, or None."""
    if not isinstance(y, np.ndarray):
        return f"expected a numpy array, got {type(y).__name__}"
    if y.dtype != dtype:
        return f"expected dtype {np.dtype(dtype)}, got {y.dtype}"
    if y.shape != (length,):
        return f"expected shape ({length},), got {y.shape}"
    if bits < 8 * y.itemsize and length and int(y.max()) >> bits:
        return f"element >= 2**{bits}: not reduced mod 2**bits"
    return None


def _pairwise_seed(
    s_sk: crypto.X25519PrivateKey, peer_s_pk: bytes, *, me: int, peer: int, context: bytes
) -> tuple[bytes, masks.MaskDomain]:
    """``(s_uv, pairwise domain)``: the PRG input of the pairwise mask of ``me`` and ``peer``."""
    seed = crypto.derive_key(
        crypto.agree(s_sk, peer_s_pk),
        purpose=crypto.KeyPurpose.pairwise_mask,
        context=context,
        node_a=me,
        node_b=peer,
    )
    return seed, masks.MaskDomain.pairwise


def _reduce(x: np.ndarray, bits: int) -> np.ndarray:
    if bits < 8 * x.itemsize:
        np.bitwise_and(x, x.dtype.type((1 << bits) - 1), out=x)
    return x


def _pack_plaintext(b_share: int, s_share: int) -> bytes:
    return bytes([_VERSION]) + shamir.share_to_bytes(b_share) + shamir.share_to_bytes(s_share)


def _unpack_plaintext(raw: bytes) -> tuple[int, int]:
    if len(raw) != PLAINTEXT_BYTES or raw[0] != _VERSION:
        raise ValueError("share payload has the wrong length or version")
    cut = 1 + shamir.SHARE_BYTES
    return shamir.share_from_bytes(raw[1:cut]), shamir.share_from_bytes(raw[cut:])


def _encryption_key(
    c_sk: crypto.X25519PrivateKey, peer_c_pk: bytes, me: int, peer: int, ctx: bytes
) -> bytes:
    return crypto.derive_key(
        crypto.agree(c_sk, peer_c_pk),
        purpose=crypto.KeyPurpose.share_encryption,
        context=ctx,
        node_a=me,
        node_b=peer,
    )
