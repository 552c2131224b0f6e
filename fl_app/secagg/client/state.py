"""The client's secure-aggregation state between stages, in Flower's ``Context.state``.

The round's :class:`~fl_app.secagg.ClientSession` and its metadata (``STATE_KEY``), the
key pairs drawn ahead (``KEYS_STATE_KEY``) and the round-monotonicity record
(``PROGRESS_STATE_KEY``); how a stage reads its instruction and builds its reply. The
rules these records enforce are in :mod:`fl_app.secagg.client`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_app.client.policy import PolicyViolation
from fl_app.protocol import CONFIG_KEY, METRICS_KEY, SERVER_ROUND
from fl_app.secagg import wire
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.derive import params_from_config
from fl_app.secagg.params import SecAggConfigError, SecAggParams
from fl_app.secagg.protocol import Stage
from fl_app.secagg.vector import unpack_ids

__all__ = [
    "KEYS_STATE_KEY",
    "PROGRESS_STATE_KEY",
    "STATE_KEY",
    "SecAggStageError",
    "secagg_stage",
    "wipe_state",
]


STATE_KEY = "fl-app.secagg"
# Private key pairs drawn ahead for future rounds: ConfigRecord {"r<round>": c_sk || s_sk}.
KEYS_STATE_KEY = "fl-app.secagg.round-keys"
# Round metadata stored beside ClientSession.to_state() (its keys never start with "_").
_ROUND = "_round"
_PARAMS = "_params"
_BITS = "_bits"
_LENGTH = "_vector-length"
_COHORT = "_cohort"
# Distributed DP: the fewest survivors whose noise shares this client counted on.
_MIN_SURVIVORS = "_ddp-min-survivors"
# The fewest survivors this client unmasks for (its site policy, from the cohort size).
_FLOOR = "_survivor-floor"
# Round monotonicity (not secret; survives wipes): {"seen": r, "masked": r}.
PROGRESS_STATE_KEY = "fl-app.secagg.progress"
# Malicious server model: neighbours' roster identities (JSON node -> identity, this
# client's own included) and the survivor set U3 this client signed (packed ids).
_IDENTITIES = "_identities"
_SIGNED_U3 = "_signed-u3"
# ... this client's own round keys c_pk || s_pk (its consistency signature binds them)
# and the colluders C it assumes (the larger of the round's and its policy's bound).
_OWN_KEYS = "_own-keys"
_CORRUPT = "_corrupt"
_ROSTER = "_roster-digest"  # the roster pinned at share-keys (malicious, deployed sites)


class SecAggStageError(Exception):
    """This client refuses a secure-aggregation stage; the reason goes to the server.

    ``field`` names the site-policy field a refusal rests on (``None`` otherwise), so the
    ClientApp can send it as a structured policy refusal.
    """

    def __init__(self, message: str, field: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.detail = detail or message

    @classmethod
    def from_violation(cls, err: PolicyViolation) -> SecAggStageError:
        return cls(str(err), err.field, err.message)


def _progress(context: Context) -> tuple[int, int]:
    """``(latest round taken part in, latest round a masked input left)``; -1: none."""
    record = context.state.get(PROGRESS_STATE_KEY)
    if not isinstance(record, ConfigRecord):
        return -1, -1
    seen, masked = record.get("seen", -1), record.get("masked", -1)
    return (seen if isinstance(seen, int) else -1), (masked if isinstance(masked, int) else -1)


def _check_round(context: Context, rnd: int, stage: Stage) -> None:
    """Refuse a stage for a round this client moved past or already sent an input for."""
    seen, masked = _progress(context)
    if rnd < seen:
        raise SecAggStageError(
            f"stage {stage.name} for round {rnd}, but this client has moved on to round "
            f"{seen} (replayed or out-of-order instruction)"
        )
    if stage not in (Stage.unmask, Stage.consistency) and rnd <= masked:
        raise SecAggStageError(
            f"stage {stage.name} for round {rnd}: this client already sent its masked "
            f"input for round {masked} and takes part in each round once"
        )


def _advance(context: Context, rnd: int, *, masked: bool = False) -> None:
    seen, last_masked = _progress(context)
    context.state[PROGRESS_STATE_KEY] = ConfigRecord(
        {"seen": max(seen, rnd), "masked": max(last_masked, rnd) if masked else last_masked}
    )


def secagg_stage(msg: Message) -> int | None:
    """The stage marker of a train instruction, or ``None`` for a plain train message."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or wire.SECAGG_STAGE_KEY not in config:
        return None
    value = config[wire.SECAGG_STAGE_KEY]
    if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2, 3, 4, 5):
        raise SecAggStageError(f"'{wire.SECAGG_STAGE_KEY}' must be 1, 2, 3, 4 or 5, got {value!r}")
    return value


def wipe_state(context: Context) -> None:
    """Forget this client's secure-aggregation secrets."""
    if STATE_KEY in context.state:
        del context.state[STATE_KEY]


@functools.lru_cache(maxsize=16)
def _params_from_json(text: str) -> SecAggParams:
    # from_config re-derives (k, t) to check the server's values; cached per text.
    return params_from_config(json.loads(text))


def _get(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SecAggStageError(f"'{key}' missing or of the wrong type ({type(value).__name__})")
    return value


def _round_of(config: Mapping[str, Any]) -> int:
    rnd = _get(config, SERVER_ROUND, int)
    assert isinstance(rnd, int)
    return rnd


def _reply(
    msg: Message,
    rnd: int,
    stage: Stage,
    payload: ConfigRecord | ArrayRecord,
    public: Mapping[str, float] | None = None,
) -> Message:
    key = wire.SECAGG_MASKED_KEY if isinstance(payload, ArrayRecord) else wire.SECAGG_RECORD_KEY
    metrics = MetricRecord({SERVER_ROUND: rnd, wire.SECAGG_STAGE_KEY: int(stage), **(public or {})})
    return Message(RecordDict({key: payload, METRICS_KEY: metrics}), reply_to=msg)


def _save(context: Context, session: ClientSession, meta: Mapping[str, Any]) -> None:
    context.state[STATE_KEY] = ConfigRecord({**session.to_state(), **meta})


def _load(context: Context, rnd: int, stage: Stage) -> tuple[ClientSession, dict[str, Any]]:
    record = context.state.get(STATE_KEY)
    if not isinstance(record, ConfigRecord):
        raise SecAggStageError(
            f"stage {stage.name} without a session: this client did not take part in "
            "stages 1-2 of this round (or its state was wiped)"
        )
    stored: dict[str, Any] = dict(record)
    if stored.get(_ROUND) != rnd:
        raise SecAggStageError(
            f"stage {stage.name} for round {rnd}, but this client's session is for round "
            f"{stored.get(_ROUND)!r} (replayed or out-of-order instruction)"
        )
    meta = {k: v for k, v in stored.items() if k.startswith("_")}
    try:
        session = ClientSession.from_state(
            {k: v for k, v in stored.items() if not k.startswith("_")},
            _params_from_json(meta[_PARAMS]),
            vector_length=int(meta[_LENGTH]),
            bits=int(meta[_BITS]),
            cohort=unpack_ids(meta[_COHORT], "cohort"),
        )
    except (KeyError, ValueError, SecAggConfigError) as err:
        raise SecAggStageError(f"stored secure-aggregation state is unusable: {err}") from err
    return session, meta
