"""The server's half of the protocol as a pure state machine: :class:`ServerSession`.

It validates public keys, routes encrypted shares, sums masked inputs and unmasks the
survivors' exact sum; an invalid client reply never raises, it becomes a
:class:`~fl_app.secagg.protocol.Rejection` and the node counts as dropped. Below the
thresholds it raises :class:`~fl_app.secagg.protocol.RoundAbandoned`. The stages,
shared types and trust assumptions are in :mod:`fl_app.secagg.protocol`; the Flower
driver around it is :mod:`strategies.secagg`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fl_app.secagg import crypto, masks, shamir
from fl_app.secagg.graph import build_graph
from fl_app.secagg.params import SecAggParams
from fl_app.secagg.protocol import (
    CIPHERTEXT_BYTES,
    AggregateResult,
    PublicKeys,
    Rejection,
    RoundAbandoned,
    Stage,
    StageOrderError,
    UnmaskReply,
    UnmaskRequest,
    _check_bits_and_length,
    _pairwise_seed,
    _point,
    _reduce,
    _vector_problem,
)

__all__ = ["ServerSession"]


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
        :class:`~fl_app.secagg.params.SecAggParams` derived for this cohort.
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
        # The round terms of the stage-3 instructions (fl_app.secagg.terms), set by the
        # driver before unmasking: the dropouts' pairwise masks are rebuilt under them.
        self.terms = b""
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
        # long: every bundle is validated before any is routed (a bad one drops only its sender).
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
        # long: collect shares, rebuild, remove masks: one pass over the survivors (hot path).
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
        # Every mask to remove, then one pass over the sum (masks.accumulate_masks):
        # the survivors' self-masks, and each dropout's pairwise masks with its
        # surviving neighbours (w added +mask if w < v, else -mask: undo it).
        add: list[tuple[bytes, masks.MaskDomain]] = []
        subtract: list[tuple[bytes, masks.MaskDomain]] = []
        survivors = sorted(u3)
        for seed in self._reconstruct_all(
            stage, survivors, b_shares, t, "self-mask seed", self._seed_matches
        ):
            subtract.append((seed, masks.MaskDomain.self_mask))
        gone = sorted(dropouts)
        keys = self._reconstruct_all(stage, gone, s_shares, t, "masking key", self._key_matches)
        for v, raw in zip(gone, keys, strict=True):
            s_sk = crypto.private_key_from_bytes(raw)
            for w in self.graph[v]:
                if w not in u3:
                    continue
                pair = _pairwise_seed(
                    s_sk, self.keys[w].s_pk, me=v, peer=w, context=self.context + self.terms
                )
                (subtract if w < v else add).append(pair)
        masks.accumulate_masks(total, self.bits, add=add, subtract=subtract)
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
