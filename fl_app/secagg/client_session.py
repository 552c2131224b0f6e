"""The client's half of the protocol as a pure state machine: :class:`ClientSession`.

One session per client and round: advertise, share keys, masked input, unmask, in this
order only (:class:`~fl_app.secagg.protocol.StageOrderError` otherwise). It holds the
client's secrets (``b_u``, ``s_sk_u``, ``c_sk_u``) and drops them as soon as the masked
input is built; the stages, the shared types and the trust assumptions are in
:mod:`fl_app.secagg.protocol`. The Flower handlers around it are
:mod:`fl_app.secagg.client`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fl_app.secagg import crypto, masks, shamir
from fl_app.secagg.params import SecAggParams
from fl_app.secagg.protocol import (
    ClientRefusal,
    PublicKeys,
    Stage,
    StageOrderError,
    UnmaskReply,
    _check_bits_and_length,
    _encryption_key,
    _pack_plaintext,
    _pairwise_seed,
    _point,
    _unpack_plaintext,
    _vector_problem,
)

__all__ = ["ClientSession"]


class ClientSession:
    """One client's side of one secure-aggregation round.

    Parameters
    ----------
    node_id
        This client's uint64 node id.
    context
        Round context from the server (:func:`round_context`).
    params
        :class:`~fl_app.secagg.params.SecAggParams` of the round.
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
        # long: every check on the neighbour keys precedes the first share that leaves.
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

    def masked_input(
        self, ciphertexts: Mapping[int, bytes], encoded: np.ndarray, terms: bytes = b""
    ) -> np.ndarray:
        """Stage 3: store the shares addressed to this node and return the masked input.

        Parameters
        ----------
        ciphertexts
            ``sender -> ciphertext`` from the neighbours that completed stage 2.
        encoded
            The fixed-point input (``FixedPointCodec.encode``): dtype of ``bits``, length ``d``.
        terms
            The round terms this input was computed under (:func:`fl_app.secagg.terms.
            round_terms`), bound into every pairwise mask; the server unmasks with its own
            (:attr:`fl_app.secagg.server_session.ServerSession.terms`).

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
        # generated and accumulated chunk by chunk (masks.accumulate_masks).
        add = [(bytes(self._b), masks.MaskDomain.self_mask)]
        subtract: list[tuple[bytes, masks.MaskDomain]] = []
        for v in sorted(received):
            pair = _pairwise_seed(
                self._s_sk,
                self._neighbours[v].s_pk,
                me=self.node_id,
                peer=v,
                context=self.context + bytes(terms),
            )
            (add if self.node_id < v else subtract).append(pair)
        y = np.empty_like(encoded)
        masks.accumulate_masks(y, self.bits, add=add, subtract=subtract, base=encoded)
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
        # long: the inverse of to_state, field by field in its order (one reader, one format).
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
