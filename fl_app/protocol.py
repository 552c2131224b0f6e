"""The wire contract between fl-app's round driver and its ClientApp.

One place names every record and key a message carries, so the server's ingestion
checks and the client's reply builder cannot drift apart.

Instruction (server -> client), both ``train`` and ``evaluate``:
    ``arrays``  ArrayRecord   the current global model
    ``config``  ConfigRecord  ``server-round``; ``fl-app.spec`` (JSON client spec);
                              strategy extras such as FedProx's ``proximal-mu``
                              client-level DP: ``fl-app.clip-norm`` (this round's C)
Train reply (client -> server):
    ``update``  ArrayRecord   Δ = w_local − w_global, same names/shapes/dtypes as ``arrays``
                              (clipped/noised by the client's pipeline when asked)
    ``metrics`` MetricRecord  ``num-examples`` (aggregation weight), ``server-round``,
                              ``train-loss``, ``train-accuracy``; ``fl-app.unclipped``
                              (0/1) with client-side clipping; ``dp-*`` public metrics
Evaluate reply:
    ``metrics`` MetricRecord  ``num-examples``, ``server-round``, ``eval-loss``, ``eval-accuracy``

Secure aggregation (``secagg.mode != off``, :mod:`strategies.secagg`): the train
stage becomes four ``train`` messages per client, each with ``fl-app.secagg-stage``
(1-4) in ``config``. Node ids travel as 8-byte big-endian words (``bytes``: ConfigRecord
integers are signed 64-bit, node ids are uint64). Replies carry ``metrics`` with only
``server-round`` and ``fl-app.secagg-stage``, plus the stage payload:
    1 advertise   instruction ``config``: ``fl-app.secagg.context`` (bytes),
                  ``fl-app.secagg.params`` (JSON of SecAggParams), ``.bits``,
                  ``.vector-length``, ``.cohort`` (ids);
                  reply ``secagg`` ConfigRecord: ``c-pk``, ``s-pk`` (32 bytes each)
    2 share keys  instruction: ``.nodes`` (ids), ``.keys`` (64 bytes per node);
                  reply ``secagg``: ``nodes`` (recipients), ``ciphertexts`` (concatenated)
    3 masked input instruction: ``arrays`` + the usual train ``config`` plus ``.nodes``
                  (senders), ``.ciphertexts``, ``.bound`` (encoding bound C),
                  ``.weighting``, ``.max-weight``;
                  reply ``masked`` ArrayRecord: one uint32/uint64 vector ``y``
    4 unmask      instruction: ``.survivors``, ``.dropouts`` (ids);
                  reply ``secagg``: ``self-mask-nodes``, ``self-mask-shares``,
                  ``key-nodes``, ``key-shares`` (66-byte shares, concatenated)

Clients send the update Δ rather than their full weights: every later privacy stage
(clipping, noise, encoding, masking) operates on Δ, and the server only ever needs
the weighted mean of the cohort's Δ.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS_KEY",
    "BUDGET_EXHAUSTED",
    "CLIENT_REFUSED",
    "CLIP_NORM_KEY",
    "CONFIG_KEY",
    "EVAL_REPLY_KEYS",
    "METRICS_KEY",
    "NUM_EXAMPLES",
    "PROXIMAL_MU",
    "PUBLIC_METRIC_PREFIX",
    "SECAGG_BITS",
    "SECAGG_BOUND",
    "SECAGG_CIPHERTEXTS",
    "SECAGG_COHORT",
    "SECAGG_CONTEXT",
    "SECAGG_DDP",
    "SECAGG_DROPOUTS",
    "SECAGG_IDENTITIES",
    "SECAGG_KEYS",
    "SECAGG_KEY_ROUNDS",
    "SECAGG_MASKED_ARRAY",
    "SECAGG_MASKED_KEY",
    "SECAGG_MAX_KEY_ROUNDS",
    "SECAGG_MAX_WEIGHT",
    "SECAGG_NEXT_KEY",
    "SECAGG_NODES",
    "SECAGG_PARAMS",
    "SECAGG_RECORD_KEY",
    "SECAGG_REPLY_CIPHERTEXTS",
    "SECAGG_REPLY_COMMITMENT",
    "SECAGG_REPLY_C_PK",
    "SECAGG_REPLY_IDENTITY",
    "SECAGG_REPLY_KEY_NODES",
    "SECAGG_REPLY_KEY_SHARES",
    "SECAGG_REPLY_NODES",
    "SECAGG_REPLY_SELF_MASK_NODES",
    "SECAGG_REPLY_SELF_MASK_SHARES",
    "SECAGG_REPLY_SIGNATURES",
    "SECAGG_REPLY_SIGNING_KEY",
    "SECAGG_REPLY_S_PK",
    "SECAGG_RUN_ID",
    "SECAGG_SIGNATURES",
    "SECAGG_SIGNERS",
    "SECAGG_STAGE_KEY",
    "SECAGG_SURVIVORS",
    "SECAGG_VECTOR_LENGTH",
    "SECAGG_WEIGHTING",
    "SERVER_ROUND",
    "SPEC_KEY",
    "TRAIN_REPLY_KEYS",
    "UNCLIPPED_KEY",
    "UPDATE_KEY",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"

SERVER_ROUND = "server-round"
SPEC_KEY = "fl-app.spec"
PROXIMAL_MU = "proximal-mu"
NUM_EXAMPLES = "num-examples"

# Client-level DP. Instruction: the L2 norm a client clips its update to this round
# (present only when clients clip). Train reply: 1 if the update's norm was already
# <= that bound, else 0 (adaptive clipping's count; never written to metrics files).
CLIP_NORM_KEY = "fl-app.clip-norm"
UNCLIPPED_KEY = "fl-app.unclipped"

TRAIN_REPLY_KEYS = frozenset({UPDATE_KEY, METRICS_KEY})
EVAL_REPLY_KEYS = frozenset({METRICS_KEY})

# Error code of a structured refusal by fl-app's ClientApp (bad spec, no usable data).
# Flower's own ErrorCode values are < 100; ours stay clear of them.
CLIENT_REFUSED = 1001
# A client whose privacy budget would be exceeded by the next round refuses with this
# code; the driver then treats it as unavailable for the rest of the run.
BUDGET_EXHAUSTED = 1002

# Per-client metrics under this prefix are public by design (e.g. "dp-epsilon": the
# epsilon an institution has spent) and are kept per client, not only averaged.
PUBLIC_METRIC_PREFIX = "dp-"

# Secure aggregation (see the module doc). Instruction config keys:
SECAGG_STAGE_KEY = "fl-app.secagg-stage"
SECAGG_CONTEXT = "fl-app.secagg.context"
SECAGG_PARAMS = "fl-app.secagg.params"
SECAGG_BITS = "fl-app.secagg.bits"
SECAGG_VECTOR_LENGTH = "fl-app.secagg.vector-length"
SECAGG_COHORT = "fl-app.secagg.cohort"
SECAGG_NODES = "fl-app.secagg.nodes"
SECAGG_KEYS = "fl-app.secagg.keys"
SECAGG_CIPHERTEXTS = "fl-app.secagg.ciphertexts"
SECAGG_BOUND = "fl-app.secagg.bound"
SECAGG_WEIGHTING = "fl-app.secagg.weighting"
SECAGG_MAX_WEIGHT = "fl-app.secagg.max-weight"
SECAGG_SURVIVORS = "fl-app.secagg.survivors"
SECAGG_DROPOUTS = "fl-app.secagg.dropouts"
# Stage 1 (advertise): how many rounds, from this one on, to draw key pairs for.
SECAGG_KEY_ROUNDS = "fl-app.secagg.key-rounds"
# The most rounds one stage 1 may ask key pairs for (bounds a client's work and memory).
SECAGG_MAX_KEY_ROUNDS = 1024
# Distributed DP: the round's DdpRound as JSON (fl_app.privacy.distributed), stage 3.
SECAGG_DDP = "fl-app.secagg.ddp"
# Reply records: the stage payload (ConfigRecord of bytes) and the masked vector.
SECAGG_RECORD_KEY = "secagg"
SECAGG_MASKED_KEY = "masked"
# Share-ahead: a stage-4 instruction may carry the next round's stage-2 instruction in
# this ConfigRecord, and the reply then carries that stage's payload under the same key.
SECAGG_NEXT_KEY = "secagg-next"
# Keys inside the reply's ``secagg`` ConfigRecord.
SECAGG_REPLY_C_PK = "c-pk"
SECAGG_REPLY_S_PK = "s-pk"
SECAGG_REPLY_NODES = "nodes"
SECAGG_REPLY_CIPHERTEXTS = "ciphertexts"
# Stage 2: the sender's SHA-256 commitment to its self-mask seed (fl_app.secagg.crypto).
SECAGG_REPLY_COMMITMENT = "commitment"
SECAGG_REPLY_SELF_MASK_NODES = "self-mask-nodes"
SECAGG_REPLY_SELF_MASK_SHARES = "self-mask-shares"
SECAGG_REPLY_KEY_NODES = "key-nodes"
SECAGG_REPLY_KEY_SHARES = "key-shares"
# The masked vector's name inside the ``masked`` ArrayRecord.
SECAGG_MASKED_ARRAY = "y"
# Malicious server model (fl_app.secagg.signing). Stage 1: the run id the client binds
# its signed key pairs to (present only in malicious rounds); the reply's roster
# identity, Ed25519 signatures (64 bytes each, one per pair; one at the consistency
# stage) and signing public key (lets the server drop bad signatures before forwarding).
SECAGG_RUN_ID = "fl-app.secagg.run-id"
SECAGG_REPLY_IDENTITY = "identity"
SECAGG_REPLY_SIGNATURES = "signatures"
SECAGG_REPLY_SIGNING_KEY = "signing-key"
# Stage 2: neighbours' identities (JSON list, neighbour order) and key signatures;
# stage 4: the consistency-check signers (packed ids), their identities and signatures.
SECAGG_IDENTITIES = "fl-app.secagg.identities"
SECAGG_SIGNATURES = "fl-app.secagg.signatures"
SECAGG_SIGNERS = "fl-app.secagg.signers"
