"""Secure aggregation as two pure state machines: :class:`ClientSession`, :class:`ServerSession`.

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
   :meth:`ClientSession.advertise` and :mod:`fl_app.secagg.client`.)
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
:meth:`ClientSession.check_lists` shared by both) and at most ``params.max_corrupt``
colluding clients (see :mod:`fl_app.secagg.graph`); authenticated channels between
each client and the server (Flower's TLS/node auth); client secrets live only in the
session (and in the state it exports between processes, which must stay on the
client): ``b_u``, ``s_sk_u`` and ``c_sk_u`` are dropped as soon as the masked input is
built, the shares held for neighbours after stage 4 or on :meth:`ClientSession.wipe`.
Against faulty holders and a deviating server: each client commits to ``b_u`` at
stage 2 (:func:`~fl_app.secagg.crypto.commit_seed`) and the server checks every
rebuilt seed and key, trying other share subsets when one fails
(:func:`~fl_app.secagg.shamir.reconstruct_verified`); a client checks the stage-4
lists against its cohort and the neighbours that shared with it, and counts survivors
against its own floor.
"""

from __future__ import annotations

import functools
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from fl_app.secagg import crypto, shamir
from fl_app.secagg.graph import SecAggParams, build_graph

__all__ = [
    "CIPHERTEXT_BYTES",
    "PLAINTEXT_BYTES",
    "AggregateResult",
    "ClientRefusal",
    "ClientSession",
    "PublicKeys",
    "Rejection",
    "RoundAbandoned",
    "ServerSession",
    "Stage",
    "StageOrderError",
    "UnmaskReply",
    "UnmaskRequest",
    "round_context",
]

_VERSION = 1
PLAINTEXT_BYTES = 1 + 2 * shamir.SHARE_BYTES
CIPHERTEXT_BYTES = PLAINTEXT_BYTES + crypto.AEAD_OVERHEAD
_CONTEXT_LABEL = b"fl-app/secagg/round/v1"


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


def round_context(run_id: int, server_round: int, nonce: bytes | None = None) -> bytes:
    """Bytes naming one round of one run; every key, ciphertext and mask is bound to it.

    ``nonce`` (16 fresh random bytes by default) makes contexts unique even when a run
    id is reused; the server draws it and sends the context to the clients.
    """
    if isinstance(run_id, bool) or not isinstance(run_id, int) or not 0 <= run_id < 2**64:
        raise ValueError(f"run_id must be a uint64, got {run_id!r}")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"server_round must be an int, got {server_round!r}")
    if not 0 <= server_round < 2**64:
        raise ValueError(f"server_round must be a uint64, got {server_round}")
    nonce = os.urandom(16) if nonce is None else nonce
    if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
        raise ValueError("nonce must be 8..64 bytes")
    return _CONTEXT_LABEL + struct.pack(">QQ", run_id, server_round) + nonce


def _point(node: int) -> int:
    # Shamir evaluation point of a node: shifted so node id 0 is usable (x = 0 is the secret).
    return node + 1


def _check_bits_and_length(bits: int, vector_length: int) -> type[np.unsignedinteger]:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 64:
        raise ValueError(f"bits must be an int in [8, 64], got {bits!r}")
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
) -> tuple[bytes, crypto.MaskDomain]:
    """``(s_uv, pairwise domain)``: the PRG input of the pairwise mask of ``me`` and ``peer``."""
    seed = crypto.derive_key(
        crypto.agree(s_sk, peer_s_pk),
        purpose=crypto.KeyPurpose.pairwise_mask,
        context=context,
        node_a=me,
        node_b=peer,
    )
    return seed, crypto.MaskDomain.pairwise


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


class ClientSession:
    """One client's side of one secure-aggregation round.

    Parameters
    ----------
    node_id
        This client's uint64 node id.
    context
        Round context from the server (:func:`round_context`).
    params
        :class:`~fl_app.secagg.graph.SecAggParams` of the round.
    vector_length, bits
        Length ``d`` and ring ``Z_{2**bits}`` of the encoded input.
    cohort
        Optional set of node ids taking part; if given, neighbours outside it are refused.
    entropy
        CSPRNG for keys, seeds, Shamir coefficients and AEAD nonces (``os.urandom``).
    """

    def __init__(
        self,
        node_id: int,
        context: bytes,
        params: SecAggParams,
        *,
        vector_length: int,
        bits: int,
        cohort: Iterable[int] | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.node_id = crypto.check_node_id("node_id", node_id)
        self.context = crypto.check_context(context)
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams, got {type(params).__name__}")
        self.params = params
        self.dtype = _check_bits_and_length(bits, vector_length)
        self.vector_length = vector_length
        self.bits = bits
        self.cohort = None if cohort is None else frozenset(int(x) for x in cohort)
        self._entropy = entropy
        self._stage = 0
        self._wiped = False
        self._c_sk: crypto.X25519PrivateKey | None = None
        self._s_sk: crypto.X25519PrivateKey | None = None
        self._b: bytearray | None = None
        self._neighbours: dict[int, PublicKeys] = {}
        # node -> (share of b_node, share of s_sk_node) held by this client, own included.
        self._shares: dict[int, tuple[int, int]] = {}
        # neighbour -> AEAD key of the pair, derived in stage 2 and reused to decrypt in
        # stage 3 (the key is symmetric in the pair); dropped once stage 3 is done.
        self._enc_keys: dict[int, bytes] = {}
        # Neighbours whose shares arrived at stage 3 (they completed stage 2).
        self._senders: frozenset[int] = frozenset()
        # Stage 2's commitment to b_u (crypto.commit_seed), sent with the ciphertexts.
        self.commitment: bytes | None = None

    @property
    def stage(self) -> int:
        """Last completed stage (0 before advertise)."""
        return self._stage

    @property
    def neighbour_keys(self) -> dict[int, PublicKeys]:
        """The neighbours' public keys this client shared with at stage 2 (public data;
        the consistency check binds each signer's signature to its own round keys)."""
        return dict(self._neighbours)

    def _enter(self, stage: Stage) -> None:
        if self._wiped:
            raise StageOrderError(f"stage {stage.name} called after the session was wiped")
        if self._stage != stage - 1:
            raise StageOrderError(
                f"stage {stage.name} called after stage {self._stage}; "
                f"expected stage {self._stage + 1} (stages run once, in order)"
            )

    def advertise(
        self, keys: tuple[crypto.X25519PrivateKey, crypto.X25519PrivateKey] | None = None
    ) -> PublicKeys:
        """Stage 1: draw the two key pairs and return their public keys.

        ``keys``: ``(c_sk, s_sk)`` drawn earlier for this round and not used by any other
        session (the ClientApp advertises a batch of per-round pairs ahead, see
        :mod:`fl_app.secagg.client`); ``None`` draws them now.
        """
        self._enter(Stage.advertise)
        if keys is None:
            self._c_sk = crypto.generate_private_key(self._entropy)
            self._s_sk = crypto.generate_private_key(self._entropy)
        else:
            c_sk, s_sk = keys
            if not all(isinstance(k, crypto.X25519PrivateKey) for k in (c_sk, s_sk)):
                raise TypeError("keys must be two X25519PrivateKey")
            if crypto.private_key_bytes(c_sk) == crypto.private_key_bytes(s_sk):
                raise ValueError("c_sk and s_sk must be different keys")
            self._c_sk, self._s_sk = c_sk, s_sk
        self._stage = Stage.advertise
        return PublicKeys(crypto.public_key_bytes(self._c_sk), crypto.public_key_bytes(self._s_sk))

    def share_keys(self, neighbour_keys: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Stage 2: Shamir-share ``b_u`` and ``s_sk`` over the neighbours; encrypt each pair.

        Refuses on a malformed or small-order key, a key used twice, its own id, a node
        outside ``cohort``, or a neighbour count outside ``[t - 1, degree]``.

        Returns
        -------
        dict
            ``recipient -> ciphertext`` (:data:`CIPHERTEXT_BYTES` each). The commitment
            to ``b_u`` the server checks after reconstruction is then :attr:`commitment`.
        """
        stage = Stage.share_keys
        self._enter(stage)
        assert self._c_sk is not None and self._s_sk is not None
        if not isinstance(neighbour_keys, Mapping):
            raise ClientRefusal(stage, "neighbour keys must be a mapping node -> PublicKeys")
        t, k = self.params.threshold, self.params.degree
        if not t - 1 <= len(neighbour_keys) <= k:
            raise ClientRefusal(
                stage,
                f"got {len(neighbour_keys)} neighbours; expected between t-1={t - 1} and "
                f"degree={k}",
            )
        own = crypto.public_key_bytes(self._c_sk), crypto.public_key_bytes(self._s_sk)
        seen_keys: set[bytes] = set(own)
        neighbours: dict[int, PublicKeys] = {}
        for raw_id, keys in neighbour_keys.items():
            try:
                v = crypto.check_node_id("neighbour id", raw_id)
            except ValueError as exc:
                raise ClientRefusal(stage, str(exc)) from None
            if v == self.node_id:
                raise ClientRefusal(stage, "own node id listed among the neighbours")
            if self.cohort is not None and v not in self.cohort:
                raise ClientRefusal(stage, f"neighbour {v} is not in the cohort")
            if not isinstance(keys, PublicKeys):
                raise ClientRefusal(stage, f"keys of neighbour {v} are not PublicKeys")
            for name, pk in (("c_pk", keys.c_pk), ("s_pk", keys.s_pk)):
                try:
                    crypto.load_public_key(pk)
                except crypto.InvalidPublicKeyError as exc:
                    raise ClientRefusal(stage, f"neighbour {v} {name}: {exc}") from None
                if pk in seen_keys:
                    raise ClientRefusal(stage, f"neighbour {v} {name} duplicates another key")
                seen_keys.add(bytes(pk))
            neighbours[v] = PublicKeys(bytes(keys.c_pk), bytes(keys.s_pk))

        b = bytearray(self._entropy(shamir.SECRET_BYTES))
        holders = [self.node_id, *neighbours]
        points = [_point(x) for x in holders]
        s_raw = crypto.private_key_bytes(self._s_sk)
        b_shares = shamir.split(bytes(b), t, points, randbytes=self._entropy)
        s_shares = shamir.split(s_raw, t, points, randbytes=self._entropy)
        out: dict[int, bytes] = {}
        enc_keys: dict[int, bytes] = {}
        for v, v_keys in neighbours.items():
            key = _encryption_key(self._c_sk, v_keys.c_pk, self.node_id, v, self.context)
            enc_keys[v] = key
            out[v] = crypto.encrypt(
                key,
                _pack_plaintext(b_shares[_point(v)], s_shares[_point(v)]),
                context=self.context,
                sender=self.node_id,
                recipient=v,
                entropy=self._entropy,
            )
        me = _point(self.node_id)
        self.commitment = crypto.commit_seed(bytes(b), context=self.context, node=self.node_id)
        self._b = b
        self._neighbours = neighbours
        self._enc_keys = enc_keys
        self._shares = {self.node_id: (b_shares[me], s_shares[me])}
        self._stage = Stage.share_keys
        return out

    def masked_input(self, ciphertexts: Mapping[int, bytes], encoded: np.ndarray) -> np.ndarray:
        """Stage 3: store the shares addressed to this node and return the masked input.

        Parameters
        ----------
        ciphertexts
            ``sender -> ciphertext`` from the neighbours that completed stage 2.
        encoded
            The fixed-point input (``FixedPointCodec.encode``): dtype of ``bits``, length ``d``.

        Refuses on a sender that is not a neighbour, fewer than ``t`` share holders
        left, or any ciphertext that fails authentication (tampered, wrong recipient,
        other round).
        """
        stage = Stage.masked_input
        self._enter(stage)
        assert self._s_sk is not None and self._c_sk is not None and self._b is not None
        problem = _vector_problem(encoded, self.dtype, self.vector_length, self.bits)
        if problem is not None:
            raise ClientRefusal(stage, f"encoded input: {problem}")
        if not isinstance(ciphertexts, Mapping):
            raise ClientRefusal(stage, "ciphertexts must be a mapping sender -> bytes")
        received: dict[int, tuple[int, int]] = {}
        for raw_id, ct in ciphertexts.items():
            v = int(raw_id) if isinstance(raw_id, (int, np.integer)) else -1
            if v not in self._neighbours:
                raise ClientRefusal(stage, f"ciphertext from {raw_id!r}, not a neighbour")
            key = self._enc_keys.get(v) or _encryption_key(
                self._c_sk, self._neighbours[v].c_pk, self.node_id, v, self.context
            )
            try:
                plain = crypto.decrypt(
                    key, ct, context=self.context, sender=v, recipient=self.node_id
                )
                received[v] = _unpack_plaintext(plain)
            except (crypto.DecryptionError, ValueError) as exc:
                raise ClientRefusal(stage, f"shares from {v} rejected: {exc}") from None
        if len(received) + 1 < self.params.threshold:
            raise ClientRefusal(
                stage,
                f"only {len(received) + 1} share holders (self included) completed stage 2; "
                f"threshold is {self.params.threshold}",
            )
        # y = x + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv), all masks
        # generated and accumulated chunk by chunk (crypto.accumulate_masks).
        add = [(bytes(self._b), crypto.MaskDomain.self_mask)]
        subtract: list[tuple[bytes, crypto.MaskDomain]] = []
        for v in sorted(received):
            pair = _pairwise_seed(
                self._s_sk,
                self._neighbours[v].s_pk,
                me=self.node_id,
                peer=v,
                context=self.context,
            )
            (add if self.node_id < v else subtract).append(pair)
        y = np.empty_like(encoded)
        crypto.accumulate_masks(y, self.bits, add=add, subtract=subtract, base=encoded)
        self._shares.update(received)
        self._senders = frozenset(received)
        self._enc_keys.clear()
        # The masked input is built: b_u, s_sk_u and c_sk_u are never needed again by
        # this client (the server rebuilds b_u or s_sk_u from the holders' shares), so
        # they go now, not at stage 4 (which may never come).
        self._drop_secrets()
        self._stage = Stage.masked_input
        return y

    def unmask(
        self, survivors: Iterable[int], dropouts: Iterable[int], *, min_survivors: int = 0
    ) -> UnmaskReply:
        """Stage 4: self-mask shares of survivors, key shares of dropouts; then wipe.

        Refuses if a node is listed twice or in both lists (that would give the server
        both secrets of one node), if this node is not a survivor, if a listed node is
        outside ``cohort`` or is a neighbour that never sent its shares at stage 2, or
        if fewer than ``max(t, params.min_survivors, min_survivors)`` distinct cohort
        members are listed as survivors (``min_survivors``: the client's own floor).
        Nodes this client holds no share of are ignored.
        """
        stage = Stage.unmask
        self._enter(stage)
        alive_set, gone_set = self.check_lists(survivors, dropouts, min_survivors, stage)
        b_out = {
            v: shamir.share_to_bytes(self._shares[v][0])
            for v in sorted(alive_set & self._shares.keys())
        }
        s_out = {
            v: shamir.share_to_bytes(self._shares[v][1])
            for v in sorted(gone_set & self._shares.keys())
        }
        self._stage = Stage.unmask
        self.wipe()
        return UnmaskReply(self_mask_shares=b_out, key_shares=s_out)

    def check_lists(
        self,
        survivors: Iterable[int],
        dropouts: Iterable[int],
        min_survivors: int = 0,
        stage: Stage = Stage.unmask,
    ) -> tuple[set[int], set[int]]:
        """The stage-4 checks of :meth:`unmask` (also what a client checks of the
        survivor set it signs at the consistency stage); raises :class:`ClientRefusal`."""
        if self._wiped or self._stage != Stage.masked_input:
            raise StageOrderError(f"stage {stage.name} needs a session after its masked input")
        try:
            alive = [crypto.check_node_id("survivor", x) for x in survivors]
            gone = [crypto.check_node_id("dropout", x) for x in dropouts]
        except ValueError as exc:
            raise ClientRefusal(stage, str(exc)) from None
        alive_set, gone_set = set(alive), set(gone)
        if len(alive_set) != len(alive) or len(gone_set) != len(gone):
            raise ClientRefusal(stage, "a node is listed twice in the same list")
        both = alive_set & gone_set
        if both:
            raise ClientRefusal(
                stage, f"nodes {sorted(both)[:5]} listed as both survivor and dropout"
            )
        if self.node_id not in alive_set:
            raise ClientRefusal(stage, "this node is not listed as a survivor")
        if self.cohort is not None:
            outside = sorted((alive_set | gone_set) - self.cohort)
            if outside:
                raise ClientRefusal(
                    stage, f"nodes {outside[:5]} are not in the cohort this client received"
                )
        # A neighbour in either list must have completed stage 2 (it sent this client
        # its shares): U3 and the dropouts lie in U2, and this client saw U2 ∩ N(u).
        unseen = sorted(((alive_set | gone_set) & set(self._neighbours)) - self._senders)
        if unseen:
            raise ClientRefusal(
                stage,
                f"neighbours {unseen[:5]} are listed but never sent this client their "
                "shares at stage 2",
            )
        floor = max(self.params.threshold, self.params.min_survivors, min_survivors)
        if len(alive_set) < floor:
            raise ClientRefusal(stage, f"{len(alive_set)} survivors listed, fewer than {floor}")
        return alive_set, gone_set

    def _drop_secrets(self) -> None:
        if self._b is not None:
            self._b[:] = bytes(len(self._b))
        self._b = None
        self._c_sk = None
        self._s_sk = None

    def wipe(self) -> None:
        """Zero the self-mask seed, drop keys and shares; every later stage call raises.

        Python cannot overwrite immutable ``int``/``bytes`` copies; dropping the last
        reference is the best available (OpenSSL cleanses the X25519 key on free).
        """
        self._drop_secrets()
        self._shares.clear()
        self._neighbours.clear()
        self._enc_keys.clear()
        self._wiped = True

    # ---- state between processes (Flower starts a fresh ClientApp per message) ----

    def to_state(self) -> dict[str, bytes]:
        """Everything needed to resume in another process, as bytes values.

        Contains secrets: keep it in the SuperNode's ``Context.state`` only, never in a
        checkpoint or log, and delete it after stage 4. Between stages 2 and 3 it also
        holds the pairwise share-encryption keys (``enc_keys``), derived from ``c_sk``
        which the state holds anyway, so stage 3 need not repeat those key agreements.
        """
        if self._wiped:
            raise StageOrderError("session was wiped; nothing to export")
        state = {
            "node_id": struct.pack(">Q", self.node_id),
            "stage": bytes([self._stage]),
            "context": self.context,
        }
        if self._c_sk is not None and self._s_sk is not None:
            state["c_sk"] = crypto.private_key_bytes(self._c_sk)
            state["s_sk"] = crypto.private_key_bytes(self._s_sk)
        if self._b is not None:
            state["b"] = bytes(self._b)
        state["neighbours"] = b"".join(
            struct.pack(">Q", v) + pk.c_pk + pk.s_pk for v, pk in sorted(self._neighbours.items())
        )
        state["shares"] = b"".join(
            struct.pack(">Q", v) + shamir.share_to_bytes(bs) + shamir.share_to_bytes(ss)
            for v, (bs, ss) in sorted(self._shares.items())
        )
        if self._enc_keys:
            state["enc_keys"] = b"".join(
                struct.pack(">Q", v) + key for v, key in sorted(self._enc_keys.items())
            )
        if self._stage >= Stage.masked_input:
            state["senders"] = b"".join(struct.pack(">Q", v) for v in sorted(self._senders))
        return state

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, bytes],
        params: SecAggParams,
        *,
        vector_length: int,
        bits: int,
        cohort: Iterable[int] | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> ClientSession:
        """Resume a session exported by :meth:`to_state` (raises ``ValueError`` if malformed)."""
        try:
            (node_id,) = struct.unpack(">Q", state["node_id"])
            session = cls(
                node_id,
                state["context"],
                params,
                vector_length=vector_length,
                bits=bits,
                cohort=cohort,
                entropy=entropy,
            )
            stage = state["stage"][0]
            if not 0 <= stage < Stage.unmask:
                raise ValueError(f"stage {stage} cannot be resumed")
            if "c_sk" in state:
                session._c_sk = crypto.private_key_from_bytes(state["c_sk"])
                session._s_sk = crypto.private_key_from_bytes(state["s_sk"])
            if "b" in state:
                session._b = bytearray(state["b"])
            item = 8 + 2 * crypto.KEY_BYTES
            raw = state["neighbours"]
            for i in range(0, len(raw), item):
                (v,) = struct.unpack(">Q", raw[i : i + 8])
                session._neighbours[v] = PublicKeys(
                    raw[i + 8 : i + 8 + crypto.KEY_BYTES], raw[i + 8 + crypto.KEY_BYTES : i + item]
                )
            item = 8 + 2 * shamir.SHARE_BYTES
            raw = state["shares"]
            for i in range(0, len(raw), item):
                (v,) = struct.unpack(">Q", raw[i : i + 8])
                cut = i + 8 + shamir.SHARE_BYTES
                session._shares[v] = (
                    shamir.share_from_bytes(raw[i + 8 : cut]),
                    shamir.share_from_bytes(raw[cut : i + item]),
                )
            item = 8 + crypto.KEY_BYTES
            raw = state.get("enc_keys", b"")
            if len(raw) % item:
                raise ValueError(f"enc_keys holds {len(raw)} bytes, not a multiple of {item}")
            for i in range(0, len(raw), item):
                (v,) = struct.unpack(">Q", raw[i : i + 8])
                if v not in session._neighbours:
                    raise ValueError(f"enc_keys names {v}, not a neighbour")
                session._enc_keys[v] = bytes(raw[i + 8 : i + item])
            raw = state.get("senders", b"")
            if len(raw) % 8:
                raise ValueError(f"senders holds {len(raw)} bytes, not a multiple of 8")
            session._senders = frozenset(
                struct.unpack(">Q", raw[i : i + 8])[0] for i in range(0, len(raw), 8)
            )
        except (KeyError, IndexError, struct.error, TypeError) as exc:
            raise ValueError(f"malformed client secagg state: {exc!r}") from exc
        # Keys from stage 1 until the masked input is built; b_u from stage 2 until then.
        needs_keys = Stage.advertise <= stage < Stage.masked_input
        needs_b = Stage.share_keys <= stage < Stage.masked_input
        if needs_keys != (session._c_sk is not None) or needs_b != (session._b is not None):
            raise ValueError(
                f"client secagg state for stage {stage} lacks its secrets or keeps ones "
                "it must have dropped"
            )
        session._stage = stage
        return session


def _pairs(
    replies: Mapping[int, object] | Iterable[tuple[int, object]],
) -> list[tuple[object, object]]:
    if isinstance(replies, Mapping):
        return list(replies.items())
    return list(replies)


class ServerSession:
    """The server's side of one round: validates, routes, sums and unmasks.

    Parameters
    ----------
    cohort
        Node ids asked to take part; must number ``params.num_clients``.
    params
        :class:`~fl_app.secagg.graph.SecAggParams` derived for this cohort.
    vector_length, bits
        Length and ring of the encoded inputs.
    context
        Round context sent to the clients (:func:`round_context`).
    graph_seed
        32 bytes for the neighbour graph (``os.urandom`` when omitted).

    Every ``collect``/``route`` method takes the replies of one stage as a mapping
    ``node -> payload`` or an iterable of ``(node, payload)`` pairs (so duplicates can
    be seen); bad replies become :attr:`rejections`. When the round can no longer
    finish, the method raises :class:`RoundAbandoned` and every later call re-raises it.
    """

    def __init__(
        self,
        cohort: Iterable[int],
        params: SecAggParams,
        *,
        vector_length: int,
        bits: int,
        context: bytes,
        graph_seed: bytes | None = None,
    ) -> None:
        ids = [crypto.check_node_id("cohort[i]", x) for x in cohort]
        if len(set(ids)) != len(ids):
            raise ValueError("cohort lists a node id twice")
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams, got {type(params).__name__}")
        if len(ids) != params.num_clients:
            raise ValueError(
                f"cohort has {len(ids)} nodes but params were derived for "
                f"num_clients={params.num_clients}; derive params for this cohort"
            )
        self.cohort = frozenset(ids)
        self.params = params
        self.dtype = _check_bits_and_length(bits, vector_length)
        self.vector_length = vector_length
        self.bits = bits
        self.context = crypto.check_context(context)
        self._graph_seed = graph_seed
        self.rejections: list[Rejection] = []
        self._stage = 0
        self._abandoned: RoundAbandoned | None = None
        self.keys: dict[int, PublicKeys] = {}
        self.graph: dict[int, tuple[int, ...]] = {}
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()
        self._total: np.ndarray | None = None
        self._commitments: dict[int, bytes] = {}

    # ---- helpers ----
    @property
    def stage(self) -> int:
        """Last completed stage (0 before stage 1)."""
        return self._stage

    def _enter(self, stage: Stage) -> None:
        if self._abandoned is not None:
            raise self._abandoned
        if self._stage != stage - 1:
            raise StageOrderError(
                f"server stage {stage.name} called after stage {self._stage}; run stages in order"
            )

    def _abandon(self, stage: Stage, reason: str) -> RoundAbandoned:
        self._abandoned = RoundAbandoned(stage, reason, self.rejections)
        self._total = None
        return self._abandoned

    def _reject(self, node: object, stage: Stage, reason: str) -> None:
        node_id = int(node) if isinstance(node, (int, np.integer)) else -1
        self.rejections.append(Rejection(node_id, stage, reason))

    def _unique(
        self,
        replies: Mapping[int, object] | Iterable[tuple[int, object]],
        stage: Stage,
        allowed: frozenset[int],
        not_allowed_reason: str,
    ) -> dict[int, object]:
        """Well-formed replies from allowed nodes that answered exactly once."""
        pairs = _pairs(replies)
        counts = Counter(
            int(node)
            for node, _ in pairs
            if isinstance(node, (int, np.integer)) and not isinstance(node, bool)
        )
        accepted: dict[int, object] = {}
        reported: set[int] = set()
        for node, payload in pairs:
            if isinstance(node, bool) or not isinstance(node, (int, np.integer)):
                self._reject(node, stage, f"node id {node!r} is not an int")
                continue
            node_id = int(node)
            if counts[node_id] > 1:
                if node_id not in reported:
                    reported.add(node_id)
                    self._reject(node_id, stage, f"{counts[node_id]} replies from one node")
            elif node_id not in allowed:
                self._reject(node_id, stage, not_allowed_reason)
            else:
                accepted[node_id] = payload
        return accepted

    def _floor(self) -> int:
        return max(self.params.min_survivors, self.params.threshold)

    def _holders(self, node: int) -> tuple[int, ...]:
        return (node, *self.graph[node])

    # ---- stage 1 ----
    def collect_public_keys(
        self, replies: Mapping[int, PublicKeys] | Iterable[tuple[int, PublicKeys]]
    ) -> dict[int, dict[int, PublicKeys]]:
        """Validate stage-1 keys, draw the graph over ``U1``, return each node's neighbour keys."""
        stage = Stage.advertise
        self._enter(stage)
        accepted = self._unique(replies, stage, self.cohort, "node is not in the cohort")
        valid: dict[int, PublicKeys] = {}
        for node, keys in accepted.items():
            if not isinstance(keys, PublicKeys):
                self._reject(node, stage, f"expected PublicKeys, got {type(keys).__name__}")
                continue
            try:
                crypto.load_public_key(keys.c_pk)
                crypto.load_public_key(keys.s_pk)
            except crypto.InvalidPublicKeyError as exc:
                self._reject(node, stage, f"invalid public key: {exc}")
                continue
            if keys.c_pk == keys.s_pk:
                self._reject(node, stage, "c_pk and s_pk are the same key")
                continue
            valid[node] = PublicKeys(
                bytes(keys.c_pk), bytes(keys.s_pk), keys.identity, bytes(keys.signature)
            )
        owners = Counter(pk for keys in valid.values() for pk in (keys.c_pk, keys.s_pk))
        for node in sorted(valid):
            if owners[valid[node].c_pk] > 1 or owners[valid[node].s_pk] > 1:
                self._reject(node, stage, "public key also advertised by another node")
                del valid[node]
        if len(valid) < self._floor():
            raise self._abandon(
                stage, f"{len(valid)} valid key advertisements, fewer than {self._floor()}"
            )
        self.keys = valid
        self.graph = build_graph(valid, self.params.degree, self._graph_seed)
        self._stage = stage
        return {u: {v: valid[v] for v in self.graph[u]} for u in sorted(valid)}

    # ---- stage 2 ----
    def route_shares(
        self,
        replies: Mapping[int, Mapping[int, bytes]] | Iterable[tuple[int, Mapping[int, bytes]]],
        commitments: Mapping[int, bytes] | None = None,
    ) -> dict[int, dict[int, bytes]]:
        """Validate stage-2 ciphertext bundles and route them: ``recipient -> {sender: ct}``.

        A bundle must hold exactly one ciphertext of :data:`CIPHERTEXT_BYTES` for each
        neighbour in ``U1``; otherwise the sender is rejected and none of its
        ciphertexts is delivered (so nobody masks with it). Nodes left with fewer than
        ``t`` holders are dropped as well. ``commitments`` (node -> the
        :attr:`ClientSession.commitment` it sent): when given, a node without a
        :data:`~fl_app.secagg.crypto.COMMITMENT_BYTES` commitment is rejected, and the
        self-mask seed rebuilt at stage 4 must match it.
        """
        stage = Stage.share_keys
        self._enter(stage)
        u1 = frozenset(self.keys)
        accepted = self._unique(replies, stage, u1, "node did not complete stage 1")
        bundles: dict[int, dict[int, bytes]] = {}
        for node, bundle in accepted.items():
            if commitments is not None:
                commitment = commitments.get(node)
                if not isinstance(commitment, bytes) or len(commitment) != 32:
                    self._reject(node, stage, "no 32-byte commitment to its self-mask seed")
                    continue
                self._commitments[node] = commitment
            if not isinstance(bundle, Mapping):
                self._reject(node, stage, f"expected a mapping, got {type(bundle).__name__}")
                continue
            expected = set(self.graph[node])
            got = {int(v) for v in bundle if isinstance(v, (int, np.integer))}
            if len(got) != len(bundle) or got != expected:
                extra = sorted(got - expected)[:5]
                missing = sorted(expected - got)[:5]
                self._reject(
                    node,
                    stage,
                    f"ciphertexts must address exactly its neighbours; extra (non-neighbour) "
                    f"{extra}, missing {missing}",
                )
                continue
            bad = [
                v
                for v, ct in bundle.items()
                if not isinstance(ct, (bytes, bytearray)) or len(ct) != CIPHERTEXT_BYTES
            ]
            if bad:
                self._reject(
                    node,
                    stage,
                    f"ciphertexts for {sorted(bad)[:5]} are not {CIPHERTEXT_BYTES} bytes",
                )
                continue
            bundles[node] = {int(v): bytes(ct) for v, ct in bundle.items()}
        u2 = set(bundles)
        if len(u2) < self._floor():
            raise self._abandon(
                stage, f"{len(u2)} nodes completed stage 2, fewer than {self._floor()}"
            )
        changed = True
        while changed:  # drop nodes whose secrets could never be reconstructed
            changed = False
            for node in sorted(u2):
                holders = 1 + sum(1 for v in self.graph[node] if v in u2)
                if holders < self.params.threshold:
                    u2.discard(node)
                    self._reject(
                        node, stage, f"only {holders} of its share holders completed stage 2"
                    )
                    changed = True
        if len(u2) < self._floor():
            raise self._abandon(
                stage, f"{len(u2)} nodes completed stage 2, fewer than {self._floor()}"
            )
        self.u2 = frozenset(u2)
        self._stage = stage
        return {u: {v: bundles[v][u] for v in self.graph[u] if v in u2} for u in sorted(u2)}

    # ---- stage 3 ----
    def collect_masked_inputs(
        self, replies: Mapping[int, np.ndarray] | Iterable[tuple[int, np.ndarray]]
    ) -> UnmaskRequest:
        """Validate and sum the masked vectors; return the survivors/dropouts to unmask."""
        stage = Stage.masked_input
        self._enter(stage)
        accepted = self._unique(replies, stage, self.u2, "node did not complete stage 2")
        total = np.zeros(self.vector_length, dtype=self.dtype)
        u3: set[int] = set()
        for node, y in accepted.items():
            problem = _vector_problem(y, self.dtype, self.vector_length, self.bits)
            if problem is not None:
                self._reject(node, stage, problem)
                continue
            assert isinstance(y, np.ndarray)
            np.add(total, y, out=total)
            u3.add(node)
        if len(u3) < self._floor():
            raise self._abandon(
                stage, f"{len(u3)} masked inputs arrived, fewer than {self._floor()}"
            )
        dropouts = self.u2 - u3
        for node in sorted(self.u2):
            holders = sum(1 for v in self._holders(node) if v in u3)
            if holders < self.params.threshold:
                raise self._abandon(
                    stage,
                    f"node {node} has {holders} surviving share holders, fewer than "
                    f"t={self.params.threshold}; its mask cannot be removed",
                )
        self.u3 = frozenset(u3)
        self._total = _reduce(total, self.bits)
        self._stage = stage
        return UnmaskRequest(survivors=tuple(sorted(u3)), dropouts=tuple(sorted(dropouts)))

    # ---- stage 4 ----
    def unmask(
        self, replies: Mapping[int, UnmaskReply] | Iterable[tuple[int, UnmaskReply]]
    ) -> AggregateResult:
        """Reconstruct the secrets, remove all masks, return the survivors' exact sum."""
        stage = Stage.unmask
        self._enter(stage)
        assert self._total is not None
        u3 = self.u3
        dropouts = self.u2 - u3
        accepted = self._unique(replies, stage, u3, "node is not a stage-3 survivor")
        b_shares: dict[int, dict[int, int]] = {v: {} for v in u3}
        s_shares: dict[int, dict[int, int]] = {v: {} for v in dropouts}
        for node, reply in accepted.items():
            if not isinstance(reply, UnmaskReply):
                self._reject(node, stage, f"expected UnmaskReply, got {type(reply).__name__}")
                continue
            holds = set(self._holders(node))
            try:
                b_items = {
                    int(v): shamir.share_from_bytes(s) for v, s in reply.self_mask_shares.items()
                }
                s_items = {int(v): shamir.share_from_bytes(s) for v, s in reply.key_shares.items()}
            except (shamir.ShamirError, TypeError, ValueError, AttributeError) as exc:
                self._reject(node, stage, f"malformed share: {exc}")
                continue
            wrong_b = sorted(set(b_items) - (holds & u3))
            wrong_s = sorted(set(s_items) - (holds & dropouts))
            if wrong_b or wrong_s:
                self._reject(
                    node,
                    stage,
                    f"shares for nodes it may not answer for: self-mask {wrong_b[:5]}, "
                    f"key {wrong_s[:5]}",
                )
                continue
            for v, share in b_items.items():
                b_shares[v][_point(node)] = share
            for v, share in s_items.items():
                s_shares[v][_point(node)] = share

        t = self.params.threshold
        total = self._total
        # Every mask to remove, then one pass over the sum (crypto.accumulate_masks):
        # the survivors' self-masks, and each dropout's pairwise masks with its
        # surviving neighbours (w added +mask if w < v, else -mask: undo it).
        add: list[tuple[bytes, crypto.MaskDomain]] = []
        subtract: list[tuple[bytes, crypto.MaskDomain]] = []
        survivors = sorted(u3)
        for seed in self._reconstruct_all(
            stage, survivors, b_shares, t, "self-mask seed", self._seed_matches
        ):
            subtract.append((seed, crypto.MaskDomain.self_mask))
        gone = sorted(dropouts)
        keys = self._reconstruct_all(stage, gone, s_shares, t, "masking key", self._key_matches)
        for v, raw in zip(gone, keys, strict=True):
            s_sk = crypto.private_key_from_bytes(raw)
            for w in self.graph[v]:
                if w not in u3:
                    continue
                pair = _pairwise_seed(s_sk, self.keys[w].s_pk, me=v, peer=w, context=self.context)
                (subtract if w < v else add).append(pair)
        crypto.accumulate_masks(total, self.bits, add=add, subtract=subtract)
        self._total = None
        self._stage = stage
        return AggregateResult(
            total=total,
            survivors=tuple(sorted(u3)),
            dropouts=tuple(sorted(dropouts)),
            rejections=tuple(self.rejections),
        )

    def _seed_matches(self, node: int, seed: bytes) -> bool:
        """The rebuilt ``b_node`` is the one committed to at stage 2 (if commitments came)."""
        expected = self._commitments.get(node)
        if expected is None:
            return True
        return crypto.commit_seed(seed, context=self.context, node=node) == expected

    def _key_matches(self, node: int, raw: bytes) -> bool:
        """The rebuilt ``s_sk_node`` belongs to the ``s_pk`` the node advertised."""
        key = crypto.private_key_from_bytes(raw)
        return crypto.public_key_bytes(key) == self.keys[node].s_pk

    def _reconstruct_all(
        self,
        stage: Stage,
        nodes: list[int],
        shares: Mapping[int, Mapping[int, int]],
        t: int,
        what: str,
        matches: Callable[[int, bytes], bool],
    ) -> list[bytes]:
        """The secrets of ``nodes`` (in order), each checked by ``matches(node, secret)``.

        All Lagrange coefficients of the first ``t`` shares of every node share one
        modular inversion (:func:`~fl_app.secagg.shamir.reconstruct_candidates`). A node
        whose candidate fails (an inconsistent or crafted share among its first ``t``)
        is rebuilt from other subsets of its shares
        (:func:`~fl_app.secagg.shamir.reconstruct_verified`); the holders whose shares
        disagree with the secret found are rejected. No subset passing: abandoned.
        """
        candidates = shamir.reconstruct_candidates([shares[v] for v in nodes], t)
        out: list[bytes] = []
        for v, secret in zip(nodes, candidates, strict=True):
            if secret is not None and matches(v, secret):
                out.append(secret)
                continue
            if len(shares[v]) < t:
                raise self._abandon(
                    stage, f"{len(shares[v])} shares of the {what} of node {v}, threshold t={t}"
                )
            try:
                secret, bad = shamir.reconstruct_verified(
                    shares[v], t, functools.partial(matches, v)
                )
            except shamir.ShamirError as exc:
                raise self._abandon(stage, f"{what} of node {v}: {exc}") from None
            for point in bad:
                self._reject(point - 1, stage, f"inconsistent share of the {what} of node {v}")
            out.append(secret)
        return out
