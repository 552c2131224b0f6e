"""The round's train stage as secure aggregation: :class:`SecureAggregation`.

It runs stages 1-4 (and the consistency check under ``malicious``) over the cohort with
:class:`~strategies.secagg.runner.StageRunner`, keeps the public keys advertised ahead,
and decodes the unmasked sum (:mod:`strategies.secagg.decode`). The protocol and its trust
assumptions are described in :mod:`strategies.secagg`.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, RecordDict

from fl_app.protocol import BUDGET_EXHAUSTED, SERVER_ROUND
from fl_app.secagg import signing, wire
from fl_app.secagg.params import SecAggConfigError, ServerModel, consistency_quorum
from fl_app.secagg.protocol import (
    PublicKeys,
    RoundAbandoned,
    Stage,
    UnmaskReply,
    context_binds,
    round_context,
)
from fl_app.secagg.protocol import Rejection as ProtocolRejection
from fl_app.secagg.server_session import ServerSession
from fl_app.secagg.settings import SecAggSettings, round_params
from fl_app.secagg.vector import VectorLayout, pack_ids, round_codec
from strategies.secagg.ahead import SharedAhead, finish_ahead, plan_ahead, take_ahead
from strategies.secagg.binding import one_terms, spec_bind
from strategies.secagg.decode import RoundShape, decode_into
from strategies.secagg.messages import (
    config_only,
    masked_input_contents,
    payload_bundle,
    payload_key_batch,
    payload_masked,
    payload_signature,
    payload_signed_key_batch,
    payload_unmask,
    route_shares,
    share_key_instructions,
)
from strategies.secagg.outcome import SecAggOutcome, StageLog
from strategies.secagg.runner import Exchange, PublicCheck, StageRunner

if TYPE_CHECKING:  # fl_app.privacy imports torch; the server holds a built plan
    from fl_app.privacy.distributed import DdpPlan

log = logging.getLogger("fl_app.secagg")


class SecureAggregation:
    """Runs the train stage of a round as the four-stage secure-aggregation protocol."""

    def __init__(
        self,
        settings: SecAggSettings,
        ddp: DdpPlan | None = None,
        ddp_at: Callable[[int], DdpPlan] | None = None,
    ) -> None:
        self.settings = settings
        # node -> round -> public keys the node advertised ahead for that round (public
        # values; lost with the process, after which stage 1 simply runs again).
        self._round_keys: dict[int, dict[int, PublicKeys]] = {}
        # Stages 1-2 of the next round, run during this round's unmask exchange.
        self._ahead: SharedAhead | None = None
        # Distributed DP: clients send rotated, rounded, noised vectors of ddp.padded
        # coordinates instead of the fixed-point layout; the server adds nothing.
        self.ddp = ddp
        # A noise schedule: round r's plan at its own z (factory._round_plan); the
        # ring's size (max_cohort) is the run's.
        self.ddp_at = ddp_at
        # Malicious server model: node -> (roster identity, Ed25519 public key) it
        # advertised at stage 1 (public; used to drop bad consistency signatures).
        self._signers: dict[int, tuple[str, bytes]] = {}
        # Checks a masked input's public dp-* metrics (node, metrics) -> rejection reason
        # (the driver's one-node-per-site check, strategies.site_claims); a rejected
        # input is a stage-3 dropout, its masks removed at unmasking.
        self.public_check: PublicCheck | None = None
        # The round's client-spec binding (protocol.spec_binding), for its contexts and
        # the next round's share-ahead context.
        self._bind: bytes | None = None

    @property
    def malicious(self) -> bool:
        """Signed keys and the consistency-check round (secagg.server_model=malicious)."""
        return self.settings.server_model is ServerModel.malicious

    def _keys_for(self, rnd: int, cohort: Sequence[int]) -> dict[int, PublicKeys]:
        """Take the pairs advertised ahead for ``rnd``; drop every pair of a past round."""
        ahead: dict[int, PublicKeys] = {}
        for node in list(self._round_keys):
            rounds = self._round_keys[node]
            for r in [r for r in rounds if r < rnd]:
                del rounds[r]
            if not rounds:
                del self._round_keys[node]
        for u in cohort:
            keys = self._round_keys.get(u, {}).pop(rnd, None)
            if keys is not None:
                ahead[u] = keys
        return ahead

    def _key_stages(
        self,
        run: StageRunner,
        server: ServerSession,
        rnd: int,
        cohort: list[int],
        pre_advertised: dict[int, PublicKeys],
        last_round: int | None,
        run_id: int,
    ) -> dict[int, dict[int, bytes]]:
        """Stages 1 (only nodes without a pair for this round) and 2; the routed shares."""
        # long: stages 1 and 2 share the parse/collect closures over this round's session.
        horizon = self.settings.key_rounds
        if last_round is not None:
            horizon = max(1, min(horizon, last_round - rnd + 1))
        request_keys: dict[str, Any] = {SERVER_ROUND: rnd, wire.SECAGG_KEY_ROUNDS: horizon}
        if self.malicious:
            # The run id the clients bind their signed pairs to (the round context's).
            request_keys[wire.SECAGG_RUN_ID] = struct.pack(">Q", int(run_id) % 2**64)

        def parse(c: RecordDict) -> Any:
            if self.malicious:
                return payload_signed_key_batch(c, horizon)
            return payload_key_batch(c, horizon)

        def collect(raw: dict[int, Any]) -> Any:
            batches: dict[int, list[PublicKeys]] = {}
            for u, got in raw.items():
                if self.malicious:
                    batches[u], self._signers[u] = got
                else:
                    batches[u] = got
            for u, batch in batches.items():
                self._round_keys[u] = {rnd + i: k for i, k in enumerate(batch) if i}
            neighbours = server.collect_public_keys(
                {**pre_advertised, **{u: batch[0] for u, batch in batches.items()}}
            )
            if self.malicious and len(neighbours) != len(cohort):
                # Clients accept only the complete graph over the cohort they are told
                # (they cannot verify a server's claim of who dropped at stage 1).
                raise RoundAbandoned(
                    Stage.advertise,
                    f"{len(cohort) - len(neighbours)} of {len(cohort)} sampled clients gave "
                    "no valid signed keys; the malicious server model runs only with the "
                    "whole cohort at stage 2 (complete graph), so the round is abandoned",
                    server.rejections,
                )
            return neighbours

        keys = run.stage(
            Stage.advertise,
            {u: config_only(request_keys) for u in cohort if u not in pre_advertised},
            parse,
            collect,
        )
        msgs = {
            u: config_only(record)
            for u, record in share_key_instructions(
                server, rnd, keys, malicious=self.malicious
            ).items()
        }
        routed: dict[int, dict[int, bytes]] = run.stage(
            Stage.share_keys, msgs, payload_bundle, functools.partial(route_shares, server)
        )
        return routed

    def _forget_troubled(self, outcome: SecAggOutcome) -> None:
        """A node that failed, was rejected or went missing may have lost its key store
        (or holds another batch): its next round starts with stage 1 again."""
        nodes = set(outcome.missing)
        nodes.update(r.node_id for r in outcome.rejected)
        nodes.update(r.node_id for r in outcome.failed)
        for node in nodes:
            self._round_keys.pop(node, None)

    def _check_signatures(
        self, server: ServerSession, survivors: Sequence[int], replies: dict[int, Any]
    ) -> dict[int, tuple[str, bytes]]:
        """Keep the consistency signatures that verify under the key each node advertised
        (a faulty client's bad one would make every honest client refuse); abandon the
        round below the quorum the clients check (:func:`consistency_quorum`)."""
        good: dict[int, tuple[str, bytes]] = {}
        names: set[str] = set()
        for node, (identity, sig) in sorted(replies.items()):
            advertised = self._signers.get(node)
            keys = server.keys.get(node)
            ok = advertised is not None and advertised[0] == identity and identity not in names
            if ok and keys is not None:
                assert advertised is not None
                message = signing.survivors_message(
                    server.context, node, identity, keys.c_pk + keys.s_pk, survivors
                )
                ok = signing.verify_raw(advertised[1], message, sig)
            else:
                ok = False
            if not ok:
                server.rejections.append(
                    ProtocolRejection(node, Stage.consistency, "consistency signature invalid")
                )
                continue
            names.add(identity)
            good[node] = (identity, sig)
        need = consistency_quorum(server.params)
        if len(good) < need:
            raise RoundAbandoned(
                Stage.consistency,
                f"{len(good)} valid consistency signatures on the survivor set, fewer than "
                f"the {need} clients need (t={server.params.threshold}, > (n + C)/2)",
                server.rejections,
            )
        return good

    def encoding_bound(self, round_config: Mapping[str, Any], clip_key: str) -> float:
        """The round's L2 bound: the client-side DP clip norm, else ``secagg.clip``."""
        value = round_config.get(clip_key, self.settings.clip)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(
                "secure aggregation needs an encoding bound: client-side clipping "
                f"('{clip_key}') or secagg.clip; found {value!r}"
            )
        return float(value)

    def run_round(
        self,
        *,
        rnd: int,
        run_id: int,
        instructions: Sequence[Message],
        arrays: Mapping[str, np.ndarray],
        weighting: str,
        bound: float,
        exchange: Exchange,
        last_round: int | None = None,
        next_cohort: Callable[[set[int]], Sequence[int] | None] | None = None,
    ) -> SecAggOutcome:
        """Run stages 1-4 over the cohort addressed by ``instructions``.

        ``instructions`` are the strategy's train messages (arrays + config) for the
        sampled cohort; they become the stage-3 instructions. Stage 1 goes only to the
        nodes that hold no key pair for this round from an earlier stage 1 (none: no
        stage-1 exchange); it asks for ``settings.key_rounds`` rounds of pairs, never
        past ``last_round``.

        Share-ahead: ``next_cohort(exhausted)`` returns the cohort the driver will sample
        for the next round (``exhausted``: nodes that ran out of privacy budget in this
        one). If every node of it survives this round and holds a key pair for the next
        one, the next round's stage 2 rides on this round's stage-4 exchange and the next
        round starts at stage 3 (two exchanges a round). Otherwise, or if the next round's
        cohort turns out different, the next round runs its stages in full.
        """
        # long: one round's stages in protocol order, read top to bottom; each step is a call.
        s = self.settings
        by_node = {int(m.metadata.dst_node_id): m for m in instructions}
        cohort = sorted(by_node)
        outcome = SecAggOutcome(decoded=None)
        shape = self._round_shape(cohort, arrays, bound, outcome, rnd)
        if shape is None:
            return outcome
        pre_advertised = self._keys_for(rnd, cohort)
        bind = self._bind = spec_bind(instructions)
        shared, self._ahead = self._ahead, None
        shared = take_ahead(shared, rnd, cohort, shape.params, shape.length, s.bits)
        if (
            shared is not None
            and bind is not None
            and not context_binds(shared.server.context, bind)
        ):
            log.info("round %d: the client spec changed; stages 1-2 run again", rnd)
            shared = None
        if shared is not None:
            server = shared.server
        else:
            # A fresh random nonce, then the spec every stage-3 instruction carries.
            context = round_context(int(run_id) % 2**64, rnd, bind=bind)
            server = ServerSession(
                cohort, shape.params, vector_length=shape.length, bits=s.bits, context=context
            )
        run = StageRunner(server, outcome, rnd, exchange, s.stage_timeout_s, self.public_check)
        try:
            if shared is not None:
                routed = _absorb_ahead(run, shared)
            else:
                routed = self._key_stages(
                    run, server, rnd, cohort, pre_advertised, last_round, run_id
                )
            # ---- 3: masked input (the train instruction)
            msgs = masked_input_contents(
                by_node, routed, bound, weighting, s.max_weight, shape.ddp_round
            )
            server.terms = one_terms(msgs.values())
            request = run.stage(
                Stage.masked_input,
                msgs,
                lambda c: payload_masked(c, s.bits, shape.length),
                server.collect_masked_inputs,
            )
            outcome.dropouts = len(request.dropouts)
            ddp_round = shape.ddp_round
            if ddp_round is not None and len(request.survivors) < ddp_round.min_survivors:
                # Fewer noise shares than calibrated: the sum must never be unmasked.
                raise RoundAbandoned(
                    Stage.masked_input,
                    f"only {len(request.survivors)} masked inputs, distributed DP needs "
                    f"{ddp_round.min_survivors} (the sum would carry too little noise)",
                )
            result = self._unmask_stages(
                run, request, rnd, run_id, shape.length, last_round, next_cohort
            )
        except RoundAbandoned as err:
            run.absorb_rejections()
            outcome.note = f"{err}: model unchanged"
            log.warning("round %d: %s", rnd, outcome.note)
            return outcome
        finally:
            self._forget_troubled(outcome)
        decode_into(outcome, result, shape, server.context, bound, rnd)
        return outcome

    def _round_shape(
        self,
        cohort: Sequence[int],
        arrays: Mapping[str, np.ndarray],
        bound: float,
        outcome: SecAggOutcome,
        rnd: int = 0,
    ) -> RoundShape | None:
        """The round's parameters, vector layout and codec (or distributed-DP round);
        ``None`` with ``outcome.note`` set when the cohort cannot run a secure round."""
        s = self.settings
        if len(cohort) < 3:
            outcome.note = (
                f"secure aggregation needs >= 3 sampled clients, got {len(cohort)}: model unchanged"
            )
            return None
        try:
            params = round_params(
                len(cohort),
                s.mode,
                s.dropout_tolerance,
                s.corrupt_fraction,
                s.server_model,
                s.min_corrupt(),
            )
        except SecAggConfigError as err:
            outcome.note = f"no secure-aggregation parameters for {len(cohort)} clients: {err}"
            return None
        outcome.params = params
        outcome.cohort_size = len(cohort)
        outcome.bits = s.bits
        layout = VectorLayout.from_arrays(arrays)
        if self.ddp is None:
            codec = round_codec(s.bits, bound, len(cohort))
            return RoundShape(params, layout, layout.length, codec=codec)
        if len(cohort) > self.ddp.max_cohort:
            outcome.note = (
                f"a cohort of {len(cohort)} exceeds the {self.ddp.max_cohort} clients the "
                "distributed-DP ring was sized for (sampling randomness only): model unchanged"
            )
            return None
        plan = self.ddp_at(rnd) if self.ddp_at is not None else self.ddp
        ddp_round = plan.round(len(cohort))
        if layout.num_params != ddp_round.dim:
            raise ValueError(
                f"the model has {layout.num_params} parameters, the distributed-DP plan "
                f"{ddp_round.dim}"
            )
        return RoundShape(params, layout, ddp_round.padded, ddp_round=ddp_round)

    def _unmask_stages(
        self,
        run: StageRunner,
        request: Any,
        rnd: int,
        run_id: int,
        length: int,
        last_round: int | None,
        next_cohort: Callable[[set[int]], Sequence[int] | None] | None,
    ) -> Any:
        """The consistency check (malicious model) and stage 4, with the next round's
        stage 2 riding along when share-ahead applies; the unmasked total."""
        # long: stage 4 and the share-ahead that rides on it must be planned together.
        server, outcome = run.server, run.outcome
        lists: dict[str, Any] = {
            SERVER_ROUND: rnd,
            wire.SECAGG_SURVIVORS: pack_ids(request.survivors),
            wire.SECAGG_DROPOUTS: pack_ids(request.dropouts),
        }
        revealers = list(request.survivors)
        if self.malicious:
            revealers = self._consistency_stage(run, request.survivors, rnd, lists)
        plan = None
        if next_cohort is not None and (last_round is None or rnd < last_round):
            exhausted = {r.node_id for r in outcome.failed if r.code == BUDGET_EXHAUSTED}
            try:
                upcoming = next_cohort(exhausted)
            # Only an optimisation: whatever goes wrong asking, this round goes on.
            except Exception as err:
                log.warning("round %d: next cohort unknown (%r); no share-ahead", rnd, err)
                upcoming = None
            plan = plan_ahead(
                self.settings,
                self.ddp,
                self._round_keys,
                rnd + 1,
                upcoming,
                request.survivors,
                run_id,
                length,
                bind=self._bind,
            )
        contents = {u: config_only(lists) for u in revealers}
        if plan is not None:
            for u, record in plan.instructions.items():
                if u in contents:
                    contents[u][wire.SECAGG_NEXT_KEY] = record

        def parse_unmask(c: RecordDict) -> tuple[UnmaskReply, Any]:
            return payload_unmask(c), c.get(wire.SECAGG_NEXT_KEY)

        def unmask(payloads: dict[int, tuple[UnmaskReply, Any]]) -> Any:
            total = server.unmask({u: p[0] for u, p in payloads.items()})
            if plan is not None:
                self._ahead = finish_ahead(plan, {u: p[1] for u, p in payloads.items()})
            return total

        return run.stage(
            Stage.unmask,
            contents,
            parse_unmask,
            unmask,
            optional=frozenset({wire.SECAGG_NEXT_KEY}) if plan is not None else frozenset(),
        )

    def _consistency_stage(
        self, run: StageRunner, survivors: list[int], rnd: int, lists: dict[str, Any]
    ) -> list[int]:
        """Consistency check: every survivor signs U3; >= t signatures go to the signers
        (added to the stage-4 ``lists``), who verify them before revealing anything.
        Returns the signers, the only nodes asked to reveal."""
        server = run.server
        check = {SERVER_ROUND: rnd, wire.SECAGG_SURVIVORS: pack_ids(survivors)}
        signed: dict[int, tuple[str, bytes]] = run.stage(
            Stage.consistency,
            {u: config_only(check) for u in survivors},
            payload_signature,
            functools.partial(self._check_signatures, server, survivors),
        )
        revealers = sorted(signed)
        # The quorum is what a client needs (and checks, every one): sending
        # all |U4| would make each client verify up to n instead.
        proof = revealers[: consistency_quorum(server.params)]
        lists[wire.SECAGG_SIGNERS] = pack_ids(proof)
        lists[wire.SECAGG_IDENTITIES] = json.dumps([signed[u][0] for u in proof])
        lists[wire.SECAGG_SIGNATURES] = b"".join(signed[u][1] for u in proof)
        return revealers


def _absorb_ahead(run: StageRunner, shared: SharedAhead) -> dict[int, dict[int, bytes]]:
    """Stages 1-2 ran during the previous round's unmask exchange: record them."""
    outcome = run.outcome
    outcome.stages.append(StageLog(Stage.advertise, accepted=len(run.server.keys)))
    outcome.stages.append(StageLog(Stage.share_keys, accepted=len(shared.routed)))
    outcome.missing.update(shared.missing)
    outcome.rejected.extend(shared.rejected)
    run.absorb_rejections()
    return shared.routed
