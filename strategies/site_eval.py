"""Each site's accuracy from a round's federated evaluation (the fairness indicators).

The driver keeps, per accepted evaluate reply, the client's ``eval-accuracy`` and example
count, so the run can report the spread over sites and the worst site
(:mod:`fl_app.fairness`), not only the example-weighted mean. Federated evaluation runs
only where the threat model lets the server see each client's numbers
(:func:`fl_app.config.schema.evaluation_hidden_from_server`), so keeping them adds
nothing the server did not already receive (docs/architecture.md, Fairness).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from strategies.validation import EvalReply

__all__ = ["EVAL_ACCURACY", "site_accuracies"]

log = logging.getLogger("fl_app.driver")

#: The evaluate reply's accuracy key (fl_app.client.app.handle_evaluate).
EVAL_ACCURACY = "eval-accuracy"


def site_accuracies(replies: Sequence[EvalReply], rnd: int) -> dict[int, tuple[float, float]]:
    """``node id -> (accuracy, examples)`` for the replies whose accuracy is a number in
    [0, 1]; any other reply is left out of the per-site numbers with a warning (it still
    counts, as before, in the weighted mean the driver logs as ``fed_eval_accuracy``)."""
    out: dict[int, tuple[float, float]] = {}
    for r in replies:
        acc = r.metrics.get(EVAL_ACCURACY)
        if acc is None or not (math.isfinite(acc) and 0.0 <= acc <= 1.0):
            log.warning(
                "round %d evaluate: node %d's %s %r is not in [0, 1]: left out of the "
                "per-site accuracies",
                rnd,
                r.node_id,
                EVAL_ACCURACY,
                acc,
            )
            continue
        out[r.node_id] = (float(acc), float(r.num_examples))
    return out
