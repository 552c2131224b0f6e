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
stage becomes four ``train`` messages per client; their keys and payloads are
:mod:`fl_app.secagg.wire`'s.

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
