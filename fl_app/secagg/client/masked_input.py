"""Stage 3: the encode and mask stages of the train pipeline, and the reply.

The ClientApp trains as usual (:mod:`fl_app.client.app`), then :class:`MaskedInputStage`
encodes the clipped update with its weight and metrics into the ring (fixed point, or
this client's distributed-DP noise share), adds the masks and builds the reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.protocol import CONFIG_KEY, PUBLIC_METRIC_PREFIX, SPEC_KEY
from fl_app.secagg import wire
from fl_app.secagg.client.state import (
    _CORRUPT,
    _MIN_SURVIVORS,
    SecAggStageError,
    _advance,
    _check_round,
    _get,
    _load,
    _reply,
    _round_of,
    _save,
    wipe_state,
)
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.protocol import (
    CIPHERTEXT_BYTES,
    ClientRefusal,
    Stage,
    StageOrderError,
    context_binds,
    spec_binding,
)
from fl_app.secagg.terms import content_terms
from fl_app.secagg.vector import VectorLayout, client_weight, round_codec, unpack_ids

__all__ = ["MaskedInputStage"]


@dataclass
class MaskedInputStage:
    """Stage 3: the encode and mask stages of the train pipeline, and the reply.

    Built before training (so a missing or stale session fails before any work);
    :meth:`encode` turns the clipped update plus weight and metrics into the ring
    vector (:mod:`fl_app.secagg.vector`), :meth:`mask` adds the masks.
    """

    session: ClientSession
    meta: dict[str, Any]
    rnd: int
    ciphertexts: dict[int, bytes]
    bound: float
    weighting: str
    max_weight: float
    ddp: Any = None  # fl_app.privacy.ddg_encoding.DdpRound under distributed DP
    terms: bytes = b""  # fl_app.secagg.terms.content_terms of the instruction

    @classmethod
    def from_instruction(
        cls, msg: Message, context: Context, policy: SitePolicy | None = None
    ) -> MaskedInputStage:
        """Check the stage-3 instruction against the saved session and the site's floor."""
        config = msg.content.config_records.get(CONFIG_KEY)
        if config is None:
            raise SecAggStageError(f"instruction lacks '{CONFIG_KEY}'")
        site = policy if policy is not None else SitePolicy()
        try:
            rnd = _round_of(config)
            _check_round(context, rnd, Stage.masked_input)
            session, meta = _load(context, rnd, Stage.masked_input)
            _check_spec_bound(config, session.context)
            senders = unpack_ids(_get(config, wire.SECAGG_NODES, bytes), "senders")
            raw = _get(config, wire.SECAGG_CIPHERTEXTS, bytes)
            if len(raw) != CIPHERTEXT_BYTES * len(senders) or len(set(senders)) != len(senders):
                raise SecAggStageError("ciphertexts do not match the sender list")
            cts = {
                v: raw[i * CIPHERTEXT_BYTES : (i + 1) * CIPHERTEXT_BYTES]
                for i, v in enumerate(senders)
            }
            bound = float(_get(config, wire.SECAGG_BOUND, (int, float)))
            max_weight = float(_get(config, wire.SECAGG_MAX_WEIGHT, (int, float)))
            weighting = _get(config, wire.SECAGG_WEIGHTING, str)
            if not (math.isfinite(bound) and bound > 0):
                raise SecAggStageError(f"'{wire.SECAGG_BOUND}' must be finite and > 0, got {bound}")
            if weighting not in ("examples", "uniform"):
                raise SecAggStageError(f"'{wire.SECAGG_WEIGHTING}' must be examples or uniform")
            if not (math.isfinite(max_weight) and max_weight > 0):
                raise SecAggStageError(f"'{wire.SECAGG_MAX_WEIGHT}' must be finite and > 0")
            ddp = _ddp_round(config, session, bound, site, int(meta.get(_CORRUPT, 0)))
        except (ValueError, SecAggStageError):
            wipe_state(context)
            raise
        terms = content_terms(msg.content)
        return cls(session, meta, rnd, cts, bound, weighting, max_weight, ddp, terms)

    def encode(
        self,
        update: Mapping[str, np.ndarray],
        *,
        num_examples: float,
        loss: float,
        accuracy: float,
        unclipped: float,
    ) -> np.ndarray:
        layout = VectorLayout.from_arrays(update)
        if self.ddp is not None:
            # Distributed DP: rotate, scale, round, add this client's discrete Gaussian
            # share (the noise stage) and reduce into the ring; no extras ride along.
            if layout.num_params != self.ddp.dim:
                raise SecAggStageError(
                    f"model has {layout.num_params} parameters, the round expects {self.ddp.dim}"
                )
            return cast(
                np.ndarray, self.ddp.encode(layout.flatten_params(update), self.session.context)
            )
        if layout.length != self.session.vector_length:
            raise SecAggStageError(
                f"model has {layout.length} masked coordinates, the round expects "
                f"{self.session.vector_length}"
            )
        weight = client_weight(self.weighting, float(num_examples), self.max_weight)
        x = layout.flatten_input(
            update,
            weight=weight,
            bound=self.bound,
            unclipped=unclipped,
            loss=loss,
            accuracy=accuracy,
        )
        codec = round_codec(self.session.bits, self.bound, self.session.params.num_clients)
        # Rounding randomness from a ChaCha20 keystream under an OS-random key: it must
        # not depend on anything the server knows (a seeded rounding could be partly
        # undone). Imported here: key-exchange stages never load the privacy package.
        from fl_app.privacy.noise import SecureNoise

        return codec.encode(x, SecureNoise())  # type: ignore[arg-type]

    def mask(self, encoded: np.ndarray, context: Context) -> np.ndarray:
        try:
            y = self.session.masked_input(self.ciphertexts, encoded, self.terms)
        except (ClientRefusal, StageOrderError) as err:
            wipe_state(context)
            raise SecAggStageError(str(err)) from err
        if self.ddp is not None:
            self.meta[_MIN_SURVIVORS] = int(self.ddp.min_survivors)
        _save(context, self.session, self.meta)  # b_u, s_sk_u, c_sk_u already dropped
        _advance(context, self.rnd, masked=True)
        return y

    def reply(
        self, msg: Message, masked: np.ndarray, public: Mapping[str, float] | None = None
    ) -> Message:
        """The stage-3 reply: the masked vector, plus only public ``dp-*`` metrics."""
        if public and any(not k.startswith(PUBLIC_METRIC_PREFIX) for k in public):
            raise ValueError(f"only public '{PUBLIC_METRIC_PREFIX}*' metrics may ride in plaintext")
        record = ArrayRecord()
        bits = self.session.bits
        record[wire.SECAGG_MASKED_ARRAY] = Array(
            wire.pack_ring(masked, bits) if wire.wire_packed(bits) else masked
        )
        return _reply(msg, self.rnd, Stage.masked_input, record, public)


def _ddp_round(
    config: Mapping[str, Any],
    session: ClientSession,
    bound: float,
    policy: SitePolicy,
    colluders: int = 0,
) -> Any:
    """The round's distributed-DP parameters, checked against the session and the site's
    floor (``n_min`` and the noise multiplier), or ``None``. ``colluders``: the ``C`` of
    the malicious model's share-keys check (0 otherwise); the server knows their noise
    shares, so the floor counts only ``n_min - C`` honest ones."""
    raw = config.get(wire.SECAGG_DDP)
    if raw is None:
        return None
    from fl_app.privacy.ddg_encoding import DdpRound

    if not isinstance(raw, str):
        raise SecAggStageError(f"'{wire.SECAGG_DDP}' must be a JSON string")
    try:
        ddp = DdpRound.from_json(raw)
    except (ValueError, TypeError) as err:
        raise SecAggStageError(f"distributed-DP parameters refused: {err}") from err
    if ddp.padded != session.vector_length or ddp.bits != session.bits:
        raise SecAggStageError("distributed-DP parameters disagree with the round's vector")
    if ddp.cohort != session.params.num_clients or ddp.clip != bound:
        raise SecAggStageError("distributed-DP parameters disagree with the cohort or the clip")
    try:
        policy.check_ddp(
            cohort=ddp.cohort,
            min_survivors=ddp.min_survivors,
            share_std=ddp.share_std,
            bound=ddp.bound,
            colluders=colluders,
        )
    except PolicyViolation as err:
        raise SecAggStageError.from_violation(err) from err
    _check_schedule(config, ddp)
    return ddp


def _check_spec_bound(config: Mapping[str, Any], round_context: bytes) -> None:
    """The round context this client's keys, shares and masks are bound to must bind the
    client spec it is about to train under (:func:`fl_app.secagg.protocol.spec_binding`):
    then a server can hand one client a spec of its own (its own sketch or random-k
    hashes, clip, sizes) only with a context of its own, under which that client's masks
    cancel with nobody's. Checked before training, so nothing is computed for it. An
    instruction without a spec passes here: fl-app's train pipeline refuses it itself
    (:func:`fl_app.client.instruction.read_instruction`), and callers that mask a fixed vector
    (fl_app.testing) train under no spec at all."""
    spec = config.get(SPEC_KEY)
    if spec is None:
        return
    if not isinstance(spec, str) or not context_binds(round_context, spec_binding(spec)):
        raise SecAggStageError(
            "the round context does not bind the client spec this instruction carries (the "
            "server sent this client a spec other than the round's): refusing before training"
        )


def _check_schedule(config: Mapping[str, Any], ddp: Any) -> None:
    """Under ``privacy.schedule=decay|spend`` the round's ``z`` must reach the least the
    stated schedule allows in this round, recomputed here (:mod:`fl_app.privacy.ddp_schedule`):
    the client never takes the server's word for its own noise."""
    from fl_app.client_spec import SpecError, decode_spec
    from fl_app.privacy.ddp_schedule import ScheduleViolation, check_round_noise

    try:
        spec = decode_spec(config.get(SPEC_KEY)) if SPEC_KEY in config else None
    except SpecError as err:
        raise SecAggStageError(f"client spec refused: {err}") from err
    schedule = spec.client_dp.ddp_schedule if spec and spec.client_dp else None
    if schedule is None:
        return
    declared = ddp.share_std * math.sqrt(ddp.min_survivors) / ddp.bound
    try:
        check_round_noise(
            schedule,
            _round_of(config),
            declared=declared,
            clip=ddp.clip,
            dim=ddp.dim,
            bits=ddp.bits,
        )
        _check_round_tau(schedule, ddp, declared)
    except ScheduleViolation as err:
        raise SecAggStageError(str(err), err.field, err.detail) from err


def _check_round_tau(schedule: Any, ddp: Any, declared: float) -> None:
    """The schedule's ε counts each round at its plan's ``τ`` ([KLS] Theorem 1: ``τ`` for
    ``max_cohort`` shares). ``τ`` grows with the number of shares summed and as each share
    shrinks, so a round with more clients than ``max_cohort`` (or more declared survivors,
    each share smaller) carries the same ``z`` with a larger ``τ``: an 8-bit ring's spend
    floor then spent ε ≈ 394 against a budget of 60 (red-team finding). The round's own
    ``τ`` (its ``share_std``, its ``cohort``) must not exceed the plan's at its ``z``."""
    from fl_app.privacy.ddg_encoding import DdpConfigError
    from fl_app.privacy.ddp_schedule import ScheduleViolation, ring_plan

    share_var = float(ddp.share_std) ** 2
    tau = 10.0 * sum(
        math.exp(-2.0 * math.pi**2 * share_var * k / (k + 1)) for k in range(1, int(ddp.cohort))
    )
    try:
        planned: float | None = ring_plan(
            schedule, clip=ddp.clip, dim=ddp.dim, bits=ddp.bits, z=declared
        ).tau
    except DdpConfigError:
        planned = None  # no ring of these bits holds this round: not the plan's round
    if ddp.cohort > schedule.max_cohort or planned is None or tau > planned * (1.0 + 1e-9):
        raise ScheduleViolation(
            f"a round of {ddp.cohort} clients (at most {schedule.max_cohort} planned) with "
            f"noise shares of std {ddp.share_std:.6g}: its DDG tau {tau:.6g} exceeds the "
            f"{planned if planned is not None else float('nan'):.6g} privacy.schedule="
            f"{schedule.schedule.value} accounts for; refused before training"
        )
